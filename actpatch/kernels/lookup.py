"""Whole-dtype lookup tables for 16-bit inputs: a bfloat16 or float16 tensor holds one of 65,536 values.

forward_table(act, dtype, device)   int16 [65536]: the bits of y = torch's own ``act.forward`` of the x
                                    with bit pattern i, on ``device`` (so the kernel's y is that op's,
                                    bitwise); the kernel compares x >= x* itself;
table_of(fn, key, dtype, device)    the same for any elementwise ``fn`` (a module's own Python formula),
                                    cached under ``key``;
backward_table_of(fn, key, act, dtype, device)
                                    float32 [2 · 65536] for such an ``fn``: g at (branch, y) is the midpoint
                                    of f' over the inputs of that branch ``fn`` rounds to y, the estimate at
                                    the information limit of ``fn``'s own rounding (a Python formula's y is
                                    coarser than torch's op's); the reference's g where ``fn`` never gives y;
backward_table(act, dtype, device)  float32 [2 · 65536]: g = ``reference.inverse_derivative`` at the y with
                                    bit pattern i, left branch (entries 0..65535) then right, computed on the
                                    CPU, so that dx = dy · g is the reference's backward bitwise everywhere.

The Triton kernels then read one table entry per element instead of evaluating erf/exp (forward) or the
inverse's log, square root and polynomial (backward); the fp16 SiLU and QuickGELU forwards compute instead
(``triton.ARITHMETIC_FLOAT16``), checked against the forward table.  Tables are built once per (activation,
dtype, device) and cached: 128 KiB + 512 KiB.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from ..activations import Activation
from .reference import inverse_derivative

DTYPES = (torch.bfloat16, torch.float16)
_FORWARD: dict[tuple[Hashable, torch.dtype, torch.device], torch.Tensor] = {}
_BACKWARD: dict[tuple, torch.Tensor] = {}
_GATHER_ORDER: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(table) -> (table, its gather order)


def every_value(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 65,536 values of a 16-bit dtype, value i having bit pattern i."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).roll(2**15).view(dtype).to(device)


def forward_table(act: Activation, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return table_of(act.forward, act.name, dtype, device)


def gather_order(table: torch.Tensor) -> torch.Tensor:
    """A float16 forward table (int16 [65536]) with entry i moved to index rotr3(i), its bits rotated right
    by 3, the order the forward kernel reads it in (cached per table).  Values with 8 significant bits or
    fewer (bf16's: an input on the bfloat16 grid, as ``randn(dtype=bfloat16).to(float16)``) end in three
    zero bits, so their entries lie side by side as in a bfloat16 table instead of 16 bytes apart: a
    warp's gathers touch 8 times fewer cache lines (H200: 0.125 ms against 0.163 for 8192 x 14336).  An
    input that uses every float16 bit touches as many lines either way (within 2% on the H200)."""
    hit = _GATHER_ORDER.get(id(table))
    if hit is None or hit[0] is not table:
        j = torch.arange(65536, device=table.device)
        hit = _GATHER_ORDER[id(table)] = (table, table[((j << 3) | (j >> 13)) & 0xFFFF].contiguous())
    return hit[1]


def table_of(
    fn: Callable[[torch.Tensor], torch.Tensor], key: Hashable, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """int16 [65536]: the bits of ``fn`` at every value of ``dtype`` on ``device`` (built without grad)."""
    key = (key, dtype, device)
    if key not in _FORWARD:
        with torch.no_grad():
            _FORWARD[key] = fn(every_value(dtype, device)).view(torch.int16).contiguous()
    return _FORWARD[key]


def backward_table_of(
    fn: Callable[[torch.Tensor], torch.Tensor],
    key: Hashable,
    act: Activation,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """float32 [2 · 65536]: the minimax g of ``fn``'s (branch, y) classes, y as ``fn`` gives it on ``device``
    (a GPU's tanh may round otherwise than the CPU's), built on the CPU in float64."""
    key = ("backward", key, dtype, device)
    if key not in _BACKWARD:
        x = every_value(dtype)
        with torch.no_grad():
            y = fn(x.to(device)).cpu()
        slot = ((x.float() >= act.x_star).long() << 16) | (y.view(torch.int16).long() & 0xFFFF)
        known = torch.isfinite(x) & torch.isfinite(y)
        slot, df = slot[known], act.df_safe(x[known].double())
        lo = torch.full((2 * 65536,), torch.inf, dtype=torch.float64).scatter_reduce(0, slot, df, "amin")
        hi = torch.full((2 * 65536,), -torch.inf, dtype=torch.float64).scatter_reduce(0, slot, df, "amax")
        g = backward_table(act, dtype, torch.device("cpu")).double()
        g = torch.where(torch.isfinite(lo), (lo + hi) / 2, g)
        _BACKWARD[key] = g.float().to(device).contiguous()
    return _BACKWARD[key]


def backward_table(act: Activation, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (act.name, dtype, device)
    if key not in _BACKWARD:
        y = every_value(dtype)
        g = [inverse_derivative(y, torch.full(y.shape, side), act) for side in (False, True)]
        _BACKWARD[key] = torch.cat(g).to(device).contiguous()
    return _BACKWARD[key]
