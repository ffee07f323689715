"""A picture of a GpuFit: the two phases of a training step as stacked bars, before and after patching,
with the GPU's memory as a line.  Needs matplotlib (``pip install 'actpatch[plot]'``)."""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path
from typing import Any

from .report import KIND_LABELS

FORMATS = (".png", ".svg")
EXTRA = "matplotlib is not installed: pip install 'actpatch[plot]'"
_GiB = float(1 << 30)


class PlotError(ValueError):
    """A plot that cannot be drawn or written (the extra missing, an unknown extension, a bad path)."""


def check_target(path: Path) -> None:
    """Raise PlotError, before any work, when ``path`` cannot take the plot."""
    if path.suffix.lower() not in FORMATS:
        raise PlotError(f"--plot {path}: unknown extension {path.suffix or '(none)'!r}; use .png or .svg")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK) or path.is_dir():
        raise PlotError(f"--plot {path}: cannot write there")
    _pyplot()


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotError(EXTRA) from e
    return plt


def bars(memory: Any, fit: Any) -> dict[str, dict[str, float]]:
    """Bar label -> stacked parts in bytes: the start of the backward and the optimizer step, before and
    after, at the largest batch (or sequence) each fits (1 when none); activations split into what stays
    and what patching frees, per site kind."""
    out = {}
    for patched, name in ((False, "before"), (True, "after")):
        batch, seq = _shape(fit, patched)
        base = {"weights": memory.weights, "optimizer states": memory.optimizer}
        freed = {} if patched else memory.projector.freed_by_kind(batch, seq)
        kept = memory.activations(batch, seq, True)
        acts = {"activations kept": kept, **{f"freed: {KIND_LABELS.get(k, k)}": v for k, v in freed.items()}}
        where = f"batch {batch}" if fit.mode == "batch" else f"seq {seq}"
        out[f"{name}, {where}\nbackward"] = {
            **base,
            **acts,
            "float32 logit gradients": memory.loss(batch, seq),
        }
        out[f"{name}\noptimizer step"] = {
            **base,
            "gradients": memory.gradients,
            "optimizer step buffer": memory.step,
        }
    return out


def _shape(fit: Any, patched: bool) -> tuple[int, int]:
    side = "after" if patched else "before"
    if fit.mode == "batch":
        return max(getattr(fit, f"max_batch_size_{side}"), 1), fit.seq_len
    return fit.batch_size, max(getattr(fit, f"max_seq_len_{side}"), 1)


def plot_fit(memory: Any, fit: Any, path: Path, title: str) -> None:
    """Draw ``bars(memory, fit)`` with the GPU's memory and the usable part (less the reserve) as lines;
    written to a temporary file beside ``path`` and moved in place, so nothing is half-written."""
    check_target(path)
    plt = _pyplot()
    data = bars(memory, fit)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors: dict[str, Any] = {}
    palette = itertools.cycle(plt.get_cmap("tab10").colors)
    for x, parts in enumerate(data.values()):
        bottom = 0.0
        for label, value in parts.items():
            if value <= 0:
                continue
            if label not in colors:
                colors[label] = next(palette)
            hatch = "//" if label.startswith("freed") else None
            ax.bar(x, value / _GiB, bottom=bottom, color=colors[label], hatch=hatch, label=label, width=0.6)
            bottom += value / _GiB
    ax.axhline(fit.gpu_memory_bytes / _GiB, color="black", label="GPU memory")
    usable = (fit.gpu_memory_bytes - fit.reserved_bytes) / _GiB
    ax.axhline(usable, color="black", linestyle="--", label="less the reserve")
    ax.set_xticks(range(len(data)), list(data))
    ax.set_ylabel("GiB")
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _save(fig: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
