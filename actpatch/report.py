"""What :func:`actpatch.analyze` and :func:`actpatch.patch_model` return.

Contract (the CLI and the manifest rely on it; ``to_dict()`` returns exactly these keys)::

    PatchReport  model: str            config._name_or_path, else the model's class name
                 dry_run: bool         True when the model is on the meta device (no weights)
                 sites: list[Site]
                 projection: Projection
    Site         path: str             module path (e.g. "model.layers.3.mlp.act_fn"); for activations that
                                       cannot be swapped, "<calling module path>:<what was called>#<n>"
                 activation: str       "gelu", "gelu_tanh", "silu", "quick_gelu", or the name of an
                                       activation actpatch cannot invert ("relu", "relu2", a class name, ...)
                 consumer: str | None  the op that saves its output ("<module path> (<op>)"), else the op
                                       that uses it, else None
                 patched: bool         patched (for analyze: would be patched by patch_model)
                 reason: str | None    why not, when not patched
                 saved_bytes_per_token: int   bytes of saved activations freed per token (batch x seq
                                       position) at the projection's dtype, 0 when not patched
                 kind: str             "activation" (the activation module is swapped), "gated" (path
                                       is a gated MLP whose act(gate) * up is fused), "norm" (path is an
                                       RMSNorm, activation "rms_norm", or a LayerNorm, "layer_norm") or
                                       "dropout" (a dropout swapped for one keeping its mask as bits;
                                       activation "dropout"); "cast" (path is an nn.Linear that
                                       shares one autocast cast of its input with the others reading
                                       it; activation "to bfloat16"); "liger" (never patched: a module,
                                       forward or function Liger-Kernel runs and actpatch leaves to it;
                                       activation: Liger's name for it)
                 keeps: str            a norm's: "output" (its output, shared with the op saving it, and
                                       1/σ per row) or "input" (x and 1/rms); "" for other kinds
    Projection   batch_size: int, seq_len: int, dtype: str ("bfloat16")
                 activation_bytes_before: int   bytes saved for backward by one forward (parameters
                                                excluded) at that shape and dtype, unpatched
                 activation_bytes_after: int    the same with the patched sites swapped
                 saved_bytes: int, saved_fraction: float
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Site:
    """One activation found in the model, and whether (or why not) it is patched."""

    path: str
    activation: str
    consumer: str | None = None
    patched: bool = False
    reason: str | None = None
    saved_bytes_per_token: int = 0
    kind: str = "activation"
    keeps: str = ""


@dataclass
class Projection:
    """Saved-activation memory of one training forward at a given shape and dtype, before and after."""

    batch_size: int
    seq_len: int
    dtype: str
    activation_bytes_before: int
    activation_bytes_after: int
    saved_bytes: int = field(init=False)
    saved_fraction: float = field(init=False)

    def __post_init__(self) -> None:
        self.saved_bytes = self.activation_bytes_before - self.activation_bytes_after
        before = self.activation_bytes_before
        self.saved_fraction = self.saved_bytes / before if before > 0 else 0.0


@dataclass
class PatchReport:
    """The sites found in a model and the projected memory saved by patching them."""

    model: str
    dry_run: bool
    sites: list[Site]
    projection: Projection
    # for patch_model, not part of to_dict(): gated or norm site path -> its named parts
    # (``analysis.gated.GatedParts``, ``analysis.norms.NormParts``)
    parts: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # not part of to_dict() either: the bytes at any (batch, seq) (``analysis.memory.Projector``)
    projector: Any = field(default=None, repr=False, compare=False)

    @property
    def patched_sites(self) -> list[Site]:
        """The sites that are (or, for analyze, would be) patched."""
        return [s for s in self.sites if s.patched]

    @property
    def skipped_sites(self) -> list[Site]:
        """The sites left as they are, each with its reason."""
        return [s for s in self.sites if not s.patched]

    def to_dict(self) -> dict[str, Any]:
        """All fields of the contract as JSON-ready nested dicts and lists."""
        d = asdict(self)
        del d["parts"], d["projector"]
        return d

    def __str__(self) -> str:
        return self.to_text()

    def to_text(self, *, all_sites: bool = False) -> str:
        """The sites, one line per :func:`group_sites` pattern (per site with ``all_sites``), the bytes
        freed by each kind and the projection."""
        p = self.projection
        lines = [
            f"{self.model}: {len(self.patched_sites)} of {len(self.sites)} sites patched"
            + ("  (dry run on meta)" if self.dry_run else ""),
        ]
        groups = [SiteGroup.of(s) for s in self.sites] if all_sites else group_sites(self.sites)
        for g in groups:
            keeps = f" keeps {g.keeps}" if g.keeps else ""
            lines.append(f"  {g.path}  [{g.kind}: {g.activation}{keeps}] x{g.count}  {_status_text(g)}")
        freed = [f"{k.label} {k.saved_bytes:,} B ({100 * k.share:.1f}%)" for k in savings_by_kind(self)]
        if freed:
            lines.append("freed by kind: " + ", ".join(freed))
        lines.append(
            f"batch {p.batch_size} x seq {p.seq_len}, {p.dtype}: saved activations "
            f"{p.activation_bytes_before:,} B -> {p.activation_bytes_after:,} B "
            f"(-{p.saved_bytes:,} B, {100 * p.saved_fraction:.1f}%)"
        )
        return "\n".join(lines)


def _status_text(g: SiteGroup) -> str:
    if not g.patched:
        return f"not patched: {g.reason}"
    each = f"-{g.saved_bytes_per_token:,} B/token"
    return (
        f"patched  ({each} each, -{g.total_bytes_per_token:,} in all)"
        if g.count > 1
        else f"patched  ({each})"
    )


@dataclass
class SiteGroup:
    """Sites that differ only in the integer components of their module paths (the layer numbers) and
    agree on all else: one pattern such as ``model.layers.{0..31}.mlp``.  ``consumer`` and ``reason`` are
    patterns too; ``saved_bytes_per_token`` is each site's."""

    path: str
    activation: str
    consumer: str | None
    patched: bool
    reason: str | None
    saved_bytes_per_token: int
    kind: str
    keeps: str
    sites: list[Site]

    @classmethod
    def of(cls, site: Site) -> SiteGroup:
        """The group of one site."""
        s = site
        per_token = s.saved_bytes_per_token
        return cls(s.path, s.activation, s.consumer, s.patched, s.reason, per_token, s.kind, s.keeps, [s])

    @property
    def count(self) -> int:
        return len(self.sites)

    @property
    def total_bytes_per_token(self) -> int:
        """Bytes freed per token by all the sites of the group."""
        return self.saved_bytes_per_token * self.count


_PATH = re.compile(r"[A-Za-z_]\w*(?:\.\w+)+")  # a dotted module path, possibly inside a sentence
_SLOT = "\0"


def _hollow(text: str | None) -> tuple[str | None, tuple[int, ...]]:
    """``text`` with the integer components of its module paths replaced by _SLOT, and those integers."""
    if text is None:
        return None, ()
    numbers: list[int] = []

    def hollow_path(match: re.Match[str]) -> str:
        parts = match.group().split(".")
        numbers.extend(int(p) for p in parts if _is_index(p))
        return ".".join(_SLOT if _is_index(p) else p for p in parts)

    return _PATH.sub(hollow_path, text), tuple(numbers)


def _is_index(part: str) -> bool:
    return part.isascii() and part.isdigit()


def _refs(numbers: tuple[int, ...], path_numbers: tuple[int, ...]) -> tuple[int | str, ...]:
    """Each number as the index of the path's slot at the same position when equal to it, else as a
    constant ("=5"): a consumer or reason that follows the site's layer number groups with it."""
    return tuple(
        i if i < len(path_numbers) and n == path_numbers[i] else f"={n}" for i, n in enumerate(numbers)
    )


def _fill(
    template: str | None, refs: tuple[int | str, ...], slots: tuple[tuple[int, ...], ...]
) -> str | None:
    """``template`` with each _SLOT replaced by its slot's values ({a..b}, {a,b,c}) or its constant."""
    if template is None:
        return None
    pieces = template.split(_SLOT)
    values = [r[1:] if isinstance(r, str) else _format_indices(slots[r]) for r in refs]
    return pieces[0] + "".join(v + piece for v, piece in zip(values, pieces[1:], strict=True))


def _format_indices(values: tuple[int, ...]) -> str:
    """(3,) -> "3"; (0, 1, 2) -> "{0..2}"; (0, 2, 5) -> "{0,2,5}"; (0, 1, 2, 7) -> "{0..2,7}"."""
    if len(values) == 1:
        return str(values[0])
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return "{" + ",".join(f"{r[0]}..{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs) + "}"


def group_sites(sites: list[Site]) -> list[SiteGroup]:
    """``sites`` grouped by pattern, in the order of each group's first site.

    Sites group when their paths differ only in integer components and their kind, activation, patched,
    reason and bytes per token agree (consumer and reason may follow the path's numbers).  Each group is
    a full product of its index sets: slots are merged one at a time from the last, so a layer whose
    experts differ from the others' gets rows of its own.
    """
    rows: list[tuple[tuple[Any, ...], tuple[tuple[int, ...], ...], list[Site]]] = []
    for s in sites:
        path, numbers = _hollow(s.path)
        consumer, consumer_numbers = _hollow(s.consumer)
        reason, reason_numbers = _hollow(s.reason)
        key = (path, s.kind, s.activation, s.keeps, s.patched, s.saved_bytes_per_token, consumer, reason,
               _refs(consumer_numbers, numbers), _refs(reason_numbers, numbers))  # fmt: skip
        rows.append((key, tuple((n,) for n in numbers), [s]))
    for slot in reversed(range(max((len(r[1]) for r in rows), default=0))):
        rows = _merge_slot(rows, slot)
    return [_group(key, slots, members) for key, slots, members in rows]


def _merge_slot(rows: list[Any], slot: int) -> list[Any]:
    """Rows that agree on everything but the values of ``slot`` merged into one (first-seen order)."""
    merged: dict[tuple[Any, ...], tuple[Any, tuple[tuple[int, ...], ...], list[Site]]] = {}
    for key, slots, members in rows:
        if len(slots) <= slot:
            merged[(key, slots)] = (key, slots, members)
            continue
        other = (key, slots[:slot], slots[slot + 1 :])
        if other in merged:
            _, seen, seen_members = merged[other]
            values = tuple(sorted({*seen[slot], *slots[slot]}))
            merged[other] = (key, (*seen[:slot], values, *seen[slot + 1 :]), seen_members + members)
        else:
            merged[other] = (key, slots, members)
    return list(merged.values())


def _group(key: tuple[Any, ...], slots: tuple[tuple[int, ...], ...], members: list[Site]) -> SiteGroup:
    path, kind, activation, keeps, patched, per_token, consumer, reason, consumer_refs, reason_refs = key
    return SiteGroup(
        path=_fill(path, tuple(range(len(slots))), slots) or "",
        activation=activation,
        consumer=_fill(consumer, consumer_refs, slots),
        patched=patched,
        reason=_fill(reason, reason_refs, slots),
        saved_bytes_per_token=per_token,
        kind=kind,
        keeps=keeps,
        sites=members,
    )


KIND_LABELS: dict[str, str] = {}  # site kind -> its name in the report, filled by ``actpatch.kinds``


@dataclass
class KindSaving:
    """Bytes freed by the patched sites of one kind at the projection's shape, and their share of the
    activation memory before patching."""

    kind: str
    label: str
    sites: int
    saved_bytes: int
    share: float


def savings_by_kind(report: PatchReport) -> list[KindSaving]:
    """Per kind with patched sites, in order of first appearance: saved_bytes_per_token x tokens summed."""
    p = report.projection
    tokens = p.batch_size * p.seq_len
    by_kind: dict[str, list[Site]] = {}
    for s in report.sites:
        if s.patched:
            by_kind.setdefault(s.kind, []).append(s)
    savings = []
    for kind, sites in by_kind.items():
        freed = tokens * sum(s.saved_bytes_per_token for s in sites)
        share = freed / p.activation_bytes_before if p.activation_bytes_before > 0 else 0.0
        savings.append(KindSaving(kind, KIND_LABELS.get(kind, kind), len(sites), freed, share))
    return savings
