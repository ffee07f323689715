"""Pure-PyTorch inverted activations: any device, float32 arithmetic for float32/bf16/fp16.

forward:  y = f(x) with the activation's own eager formula (or the entry of x in a given 16-bit forward
          table), bits = pack([x >= x*]).
backward: dx = dy · g_b(y), g from the fitted InverseTable (see activations/approximation.py).
"""

from __future__ import annotations

import numpy as np
import torch

from ..activations import Activation, InverseTable, table_for
from .bits import pack_bits, unpack_bits

_NORMAL = float(torch.finfo(torch.float32).smallest_normal)
_COEFFICIENTS: dict[tuple[str, int, int, torch.device], torch.Tensor] = {}


def device_coefficients(act: Activation, table: InverseTable, device: torch.device) -> torch.Tensor:
    """The table's float32 coefficients [deg+1, 3n] on ``device``, cached."""
    key = (act.name, table.n, table.deg, device)
    if key not in _COEFFICIENTS:
        _COEFFICIENTS[key] = table.coefficients.to(torch.float32).to(device)
    return _COEFFICIENTS[key]


def _horner(coef: torch.Tensor, m: int, t: torch.Tensor) -> torch.Tensor:
    """Evaluate the piecewise polynomial ``coef`` [deg+1, >= m] of m intervals at t in interval widths."""
    t = torch.nan_to_num(t, nan=0.0, posinf=float(m)).clamp(0.0, float(m))
    idx = t.floor().clamp(max=m - 1)
    s = t - idx
    idx = idx.long().reshape(-1)  # index_select, not take: as fast, and vmap has a batching rule for it
    acc = coef[0].index_select(0, idx).view_as(t)
    for row in coef[1:]:
        acc = acc.mul_(s).add_(row.index_select(0, idx).view_as(t))
    return acc


def right_end(n: int) -> float:
    """The float32 just below n: t stops there, at the end of a segment's interval n - 1."""
    return float(np.nextafter(np.float32(n), np.float32(0)))


def inverse_derivative(y: torch.Tensor, right: torch.Tensor, act: Activation) -> torch.Tensor:
    """g_b(y) ≈ f'(f_b^{-1}(y)) in float32, elementwise (the table of ``table_for``); y any float dtype,
    right a bool tensor.

    With d = max(y - y*, 0) and q = y / y*, t indexes one table of three segments of n intervals:
    right branch t = min(√d · n / w_max, n⁻) (the last interval the constant 1: past w_max too);
    left with q >= 1/2, min(n + √d · n / w_near, (2n)⁻); left with q < 1/2 (the tail),
    clamp(2n + (v - 1) · n / (v_max - 1), 2n, (3n)⁻) with v = √(log2(1/q)), q below float32's normal range
    flushed to 0 (v = inf: the tail's end), as the GPU kernel's log2 flushes it.
    g = p, or y · p in the tail; NaN for NaN y.
    """
    table = table_for(act)
    coef = device_coefficients(act, table, y.device)
    n, end = table.n, right_end(table.n)
    y = y.float()
    d = ((y - table.y_star_hi) - table.y_star_lo).clamp_min(0.0)
    q = y / table.y_star_hi
    tail = ~right & (q < 0.5)
    u = torch.where(tail, -torch.log2(torch.where(q < _NORMAL, 0.0, q)), d).sqrt()
    # each segment's offset added before clamping: n + n⁻ rounds to 2n, the tail's first interval
    t_tail = ((u - 1.0) * (n / (table.v_max - 1.0)) + 2 * n).clamp(2 * n, right_end(3 * n))
    t_near = (u * (n / table.w_near) + n).clamp_max(right_end(2 * n))
    t = torch.where(right, (u * (n / table.w_max)).clamp_max(end), torch.where(tail, t_tail, t_near))
    p = _horner(coef, 3 * n, t)
    return torch.where(y.isnan(), y, torch.where(tail, y * p, p))


def _entries(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table[idx] in idx's shape (index_select: vmap has a batching rule for it, take has none)."""
    return table.index_select(0, idx.reshape(-1)).view(idx.shape)


def forward(
    x: torch.Tensor, act: Activation, table: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, bits); y = ``table``'s entry of x's bit pattern (int16 [65536], for 16-bit x) when one is given."""
    y = (
        act.forward(x)
        if table is None
        else _entries(table, x.view(torch.int16).long() & 0xFFFF).view(x.dtype)
    )
    bits = pack_bits(x.float() >= act.x_star)
    return y, bits


def backward(
    dy: torch.Tensor, y: torch.Tensor, bits: torch.Tensor, act: Activation, table: torch.Tensor | None = None
) -> torch.Tensor:
    """dx = dy · g; g = ``table``'s entry of (branch, y's bits) (float32 [2 · 65536], 16-bit y) if given."""
    right = unpack_bits(bits, y.numel()).view(y.shape)
    if table is not None:
        g = _entries(table, (right.long() << 16) | (y.view(torch.int16).long() & 0xFFFF))
    else:
        g = inverse_derivative(y, right, act)
    return (dy.float() * g).to(dy.dtype)
