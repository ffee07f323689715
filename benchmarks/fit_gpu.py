"""Check ``convert --gpu-memory`` against real training steps: predicted peak vs
``torch.cuda.max_memory_allocated()``, and the predicted largest batch trains while batch + 1 is predicted
not to fit.

Cases: a Llama-3-8B-shaped model of 8 layers (seq 4096) and GPT-2 medium (seq 1024), bf16, each with full
AdamW and with LoRA r=16, patched with actpatch's defaults.  The parent predicts on a meta model (the same
actpatch.fit the CLI uses) for the GPU's whole memory; each training run is a subprocess (a CUDA OOM
poisons nothing else) that builds the model in bf16 with random weights, applies the same LoRA, patches,
and runs ``--steps`` steps of ``loss.backward(); opt.step(); opt.zero_grad()`` at the predicted largest
batch (torch.optim.AdamW, foreach, states in bf16 as the memory model assumes).  Without ``--quick`` the
unpatched model is trained at its own predicted largest batch too.

    python benchmarks/fit_gpu.py --json fit_gpu.json            # H200: about 6 minutes
    python benchmarks/fit_gpu.py --quick --json fit_gpu.json    # patched only, 2 steps
    python benchmarks/fit_gpu.py --device cpu --tiny            # tiny configs on the CPU: the same code
        path, checking weights, gradients, optimizer states and saved activations against what they are
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers as tf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import actpatch  # noqa: E402
from actpatch import fit  # noqa: E402
from actpatch.analysis.inputs import input_spec  # noqa: E402
from actpatch.measure import saved_bytes  # noqa: E402

LLAMA = dict(
    num_hidden_layers=8,
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    tie_word_embeddings=False,
)
CASES = {  # name -> (config class, model class, config kwargs, seq) on CUDA
    "llama-3-8b-shaped, 8 layers": (tf.LlamaConfig, tf.LlamaForCausalLM, LLAMA, 4096),
    "gpt2-medium": (tf.GPT2Config, tf.GPT2LMHeadModel, dict(n_layer=24, n_embd=1024, n_head=16), 1024),
}
TINY = {  # the same classes, tiny, on the CPU
    "llama-tiny": (
        tf.LlamaConfig,
        tf.LlamaForCausalLM,
        {**LLAMA, "num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 448, "vocab_size": 1000},
        64,
    ),
    "gpt2-tiny": (
        tf.GPT2Config,
        tf.GPT2LMHeadModel,
        dict(n_layer=2, n_embd=128, n_head=4, vocab_size=1000),
        32,
    ),
}
LORA_RANK = 16
TINY_GPU_BYTES = 2 << 30  # the "GPU" the tiny CPU cases are fitted on


def build(case: tuple, device: str, lora: bool) -> torch.nn.Module:
    """The case's model in bf16 on ``device`` (meta: no memory), LoRA applied when asked, training mode."""
    config_cls, model_cls, kwargs, _ = case
    config = config_cls(**kwargs)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = model_cls._from_config(config, dtype=torch.bfloat16)
    model.tie_weights()
    model = fit.with_lora(model, LORA_RANK) if lora else model
    return model.train()


def predict(case: tuple, lora: bool, gpu_bytes: int, tiny: bool) -> tuple[fit.TrainingMemory, fit.GpuFit]:
    """What ``convert --dry-run --gpu-memory`` computes for the case (meta model, batch-2 analysis; tiny
    cases on the CPU model itself: CPU attention kernels save other tensors than the CUDA ones a meta
    probe assumes)."""
    seq = case[3]
    model = build(case, "cpu" if tiny else "meta", lora)
    report = actpatch.analyze(model, batch_size=2, seq_len=seq, dtype=torch.bfloat16)
    memory = fit.training_memory(model, report, "adamw")
    return memory, fit.plan(memory, gpu_bytes, seq_len=seq, lora_rank=LORA_RANK if lora else None)


def train(case: tuple, lora: bool, patched: bool, batch: int, steps: int, device: str) -> dict:
    """Train ``steps`` steps at ``batch``; on CUDA the peak of max_memory_allocated (or the OOM), on the
    CPU the bytes of weights, gradients, optimizer states and saved activations."""
    torch.manual_seed(0)
    model = build(case, device, lora)
    if patched:
        actpatch.patch_model(model, batch_size=batch, seq_len=case[3])
    _, kwargs = input_spec(model).make(batch, case[3])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    out: dict = {"batch": batch}
    try:
        for _ in range(steps):
            if device == "cpu":
                out["activations"], result = saved_bytes(model, kwargs)
                loss = result.loss
            else:
                loss = model(**kwargs).loss
            loss.backward()
            del loss
            if device == "cpu":
                out["gradients"] = sum(
                    p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None
                )
            opt.step()
            opt.zero_grad(set_to_none=True)
        out["trained"] = True
    except torch.OutOfMemoryError:
        out["trained"] = False
    if device == "cuda":
        torch.cuda.synchronize()
        out["peak"] = torch.cuda.max_memory_allocated()
    else:
        tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
        out["weights"] = sum(t.numel() * t.element_size() for t in tensors.values())
        states = [t for s in opt.state.values() for k, t in s.items() if k != "step"]
        out["optimizer"] = sum(t.numel() * t.element_size() for t in states)
    return out


def gpu_bytes(device: str) -> int:
    """The GPU's memory, asked in a subprocess so this process holds no CUDA context."""
    if device == "cpu":
        return TINY_GPU_BYTES
    code = "import torch; print(torch.cuda.get_device_properties(0).total_memory)"
    return int(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    )


def run_case(name: str, lora: bool, patched: bool, batch: int, args: argparse.Namespace) -> dict:
    """``train`` in a fresh process; its JSON result."""
    cmd = [sys.executable, __file__, "--child", name, "--batch", str(batch), "--steps", str(args.steps)]
    cmd += ["--device", args.device] + (["--lora"] if lora else []) + (["--patched"] if patched else [])
    cmd += ["--tiny"] if args.tiny else []
    env = dict(os.environ)
    if args.allocator == "expandable":  # what the assumptions line recommends: no fragmentation to guess
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if done.returncode:
        return {"batch": batch, "trained": False, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def check(name: str, lora: bool, patched: bool, args: argparse.Namespace, capacity: int) -> dict:
    """One row: the prediction, the run at the predicted largest batch, and the comparison."""
    case = (TINY if args.tiny else CASES)[name]
    memory, plan = predict(case, lora, capacity, args.tiny)
    side = "after" if patched else "before"
    best = plan.max_batch_size_after if patched else plan.max_batch_size_before
    line = fit.batch_line(memory, capacity, case[3], patched)
    row = {
        "model": name,
        "mode": "LoRA r=16" if lora else "full AdamW",
        "patched": patched,
        "seq_len": case[3],
        "gpu_memory_bytes": capacity,
        "predicted_max_batch": best,
        "next_predicted_not_to_fit": line.static + (best + 1) * line.per_sample > capacity,
        "predicted_peak": round(memory.peak(max(best, 1), case[3], patched)),
        "fit": plan.to_dict(),
    }
    batch = max(best, 1) if not args.tiny else 2
    measured = run_case(name, lora, patched, batch, args)
    row.update(measured=measured, trained=measured.get("trained", False))
    below = measured
    while not args.tiny and not below.get("trained") and below["batch"] > 1 and batch - below["batch"] < 3:
        below = run_case(name, lora, patched, below["batch"] - 1, args)  # the largest batch that trains
    if below is not measured:
        row["largest_trained"] = below
        if below.get("trained"):
            predicted = memory.peak(below["batch"], case[3], patched)
            row["error_at_largest_trained"] = (predicted - below["peak"]) / below["peak"]
    if args.tiny:
        row["predicted_peak"] = round(memory.peak(batch, case[3], patched))
        row["predicted"] = {
            "weights": memory.weights,
            "gradients": memory.gradients,
            "optimizer": memory.optimizer,
            "activations": round(memory.activations(batch, case[3], patched)),
        }
        row["error"] = {k: (measured[k] - v) / v for k, v in row["predicted"].items() if k in measured}
    elif "peak" in measured:
        row["error"] = (row["predicted_peak"] - measured["peak"]) / measured["peak"]
    row["side"] = side
    return row


def table(rows: list[dict]) -> str:
    gib = lambda n: f"{n / (1 << 30):.2f} GiB"
    lines = [
        "| model | mode | patched | predicted max batch | predicted peak | measured max_memory_allocated "
        "| error | trained | max+1 predicted not to fit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = r["measured"].get("peak")
        err = r.get("error")
        err = f"{100 * err:+.1f}%" if isinstance(err, float) else "-"
        if "largest_trained" in r:
            below = r["largest_trained"]
            err2 = r.get("error_at_largest_trained")
            err += f"; trained at {below['batch']}" if below.get("trained") else "; nothing below trained"
            err += f" ({gib(below['peak'])}, {100 * err2:+.1f}%)" if err2 is not None else ""
        lines.append(
            f"| {r['model']}, seq {r['seq_len']} | {r['mode']} | {'yes' if r['patched'] else 'no'} "
            f"| {r['predicted_max_batch']} | {gib(r['predicted_peak'])} "
            f"| {gib(peak) if peak else '-'} | {err} "
            f"| {'yes' if r['trained'] else 'NO'} | {'yes' if r['next_predicted_not_to_fit'] else 'NO'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny configs (for --device cpu)")
    parser.add_argument("--quick", action="store_true", help="patched runs only, 2 steps")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument(
        "--allocator", choices=("expandable", "default"), default="expandable", help="CUDA caching allocator"
    )
    parser.add_argument("--cases", nargs="+", default=None, help="only these model names")
    parser.add_argument("--modes", nargs="+", choices=("full", "lora"), default=("full", "lora"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--patched", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.steps = args.steps or (2 if args.quick else 3)
    if args.child:
        case = (TINY if args.tiny else CASES)[args.child]
        print(json.dumps(train(case, args.lora, args.patched, args.batch, args.steps, args.device)))
        return
    capacity = gpu_bytes(args.device)
    rows = []
    for name in args.cases or (TINY if args.tiny else CASES):
        for lora in [m == "lora" for m in args.modes]:
            for patched in (True,) if args.quick else (True, False):
                rows.append(check(name, lora, patched, args, capacity))
                print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\ndevice {args.device}, memory {capacity:,} B, {args.steps} steps\n\n{table(rows)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
