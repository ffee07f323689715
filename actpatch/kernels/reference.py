"""Pure-PyTorch inverted activations: any device, float32 arithmetic for float32/bf16/fp16.

forward:  y = f(x) with the activation's own eager formula, bits = pack([x >= x*]).
backward: dx = dy · g_b(y), g from the fitted InverseTable (see activations/approximation.py).
"""

from __future__ import annotations

import torch

from ..activations import Activation, InverseTable, inverse_table
from .bits import pack_bits, unpack_bits

_TABLES: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _device_tables(act: Activation, table: InverseTable, device: torch.device):
    key = (act.name, device)
    if key not in _TABLES:
        _TABLES[key] = (
            table.right.to(device=device, dtype=torch.float32),
            table.left.to(device=device, dtype=torch.float32),
        )
    return _TABLES[key]


def _horner(coef: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Evaluate the piecewise polynomial ``coef`` [deg+1, n] at t measured in interval widths."""
    n = coef.shape[1]
    t = torch.nan_to_num(t, nan=0.0, posinf=float(n)).clamp(0.0, float(n))
    idx = t.floor().clamp(max=n - 1)
    s = t - idx
    c = coef[:, idx.long()]
    acc = c[0]
    for row in c[1:]:
        acc = torch.addcmul(row, acc, s)
    return acc


def inverse_derivative(y: torch.Tensor, right: torch.Tensor, act: Activation) -> torch.Tensor:
    """g_b(y) ≈ f'(f_b^{-1}(y)) in float32, elementwise; y any float dtype, right a bool tensor."""
    table = inverse_table(act)
    coef_r, coef_l = _device_tables(act, table, y.device)
    y = y.float()
    d = ((y - table.y_star_hi) - table.y_star_lo).clamp_min(0.0)

    w = d.sqrt()
    g_right = _horner(coef_r, w * (table.n / table.w_max))
    g_right = torch.where(w >= table.w_max, torch.ones_like(g_right), g_right)

    q = y / table.y_star_hi
    log_ratio = torch.where(q < 0.5, -torch.log(q), -torch.log1p(d / table.y_star_hi))
    v = log_ratio.clamp_min(0.0).sqrt()
    g_left = y * _horner(coef_l, v * (table.n / table.v_max))
    g = torch.where(right, g_right, g_left)
    return torch.where(y.isnan(), y, g)


def forward(x: torch.Tensor, act: Activation) -> tuple[torch.Tensor, torch.Tensor]:
    y = act.forward(x)
    bits = pack_bits(x >= act.x_star)
    return y, bits


def backward(dy: torch.Tensor, y: torch.Tensor, bits: torch.Tensor, act: Activation) -> torch.Tensor:
    right = unpack_bits(bits, y.numel()).view(y.shape)
    g = inverse_derivative(y, right, act)
    return (dy.float() * g).to(dy.dtype)
