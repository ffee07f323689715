"""Rich rendering of a PatchReport: the table of sites and the memory summary."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
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


def sites_table(report: Any) -> Table:
    """One row per site: path, what it computes, consumer, patched or why not, bytes saved per token."""
    table = Table(title=f"Sites of {report.model}", title_justify="left", expand=False)
    table.add_column("module path", overflow="fold")
    table.add_column("activation")
    table.add_column("consumer", overflow="fold")
    table.add_column("patched", overflow="fold")
    table.add_column("saved B/token", justify="right")
    for s in report.sites:
        status = (
            Text("yes", style="green")
            if s.patched
            else Text(f"no: {s.reason or 'not patched'}", style="yellow")
        )
        what = f"{s.activation}(gate) * up" if s.kind == "gated" else s.activation
        table.add_row(s.path, what, str(s.consumer or "-"), status, f"{s.saved_bytes_per_token:,}")
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
        f"  (saved {p.saved_bytes:,} B)",
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


def render_report(console: Console, report: Any, *, header: str | None = None) -> None:
    """Print the table and the summary of ``report``."""
    parts: list[Any] = []
    if header:
        parts.append(Text(header, style="bold"))
    parts.append(sites_table(report) if report.sites else Text("no sites found", style="yellow"))
    parts.append(summary(report))
    console.print(Group(*parts))


def models_table(rows: list[dict[str, Any]]) -> Table:
    """The built-in configs: id, type, layers, hidden, intermediate, activation."""
    table = Table(title="Built-in offline configs (actpatch convert ID --dry-run works with no network)")
    for col, justify in (
        ("id", "left"),
        ("model type", "left"),
        ("layers", "right"),
        ("hidden", "right"),
        ("intermediate", "right"),
        ("activation", "left"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
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


__all__ = ["format_bytes", "models_table", "render_report", "sites_table", "summary", "verify_text"]
