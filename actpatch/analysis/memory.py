"""Memory model: bytes saved for backward as a function of batch, sequence length and dtype.

The probe runs at a few small shapes; each quantity (the total, and what each site frees) is fitted to
``c0 + c1·S + c2·B + c3·B·S + c4·S² + c5·B·S²`` — exact for transformer forwards, where saved tensors are
per token (B·S), per sequence position (rotary tables, S), per attention score (B·S², S²) or constant.
When every probe has batch 1 (a projection for batch 1) the B terms drop out.

Batch 1 is not the B → 1 end of that surface, so it is fitted from batch-1 probes alone (seq 8, 16, 24
for ``c0 + c1·S + c2·S²``).  A size-1 dim has no stride to honour: GPT-2's ``value`` [B, H, S, D], a slice
of its fused ``c_attn`` output [B, S, 3E], reshapes to [B·H, S, D] as a view at B = 1, so CPU attention
keeps the whole 3·S·E storage where at B ≥ 2 it saves a B·S·E copy; a fit from batches 2 and 3 misses
those 2·S·E a layer at batch 1 (-5.3% on tests' tiny GPT-2).  Within batch 1 every saved tensor is a
polynomial of that form in S (GPT-2, GPT-NeoX, Llama, BERT on CPU; GPT-2, GPT-NeoX on CUDA).

Models whose input length the config fixes (vision, audio encoders) fit ``c0 + c2·B``; user-given example
inputs fit ``c·B·S``.  Bytes are split into floating-point tensors of the model's dtype, which scale to
the projection dtype, and the rest (ids, masks, branch bits, tensors kept in float32), which don't.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..report import Site

SEQ_PROBES = (8, 16, 24)
# Batch 1 is often special-cased (masks dropped, other attention kernels): a projection for batch 1 is
# fitted to batch-1 probes only, any other to batches 2 and 3.
BATCH_PROBES = {True: (1,), False: (2, 3)}


@dataclass(frozen=True)
class Bytes:
    """Bytes at one probe shape: ``scalable`` in the model's dtype, ``fixed`` in any other dtype."""

    scalable: float = 0.0
    fixed: float = 0.0

    def __add__(self, other: Bytes) -> Bytes:
        return Bytes(self.scalable + other.scalable, self.fixed + other.fixed)

    @property
    def total(self) -> float:
        return self.scalable + self.fixed


def probe_shapes(
    seq_dependent: bool, max_seq: int | None, fixed: tuple[int, int] | None, batch_size: int
) -> list[tuple[int, int]]:
    """The (batch, seq) shapes the probe runs at, for a projection at ``batch_size``."""
    if fixed is not None:
        return [fixed]
    batches = BATCH_PROBES[batch_size == 1]
    if not seq_dependent:
        return [(b, SEQ_PROBES[0]) for b in batches]
    seqs = SEQ_PROBES
    if max_seq is not None and max_seq < seqs[-1]:
        seqs = tuple(sorted({max(1, max_seq * k // 3) for k in (1, 2, 3)}))
    return [(b, s) for s in seqs for b in batches]


class Fit:
    """Bytes(batch, seq) fitted to the probes; ``at(batch, seq, ratio)`` scales dtype-bound bytes by ratio."""

    def __init__(self, shapes: list[tuple[int, int]], values: list[Bytes], kind: str) -> None:
        self.kind = kind
        self.batched = len({b for b, _ in shapes}) > 1
        a = torch.tensor([self._features(b, s) for b, s in shapes], dtype=torch.float64)
        y = torch.tensor([[v.scalable, v.fixed] for v in values], dtype=torch.float64)
        self.coef = torch.linalg.lstsq(a, y, driver="gelsd").solution

    def _features(self, b: int, s: int) -> list[float]:
        if self.kind == "fixed":
            return [b * s]
        if self.kind == "batch":
            return [1.0, b] if self.batched else [1.0]
        if not self.batched:
            return [1.0, s, s * s]
        return [1.0, s, b, b * s, s * s, b * s * s]

    def at(self, batch: int, seq: int, ratio: float) -> float:
        scalable, fixed = (torch.tensor(self._features(batch, seq), dtype=torch.float64) @ self.coef).tolist()
        return scalable * ratio + fixed


@dataclass(frozen=True)
class Projector:
    """Bytes saved for backward at any (batch, seq): the fits of one analysis.  ``(batch, seq)`` gives
    (before, freed): the total, and the sum over the sites patched (never below 0 each); ``freed[i]`` is
    the fit of ``sites[i]``, which counts while the report keeps it patched (a later decision, under
    torch.compile or Liger-Kernel, may leave it out).  A projector from batch-1 probes (``batched``
    False) is right at batch 1 only."""

    total: Fit
    freed: tuple[Fit, ...]
    sites: tuple[Site, ...]
    ratio: float
    max_seq: int | None = None

    @property
    def batched(self) -> bool:
        return self.total.batched

    @property
    def kind(self) -> str:
        return self.total.kind

    def site(self, i: int, batch: int, seq: int) -> float:
        return max(self.freed[i].at(batch, seq, self.ratio), 0.0) if self.sites[i].patched else 0.0

    def freed_by_kind(self, batch: int, seq: int) -> dict[str, float]:
        """What patching frees at (batch, seq), per kind of the sites patched."""
        out: dict[str, float] = {}
        for i, site in enumerate(self.sites):
            if site.patched:
                out[site.kind] = out.get(site.kind, 0.0) + self.site(i, batch, seq)
        return out

    def __call__(self, batch: int, seq: int) -> tuple[float, float]:
        before = self.total.at(batch, seq, self.ratio)
        return before, sum(self.site(i, batch, seq) for i in range(len(self.freed)))


def fit_kind(seq_dependent: bool, fixed: tuple[int, int] | None) -> str:
    return "fixed" if fixed is not None else ("seq" if seq_dependent else "batch")
