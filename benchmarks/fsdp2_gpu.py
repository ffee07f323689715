"""FSDP2 through accelerate, one process on one GPU: a small Llama in bf16, unpatched vs patched.

Each run builds the same model from the same seed, trains ``--steps`` steps on the same batches through
``Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2, ...), mixed_precision="bf16")``
and records the loss per step, the peak memory (``torch.cuda.max_memory_allocated``) and the median step
time.  ``--patch after`` patches the model after ``accelerator.prepare`` (as ActPatchCallback does inside
a Trainer, on the sharded model); ``before`` patches the plain model first.

    python benchmarks/fsdp2_gpu.py                          # baseline, then patched: one process each
    python benchmarks/fsdp2_gpu.py --patch after --steps 50 --json out.json

Without CUDA it prints "SKIPPED: ..." and exits 0 (multi-GPU FSDP has its own benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


def run(args: argparse.Namespace, patched: bool) -> dict:
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from transformers import LlamaConfig, LlamaForCausalLM

    import actpatch

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128, num_key_value_heads=8,
        max_position_embeddings=args.seq,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
        reshard_after_forward=True,
        state_dict_type="SHARDED_STATE_DICT",
    )
    accelerator = Accelerator(fsdp_plugin=plugin, mixed_precision="bf16")
    report = None
    if patched and args.patch == "before":
        report = actpatch.patch_model(model, batch_size=args.batch, seq_len=args.seq, dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, opt = accelerator.prepare(model, opt)
    if patched and args.patch == "after":
        report = actpatch.patch_model(model, batch_size=args.batch, seq_len=args.seq, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 32000, (args.batch, args.seq), generator=g) for _ in range(args.steps)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()  # sharded parameters (and anything left over)
    with_grad = sum(p.grad is not None for p in model.parameters())
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]  # DTensor shards
    param_bytes = sum(t.numel() * t.element_size() for t in local)
    losses, times = [], []
    for x in batches:
        x = x.to(accelerator.device)
        torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=x, labels=x).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    out = {
        "patched": patched,
        "patch": args.patch if patched else None,
        "fsdp_version": accelerator.state.fsdp_plugin.fsdp_version,
        "distributed_type": str(accelerator.distributed_type),
        "losses": losses,
        "resident_bytes": resident,
        "param_bytes": param_bytes,
        "params_with_grad_at_start": with_grad,
        "peak_bytes": torch.cuda.max_memory_allocated(),
        "peak_above_start_bytes": torch.cuda.max_memory_allocated() - resident,
        "median_step_s": statistics.median(times[2:] or times),
        "patched_sites": len(report.patched_sites) if report else 0,
        "projected_saved_bytes": report.projection.saved_bytes if report else 0,
    }
    accelerator.end_training()
    return out


def run_in_child(args: argparse.Namespace, patched: bool, port: int) -> dict:
    """``run`` in a fresh process: accelerate's state is one per process, and each run needs its own."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run.json")
        argv = [sys.executable, __file__, "--child", "patched" if patched else "baseline", "--json", out]
        for k, v in vars(args).items():  # the parent's options, but its own output and role
            if k not in ("json", "child"):
                argv += [f"--{k}", str(v)]
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
               "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}  # fmt: skip
        subprocess.run(argv, env=env, check=True)
        with open(out) as f:
            return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--patch", choices=("before", "after"), default="before")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", choices=("baseline", "patched"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("SKIPPED: FSDP2 benchmark needs a CUDA device (none found)")
        return
    if args.child:
        with open(args.json, "w") as f:
            json.dump(run(args, patched=args.child == "patched"), f)
        return
    base = run_in_child(args, patched=False, port=29531)
    pat = run_in_child(args, patched=True, port=29532)
    dev = max(abs(p - b) / abs(b) for b, p in zip(base["losses"], pat["losses"], strict=True))
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  {pat['distributed_type']}")
    print(f"FSDP{pat['fsdp_version']}, bf16, batch {args.batch} x seq {args.seq}, {args.layers} layers")
    print(f"patched sites: {pat['patched_sites']} (patched {args.patch} prepare)")
    less = base["peak_above_start_bytes"] - pat["peak_above_start_bytes"]
    print(f"peak memory: {base['peak_bytes'] / 2**30:.3f} GiB -> {pat['peak_bytes'] / 2**30:.3f} GiB")
    print(
        f"allocated at the start of the loop: {base['resident_bytes']:,} B -> {pat['resident_bytes']:,} B "
        f"(parameters {base['param_bytes']:,} B -> {pat['param_bytes']:,} B; holding a .grad: "
        f"{base['params_with_grad_at_start']} -> "
        f"{pat['params_with_grad_at_start']})"
    )
    print(
        f"peak above the start of the loop: {base['peak_above_start_bytes']:,} B -> "
        f"{pat['peak_above_start_bytes']:,} B ({less:,} B less; projected by actpatch: "
        f"{pat['projected_saved_bytes']:,} B)"
    )
    print(f"median step: {base['median_step_s'] * 1e3:.1f} ms -> {pat['median_step_s'] * 1e3:.1f} ms")
    print(f"max relative loss deviation over {args.steps} steps: {dev:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "baseline": base, "patched": pat, "max_rel_loss_dev": dev}, f, indent=1
            )
    if dev >= 0.01 or pat["patched_sites"] == 0:
        sys.exit("FAIL: loss deviates by >= 1% or nothing was patched")


if __name__ == "__main__":
    main()
