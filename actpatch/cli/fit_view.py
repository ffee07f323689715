"""Rich rendering of a GpuFit (``convert --gpu-memory``): the memory table, the verdict, the assumptions."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .render import format_bytes

OPTIMIZER_NAMES = {"adamw": "AdamW", "adamw-fused": "fused AdamW", "adamw-8bit": "8-bit AdamW",
                   "sgd": "SGD (momentum)", "none": "none"}  # fmt: skip


def fit_table(fit: Any, dtype: str) -> Table:
    """Weights, gradients, optimizer, activations per sample, reserve; largest batch (or sequence) and the
    peak there, before and after patching."""
    lora = f", LoRA r={fit.lora_rank}" if fit.lora_rank else ""
    shape = f"seq {fit.seq_len}" if fit.mode == "batch" else f"batch {fit.batch_size}"
    dtype = "float32 weights, bf16 autocast" if fit.precision == "mixed" else dtype
    title = (
        f"Training memory on a {format_bytes(fit.gpu_memory_bytes)} GPU "
        f"({OPTIMIZER_NAMES[fit.optimizer]}{lora}, {dtype}, {shape})"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    both = lambda n: (format_bytes(n), format_bytes(n))
    table.add_row(f"weights ({fit.parameters / 1e9:.2f} B parameters)", *both(fit.weight_bytes))
    table.add_row(f"gradients ({fit.trainable_parameters / 1e9:.3g} B trainable)", *both(fit.gradient_bytes))
    table.add_row("optimizer states", *both(fit.optimizer_bytes))
    table.add_row("optimizer step buffer", *both(fit.optimizer_step_bytes))
    per_sample = (fit.activation_bytes_per_sample_before, fit.activation_bytes_per_sample_after)
    table.add_row("activations / sample", *(format_bytes(n - fit.loss_bytes_per_sample) for n in per_sample))
    loss = "float32 logit gradients" if fit.loss == "eager" else "fused loss head"
    table.add_row(f"{loss} / sample", *both(fit.loss_bytes_per_sample))
    table.add_row("reserved (CUDA context, fragmentation)", *both(fit.reserved_bytes))
    if fit.mode == "batch":
        best = (fit.max_batch_size_before, fit.max_batch_size_after)
        table.add_row(Text(f"largest batch at seq {fit.seq_len}", style="bold"), *_counts(best))
    else:
        best = (fit.max_seq_len_before, fit.max_seq_len_after)
        table.add_row(Text(f"longest sequence at batch {fit.batch_size}", style="bold"), *_counts(best))
    table.add_row("peak there (max_memory_allocated)", format_bytes(fit.peak_bytes_before),
                  format_bytes(fit.peak_bytes_after))  # fmt: skip
    return table


def _counts(values: tuple[int, int]) -> tuple[Text, Text]:
    return Text(f"{values[0]:,}"), Text(f"{values[1]:,}", style="bold green" if values[1] else "bold red")


def verdict(fit: Any) -> Text:
    """What fits, or that nothing does (and by how much)."""
    what = "batch 1" if fit.mode == "batch" else f"batch {fit.batch_size} and sequence length 1"
    if fit.shortfall_bytes:
        need = fit.gpu_memory_bytes + fit.shortfall_bytes
        return Text(
            f"does not fit even at {what}, patched: needs {format_bytes(need)}, "
            f"{format_bytes(fit.shortfall_bytes)} more than the {format_bytes(fit.gpu_memory_bytes)} GPU",
            style="bold red",
        )
    if fit.mode == "batch":
        before, after, unit = fit.max_batch_size_before, fit.max_batch_size_after, "batch"
    else:
        before, after, unit = fit.max_seq_len_before, fit.max_seq_len_after, "sequence"
    gain = f" ({100 * (after - before) / before:+.0f}%)" if before else ""
    return Text(f"fits: largest {unit} {before:,} -> {after:,}{gain}", style="bold green")


def assumptions(fit: Any) -> Text:
    """The one line under the table that says what the numbers assume."""
    return Text(f"assumes: {fit.assumptions}", style="dim")


def render_fit(console: Any, fit: Any, dtype: str) -> None:
    console.print(Group(fit_table(fit, dtype), assumptions(fit), verdict(fit)))


__all__ = ["assumptions", "fit_table", "render_fit", "verdict"]
