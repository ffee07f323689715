"""Pure-PyTorch inverted activations: any device, float32 arithmetic for float32/bf16/fp16.

forward:  y = f(x) with the activation's own eager formula, bits = pack([x >= x*]).
backward: dx = dy · g_b(y), g from the fitted InverseTable (see activations/approximation.py).
"""

from __future__ import annotations

import numpy as np
import torch

from ..activations import Activation, InverseTable, table_for
from .bits import pack_bits, unpack_bits

_TINY = float(torch.finfo(torch.float32).smallest_normal) / 2**23  # smallest subnormal
_COEFFICIENTS: dict[tuple[str, int, int, torch.device], torch.Tensor] = {}


def device_coefficients(act: Activation, table: InverseTable, device: torch.device) -> torch.Tensor:
    """The table's float32 coefficients [deg+1, 2n] on ``device``, cached."""
    key = (act.name, table.n, table.deg, device)
    if key not in _COEFFICIENTS:
        _COEFFICIENTS[key] = table.coefficients.to(device=device, dtype=torch.float32).contiguous()
    return _COEFFICIENTS[key]


def _horner(coef: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Evaluate the piecewise polynomial ``coef`` [deg+1, m] at t measured in interval widths."""
    m = coef.shape[1]
    t = torch.nan_to_num(t, nan=0.0, posinf=float(m)).clamp(0.0, float(m))
    idx = t.floor().clamp(max=m - 1)
    s = t - idx
    idx = idx.long()
    acc = coef[0].take(idx)
    for row in coef[1:]:
        acc = acc.mul_(s).add_(row.take(idx))
    return acc


def right_end(n: int) -> float:
    """The float32 just below n: t on the right branch stops there, at the end of interval n - 1."""
    return float(np.nextafter(np.float32(n), np.float32(0)))


def inverse_derivative(y: torch.Tensor, right: torch.Tensor, act: Activation) -> torch.Tensor:
    """g_b(y) ≈ f'(f_b^{-1}(y)) in float32, elementwise; y any float dtype (its size picks the table,
    ``table_for``), right a bool tensor.

    u = w = √d on the right branch and u = v = √log(y*/y) on the left select intervals of one table:
    t = min(u n / w_max, n⁻) on the right (intervals 0..n-1, the last one the constant 1: past w_max
    too) or n + u n / v_max on the left (n..2n-1).  g = p on the right, y p on the left; NaN for NaN y.
    """
    table = table_for(act, y.dtype)
    coef = device_coefficients(act, table, y.device)
    n = table.n
    y = y.float()
    d = ((y - table.y_star_hi) - table.y_star_lo).clamp_min(0.0)
    q = y / table.y_star_hi
    log_ratio = torch.where(q < 0.5, -torch.log(q.clamp_min(_TINY)), -torch.log1p(d / table.y_star_hi))
    u = torch.where(right, d, log_ratio).clamp_min(0.0).sqrt()
    t = torch.where(right, (u * (n / table.w_max)).clamp_max(right_end(n)), u * (n / table.v_max) + n)
    p = _horner(coef, t)
    return torch.where(y.isnan(), y, torch.where(right, p, y * p))


def forward(x: torch.Tensor, act: Activation) -> tuple[torch.Tensor, torch.Tensor]:
    y = act.forward(x)
    bits = pack_bits(x.float() >= act.x_star)
    return y, bits


def backward(dy: torch.Tensor, y: torch.Tensor, bits: torch.Tensor, act: Activation) -> torch.Tensor:
    right = unpack_bits(bits, y.numel()).view(y.shape)
    g = inverse_derivative(y, right, act)
    return (dy.float() * g).to(dy.dtype)
