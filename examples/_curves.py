"""Compare and plot two loss curves (baseline vs patched) recorded from the same seed and data order."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch


def train_steps(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batches: Iterable,
    loss_of: Callable[..., torch.Tensor],
) -> tuple[list[float], float]:
    """One step per batch: loss_of(batch), backward, gradient clipping at 1.0, the optimizer with a linear
    warm-up over the first tenth of the steps.  Returns the losses and the wall time."""
    batches = list(batches)
    warmup = max(1, len(batches) // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    losses = []
    t0 = time.perf_counter()
    for batch in batches:
        loss = loss_of(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, time.perf_counter() - t0


def max_relative_deviation(baseline: list[float], patched: list[float]) -> tuple[float, int]:
    """max_i |patched_i - baseline_i| / |baseline_i| and the step where it occurs."""
    if len(baseline) != len(patched):
        raise ValueError(f"curves differ in length: {len(baseline)} vs {len(patched)}")
    devs = [abs(p - b) / abs(b) for b, p in zip(baseline, patched, strict=True)]
    step = max(range(len(devs)), key=devs.__getitem__)
    return devs[step], step


def plot(baseline: list[float], patched: list[float], title: str, out: str | Path) -> None:
    """Both curves on top, the relative deviation below; writes a PNG (and the numbers as .json beside it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    steps = list(range(1, len(baseline) + 1))
    rel = [abs(p - b) / abs(b) for b, p in zip(baseline, patched, strict=True)]
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=(3, 1.3))
    ax.plot(steps, baseline, label="baseline (torch activations)", lw=1.6)
    ax.plot(steps, patched, label="patched (actpatch inverted)", lw=1.0, ls="--")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    bx.semilogy(steps, [max(r, 1e-12) for r in rel], color="C2", lw=0.9)
    bx.axhline(0.01, color="C3", ls=":", label="1% bound")
    bx.set_ylabel("|patched − baseline|\n/ baseline")
    bx.set_xlabel("step")
    bx.legend(loc="lower right")
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    out.with_suffix(".json").write_text(
        json.dumps({"title": title, "baseline": baseline, "patched": patched}, indent=1) + "\n"
    )
