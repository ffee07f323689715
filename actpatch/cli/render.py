"""Rich rendering of a PatchReport: the table of sites and the memory summary."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text


def format_bytes(n: float) -> str:
    """1536 -> '1.50 KiB' (binary units, 3 significant digits)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def middle_truncate(word: str, width: int) -> str:
    """``word`` cut to ``width`` cells by an ellipsis in its middle, keeping more of its end (the most
    specific part of a module path), and a layer pattern ``{0..31}`` whole where it and its end fit."""
    if cell_len(word) <= width:
        return word
    keep = max(width - 1, 0)
    pattern = word.rfind(".", 0, word.find("{")) + 1 if "{" in word else -1
    if pattern > 0 and len(word) - pattern <= keep:
        head = keep - (len(word) - pattern)
        return (word[:head] if head >= 4 else "") + "…" + word[pattern:]
    head = keep // 3
    return word[:head] + "…" + word[len(word) - (keep - head) :]


class Squeezed:
    """Text that a table column wraps only between words; a word wider than the column (a module path)
    is cut in its middle with '…', never folded mid-name."""

    def __init__(self, text: str, style: str = "") -> None:
        self.text, self.style = text, style

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(min(cell_len(self.text), 8), cell_len(self.text))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        words = (middle_truncate(w, options.max_width) for w in self.text.split(" "))
        yield Text(" ".join(words), style=self.style, overflow="fold")


def kind_text(group: Any) -> str:
    """The activation of a site (group), preceded by its kind unless the name says it ("rms_norm" for a
    norm, "dropout" for a dropout, "silu" for an activation): "gated silu"; a norm's, what it keeps:
    "rms_norm (y)" for one keeping its output, "(x)" its input."""
    name = group.activation if group.kind == "activation" or group.kind in group.activation else None
    name = name or f"{group.kind} {group.activation}"
    return f"{name} ({_KEPT[group.keeps]})" if group.keeps else name


_KEPT = {"output": "y", "input": "x"}
_LEGEND = {"y": "(y) keeps its output, which the next op saves anyway", "x": "(x) keeps its input"}


_MIN_CONSUMER_WIDTH = 24


def sites_table(report: Any, *, all_sites: bool = False, width: int | None = None) -> Table:
    """One row per pattern of sites (:func:`actpatch.report.group_sites`; per site with ``all_sites``):
    path, kind, patched, sites x bytes freed per token by each, in total, and the consumer where ``width``
    leaves room for it.  Only paths shrink, cut in the middle."""
    groups = _groups(report, all_sites)
    if width is None:
        return _table(report.model, groups, consumer=True)
    narrow = _table(report.model, groups, consumer=False)
    room = width - Console(width=10**4).measure(narrow).maximum - 2
    return (
        _table(report.model, groups, consumer=True, consumer_width=room)
        if room >= _MIN_CONSUMER_WIDTH
        else narrow
    )


def _table(model: str, groups: list[Any], *, consumer: bool, consumer_width: int | None = None) -> Table:
    kept = sorted({_KEPT[g.keeps] for g in groups if g.keeps}, reverse=True)
    table = Table(
        title=f"Sites of {model}",
        title_justify="left",
        caption="; ".join(_LEGEND[k] for k in kept) or None,
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, 1, 0, 0),
    )
    table.add_column("module path")
    table.add_column("kind", no_wrap=True)
    table.add_column("patched", no_wrap=True)
    table.add_column("saved\nB/token", justify="right", no_wrap=True)
    table.add_column("total", justify="right", no_wrap=True)
    if consumer:
        table.add_column("consumer", max_width=consumer_width)
    for g in groups:
        table.add_row(
            Squeezed(g.path),
            kind_text(g),
            Text("yes", style="green") if g.patched else Text("no", style="yellow"),
            f"{g.count} × {g.saved_bytes_per_token:,}",
            f"{g.total_bytes_per_token:,}",
            *([Squeezed(g.consumer or "-")] if consumer else []),
        )
    return table


def _groups(report: Any, all_sites: bool) -> list[Any]:
    from ..report import SiteGroup, group_sites

    return [SiteGroup.of(s) for s in report.sites] if all_sites else group_sites(report.sites)


def reasons(report: Any, *, all_sites: bool = False) -> Text:
    """Why each pattern of sites left alone is not patched, one line each."""
    text = Text("not patched:", style="yellow")
    for g in _groups(report, all_sites):
        if not g.patched:
            text.append(f"\n  {g.path}: {g.reason or 'not patched'}", style="")
    return text


def kind_breakdown(report: Any) -> Table:
    """Bytes freed by each kind of patched site, and their share of the activation memory before."""
    from ..report import savings_by_kind

    table = Table.grid(padding=(0, 2))
    for justify in ("left", "left", "right", "right", "right"):
        table.add_column(justify=justify)  # type: ignore[arg-type]
    for i, k in enumerate(savings_by_kind(report)):
        label = "freed by kind:" if i == 0 else ""
        table.add_row(
            label, k.label, f"{k.sites} sites", format_bytes(k.saved_bytes), f"{100 * k.share:.1f}%"
        )
    return table


def summary(report: Any) -> Text:
    """Sites patched, the shape, and activation memory before -> after in bytes and %."""
    p = report.projection
    patched = sum(1 for s in report.sites if s.patched)
    text = Text()
    text.append(f"{patched} of {len(report.sites)} sites patched", style="bold")
    text.append(f"  ·  batch {p.batch_size} × seq {p.seq_len}, {p.dtype}")
    if report.dry_run:
        text.append("  ·  dry run", style="dim")
    text.append("\nactivation memory: ")
    text.append(format_bytes(p.activation_bytes_before))
    text.append(" -> ")
    text.append(format_bytes(p.activation_bytes_after), style="bold green")
    text.append(f"  (saved {format_bytes(p.saved_bytes)}, {100 * p.saved_fraction:.1f}%)", style="bold")
    text.append(
        f"\n                   {p.activation_bytes_before:,} B -> {p.activation_bytes_after:,} B"
        f" (saved {p.saved_bytes:,} B)",
        style="dim",
    )
    return text


def verify_text(result: Any) -> Text:
    """One line on the --verify comparison."""
    style = "green" if result.ok else "bold red"
    return Text.assemble(
        ("verify ", "bold"),
        f"(batch {result.batch_size} × seq {result.seq_len}, {result.dtype}): output max |Δ| "
        f"{result.output_max_abs_diff:.3g} (rel {result.output_rel:.3g}), gradients max |Δ| "
        f"{result.grad_max_abs_diff:.3g} (rel {result.grad_rel:.3g}, {result.n_grads} tensors)  ",
        ("ok" if result.ok else f"FAILED (tolerance rel {result.output_tol:g} / {result.grad_tol:g})", style),
    )


def render_report(
    console: Console, report: Any, *, header: str | None = None, all_sites: bool = False
) -> None:
    """Print the table of ``report``'s sites (grouped by pattern unless ``all_sites``), why some are not
    patched, the bytes freed by each kind and the summary."""
    parts: list[Any] = []
    if header:
        parts.append(Text(header, style="bold"))
    if report.sites:
        parts.append(sites_table(report, all_sites=all_sites, width=console.width))
        if any(not s.patched for s in report.sites):
            parts.append(reasons(report, all_sites=all_sites))
        parts.append(kind_breakdown(report))
    else:
        parts.append(Text("no sites found", style="yellow"))
    parts.append(summary(report))
    console.print(Group(*parts))


def models_table(rows: list[dict[str, Any]]) -> Table:
    """The built-in configs: id (never cut: it is what a user copies), type, layers, hidden, MLP width,
    activation."""
    table = Table(
        title="Built-in offline configs (actpatch convert ID --dry-run works with no network)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, 1, 0, 0),
    )
    table.add_column("id", no_wrap=True)
    table.add_column("type")
    for col in ("layers", "hidden", "MLP\nwidth"):
        table.add_column(col, justify="right")
    table.add_column("activation")
    for r in rows:
        table.add_row(
            r["id"],
            r["model_type"],
            str(r["layers"]),
            str(r["hidden"]),
            str(r["intermediate"]),
            r["activation"],
        )
    return table


__all__ = [
    "Squeezed",
    "format_bytes",
    "kind_breakdown",
    "middle_truncate",
    "models_table",
    "render_report",
    "sites_table",
    "summary",
    "verify_text",
]
