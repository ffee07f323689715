"""The whole training step a user runs: peak memory and step time of actpatch, Liger-Kernel and both.

    python benchmarks/whole_step.py [--models llama3.2-1b llama3-8b-8l gpt2-medium] [--variants ...]
                                    [--repeats 2] [--steps 6] [--json FILE]
    python benchmarks/whole_step.py --device cpu --quick      # the logic, tiny shapes (Liger variants
                                                              # need TRITON_INTERPRET=1 on a CPU)
    python benchmarks/whole_step.py --plot FILE.json PNG      # bars of peak memory per variant

Models from transformers configs, random weights, float32 master weights, ``torch.optim.AdamW(fused=True)``,
the model's own LM loss on random tokens under ``torch.autocast(bfloat16)``; one step = forward, backward,
optimizer step, grads set to None.  Shapes (batch x seq): llama3.2-1b, Llama-3.2-1B's (16 layers, hidden
2048, intermediate 8192, 32 heads, 8 KV heads, vocab 128,256, tied embeddings), 4 x 4096; llama3-8b-8l,
Llama-3-8B's with 8 layers, 1 x 8192; gpt2-medium, 8 x 1024 (Liger-Kernel has no GPT-2 patch: eager and
actpatch only).  Variants:

    eager                 the model as transformers builds it
    actpatch              actpatch.patch_model(model) (defaults), called under the step's autocast
    liger-flce            apply_liger_kernel_to_llama(model=model, rope=False, rms_norm=False, swiglu=False):
                          fused linear cross entropy only
    actpatch+liger-flce   both: Liger first, then patch_model
    liger                 apply_liger_kernel_to_llama(model=model): RoPE, RMSNorm, SwiGLU, fused linear CE
    actpatch+liger        Liger's full patch, then patch_model: it takes over the SwiGLU MLPs (and the norms
                          that can keep their output), Liger keeps RoPE, the loss and the other norms

Each variant runs in its own process (``--one``), repeats interleaved (variant order rotated each
repeat); per process: 2 warm-up steps, then ``--steps`` timed steps (median wall time, synchronised by
the loss), peak ``torch.cuda.max_memory_allocated`` over the timed steps, the first step's loss; with
``--profile N``, the N CUDA kernels taking most time per step over 2 more steps (torch.profiler, as
``profile_step.py``).  The table gives the median over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("eager", "actpatch", "liger-flce", "actpatch+liger-flce", "liger", "actpatch+liger")
SHAPES = {"llama3.2-1b": (4, 4096), "llama3-8b-8l": (1, 8192), "gpt2-medium": (8, 1024)}
LIGER_MODELS = ("llama3.2-1b", "llama3-8b-8l")
PLANNED = ("report", "running", "dry_run")  # the fit planner's predictions (planned_peaks)


def build(name: str, quick: bool) -> torch.nn.Module:
    """The model ``name`` with random weights (``quick``: the same family, tiny)."""
    import transformers as tf

    vocab = 1024 if quick else None
    if name == "gpt2-medium":
        h, layers = (64, 2) if quick else (1024, 24)
        cfg = tf.GPT2Config(n_layer=layers, n_embd=h, n_head=4 if quick else 16, vocab_size=vocab or 50257)
        return tf.GPT2LMHeadModel(cfg)
    big = name == "llama3-8b-8l"
    h, inter, layers = (64, 128, 2) if quick else ((4096, 14336, 8) if big else (2048, 8192, 16))
    cfg = tf.LlamaConfig(
        vocab_size=vocab or 128256, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=4 if quick else 32, num_key_value_heads=2 if quick else 8,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=not big,
        attn_implementation="sdpa",
    )  # fmt: skip
    return tf.LlamaForCausalLM(cfg)


def apply(variant: str, model: torch.nn.Module, batch: int, seq: int, device: str) -> str:
    """Patch ``model`` as ``variant`` says; returns the actpatch report's one-line summary, or ""."""
    if "liger" in variant:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        only_loss = dict(rope=False, rms_norm=False, swiglu=False) if variant.endswith("flce") else {}
        apply_liger_kernel_to_llama(model=model, **only_loss)
    if not variant.startswith("actpatch"):
        return ""
    import actpatch
    from actpatch.integrations.trainer import summarize

    with torch.autocast(device, torch.bfloat16):
        return summarize(actpatch.patch_model(model, batch_size=batch, seq_len=seq))


def planned_peaks(
    variant: str, name: str, model: torch.nn.Module, batch: int, seq: int, device: str, quick: bool
) -> dict:
    """The fit planner's peak (GiB) for this step: float32 weights, bf16 autocast, AdamW (fused on CUDA),
    the loss head as the variant runs it, activations probed under the step's autocast — from the actpatch
    report (``actpatch.analyze``: "after" for the actpatch variants, "before" for the others, where a
    Liger module counts as the eager one it replaced), from the model as it runs
    (``fit.running_activations``), and from a dry run of the model on meta under
    :class:`~actpatch.meta_autocast.MetaAutocast` and, for Liger's loss, :class:`~actpatch.meta_fused_loss.
    MetaFusedLoss` (``convert --dry-run --mixed-precision [--loss fused]``; None for Liger's full patch:
    its RoPE, RMSNorm and SwiGLU kernels have no meta stand-in)."""
    import actpatch
    from actpatch import fit

    kw = dict(optimizer="adamw-fused" if device == "cuda" else "adamw", precision="mixed",
              loss="fused" if "liger" in variant else "eager")  # fmt: skip
    with torch.autocast(device, torch.bfloat16):
        report = actpatch.analyze(model, batch_size=batch, seq_len=seq)
        running = fit.running_activations(model, batch)
    patched = variant.startswith("actpatch")
    by_report = fit.training_memory(model, report, **kw)
    by_running = fit.training_memory(model, running, **kw)
    gib = lambda m: m.peak(batch, seq, patched) / 2**30
    return {"report": gib(by_report), "running": gib(by_running),
            "dry_run": None if variant.endswith("liger") else gib(dry_run(name, batch, seq, quick, kw)),
            "activations_report": by_report.activations(batch, seq, patched) / 2**30,
            "activations_running": by_running.activations(batch, seq, True) / 2**30,
            "loss_head": by_report.loss(batch, seq) / 2**30}  # fmt: skip


def dry_run(name: str, batch: int, seq: int, quick: bool, kw: dict) -> object:
    """The TrainingMemory of model ``name`` built on meta and probed under MetaAutocast (and MetaFusedLoss
    for the fused loss)."""
    import contextlib

    import actpatch
    from actpatch import fit
    from actpatch.meta_autocast import MetaAutocast
    from actpatch.meta_fused_loss import MetaFusedLoss

    with torch.device("meta"):
        model = build(name, quick)
    head = model.get_output_embeddings().weight
    with MetaAutocast(), MetaFusedLoss(head) if kw["loss"] == "fused" else contextlib.nullcontext():
        return fit.training_memory(model, actpatch.analyze(model, batch_size=batch, seq_len=seq), **kw)


def phase_peaks(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, device: str) -> dict:
    """Peak GiB of each phase of one more step (CUDA): the forward with its loss, the backward, the
    optimizer step."""
    peaks = {}

    def phase(name: str) -> None:
        peaks[name] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()

    torch.cuda.reset_peak_memory_stats()
    with torch.autocast(device, torch.bfloat16):
        loss = model(input_ids=x, labels=x).loss
    phase("forward")
    loss.backward()
    del loss
    phase("backward")
    opt.step()
    opt.zero_grad(set_to_none=True)
    phase("optimizer")
    return peaks


def with_prediction(result: dict, planned: dict, phases: dict) -> dict:
    """``result`` with the planner's peaks, their ratios to the measured peak, and the phases' peaks."""
    peak = result["peak_gib"]
    ratios = {f"ratio_{k}": planned[k] / peak if peak and planned[k] else None for k in PLANNED}
    return {**result, "predicted_gib": planned, **ratios, "phase_peaks_gib": phases}


def run_one(args: argparse.Namespace) -> dict:
    """One variant in this process: its median step (ms), peak memory (GiB) and first loss."""
    device = args.device
    torch.manual_seed(0)
    with torch.device(device):
        model = build(args.models[0], args.quick)
    model.train()
    batch, seq = (2, 32) if args.quick else SHAPES[args.models[0]]
    summary = apply(args.one, model, batch, seq, device)
    planned = planned_peaks(args.one, args.models[0], model, batch, seq, device, args.quick)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
    x = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    x = x.to(device)
    cuda = device == "cuda"

    def step() -> float:
        with torch.autocast(device, torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    losses = [step() for _ in range(2)]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()  # loss.item() synchronizes
        times.append(1e3 * (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    result = {"variant": args.one, "step_ms": statistics.median(times), "peak_gib": peak,
              "loss": losses[0], "actpatch": summary}  # fmt: skip
    result = with_prediction(result, planned, phase_peaks(model, opt, x, device) if cuda else {})
    if args.profile:
        from profile_step import profile_mode

        wall, kernels = profile_mode(step, 2)
        result["kernels_us"] = dict(kernels.most_common(args.profile))
    return result


def variants_of(model: str, chosen: list[str]) -> list[str]:
    return [v for v in chosen if model in LIGER_MODELS or "liger" not in v]


def run_all(args: argparse.Namespace) -> dict:
    """Every (model, variant) in its own process, ``repeats`` times, interleaved."""
    results: dict = {}
    for model in args.models:
        chosen = variants_of(model, args.variants)
        runs: dict[str, list[dict]] = {v: [] for v in chosen}
        for r in range(args.repeats):
            for v in chosen[r % len(chosen) :] + chosen[: r % len(chosen)]:
                cmd = [sys.executable, __file__, "--one", v, "--models", model, "--device", args.device,
                       "--steps", str(args.steps), "--profile", str(args.profile)]  # fmt: skip
                cmd += ["--quick"] if args.quick else []
                out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
                if out.returncode != 0:
                    sys.exit(f"whole_step: {model} {v} failed:\n{out.stderr[-3000:]}")
                runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"{model} {v}: {runs[v][-1]}", file=sys.stderr, flush=True)
        results[model] = {v: summarize_runs(rs) for v, rs in runs.items()}
    return results


def summarize_runs(runs: list[dict]) -> dict:
    """Medians over the repeats; the first run's loss, summary and kernel profile."""
    return {"step_ms": statistics.median(r["step_ms"] for r in runs),
            "peak_gib": statistics.median(r["peak_gib"] for r in runs), "loss": runs[0]["loss"],
            "step_ms_runs": [r["step_ms"] for r in runs], "actpatch": runs[0]["actpatch"],
            "kernels_us": runs[0].get("kernels_us", {}), "predicted_gib": runs[0]["predicted_gib"],
            "phase_peaks_gib": runs[0]["phase_peaks_gib"]}  # fmt: skip


def table(results: dict) -> str:
    lines = []
    for model, rows in results.items():
        batch, seq = SHAPES[model]
        lines += [f"\n{model}, batch {batch} x seq {seq}",
                  "| stack | peak GiB | step ms | first loss | planned GiB: report, running, dry (x peak) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for v, r in rows.items():
            lines.append(f"| {v} | {r['peak_gib']:.2f} | {r['step_ms']:.1f} | {r['loss']:.4f} | "
                         f"{planned(r['predicted_gib'], r['peak_gib'])} |")  # fmt: skip
    return "\n".join(lines)


def planned(predicted: dict, peak: float) -> str:
    """The planner's two peaks, each with its ratio to the measured one (none on a CPU)."""
    ratio = lambda k: f" ({predicted[k] / peak:.3f})" if peak else ""
    return ", ".join(f"{predicted[k]:.2f}{ratio(k)}" if predicted[k] else "-" for k in PLANNED)


def plot(results_file: str, png: str) -> None:
    """One bar per variant and model: peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(results_file) as f:
        results = json.load(f)["results"]
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.6), squeeze=False)
    for ax, (model, rows) in zip(axes[0], results.items(), strict=True):
        names, peaks = list(rows), [r["peak_gib"] for r in rows.values()]
        bars = ax.barh(names[::-1], peaks[::-1], color="#4c72b0")
        ax.bar_label(bars, fmt="%.1f", padding=2)
        ax.set_xlim(0, 1.15 * max(peaks))
        batch, seq = SHAPES[model]
        ax.set_title(f"{model}, batch {batch} x seq {seq}")
        ax.set_xlabel("peak memory of a training step (GiB)")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    p.add_argument("--profile", type=int, default=0, help="CUDA kernels: the N taking most time per step")
    p.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--plot", nargs=2, metavar=("RESULTS_JSON", "PNG"))
    args = p.parse_args()
    if args.plot:
        return plot(*args.plot)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("whole_step: no CUDA device; use --device cpu --quick for the logic")
    if args.one:
        return print(json.dumps(run_one(args)))
    results = run_all(args)
    print(table(results))
    if args.json:
        device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        env = {"torch": torch.__version__, "device": device}
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "env": env, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
