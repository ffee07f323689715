"""The inverse-derivative approximation g_b(y) ≈ f'(f_b^{-1}(y)), fitted once per activation.

With d = y - y* >= 0 (y* split into float32 hi + lo so d is exact near the minimum):

- right branch (x >= x*): w = √d.  x(w) is analytic at w = 0, so f'(x(w)) is a smooth function of w,
  tabulated on n - 1 intervals up to w_flat, past which |f' - 1| < 1e-7; the last interval, up to
  w_max, is the constant 1, and kernels clamp w there: g = 1 exactly for larger y and y = inf.
- left branch (x < x*):  v = √(log(y*/y)), computed as √(-log1p(d/y*)) near the minimum and
  √(-log(y/y*)) in the tail.  v ~ |x| - const far left, and f'/f is smooth in v, so g = y · r(v)
  keeps a small relative error down to subnormal y; v is clamped at v_max (y below float32's range).

Each branch is a table of ``n`` degree-``deg`` polynomials in the local variable s ∈ [0, 1] of ``n``
uniform intervals, least-squares fitted in float64 at Chebyshev nodes to exact inversion.  The
coefficients are stored highest power first, one row per power, for Horner's rule in float32.
``table_for(act, dtype)`` picks the size: 16 intervals of degree 6 for float32 y (fit error ~1e-9,
far below float32 rounding); 32 of degree 3 for bf16/fp16 y (~1e-5, far below their 2^-8 / 2^-11
rounding), which spares the GPU kernel three gathers and three FMAs per element.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from .base import Activation

# y below this (in magnitude) is zero in float32, subnormals included.
_SMALLEST_Y = 1e-46
_FLAT_TOL = 1e-7


@dataclass(frozen=True)
class InverseTable:
    """Everything a kernel needs to evaluate g_b(y); y_star_hi/lo, w_max and v_max are float32 values."""

    y_star_hi: float
    y_star_lo: float
    x_star: float
    w_max: float
    v_max: float
    right: torch.Tensor  # [deg + 1, n] float64
    left: torch.Tensor  # [deg + 1, n] float64

    @property
    def coefficients(self) -> torch.Tensor:
        """Both branches in one table [deg + 1, 2n]: right-branch intervals first, then the left's."""
        return torch.cat([self.right, self.left], dim=1)

    @property
    def n(self) -> int:
        return self.right.shape[1]

    @property
    def deg(self) -> int:
        return self.right.shape[0] - 1


def _f32(v: float) -> float:
    return float(np.float32(v))


def _flat_beyond(act: Activation) -> float:
    """Smallest x past which |f'(x) - 1| < _FLAT_TOL everywhere to the right."""
    x = torch.linspace(0.0, 200.0, 400_001, dtype=torch.float64)
    off = (act.df(x) - 1.0).abs() >= _FLAT_TOL
    return float(x[off.nonzero().max()]) + 1e-3


def _fit(t0: np.ndarray, h: float, deg: int, target) -> np.ndarray:
    """Per-interval least-squares polynomials of ``target`` on [t0_i, t0_i + h], in s = (t - t0_i) / h."""
    k = 3 * (deg + 1)
    s = 0.5 - 0.5 * np.cos((2 * np.arange(k) + 1) * np.pi / (2 * k))
    t = t0[:, None] + h * s[None, :]
    vals = target(torch.from_numpy(t.reshape(-1))).numpy().reshape(t.shape)
    vander = np.vander(s, deg + 1)  # highest power first
    coef, *_ = np.linalg.lstsq(vander, vals.T, rcond=None)
    return coef  # [deg + 1, n]


def table_for(act: Activation, dtype: torch.dtype) -> InverseTable:
    """The table the kernels use for y of ``dtype``."""
    return inverse_table(act, 32, 3) if dtype.itemsize == 2 else inverse_table(act, 16, 6)


@cache
def inverse_table(act: Activation, n: int = 16, deg: int = 6) -> InverseTable:
    ys = act.y_star
    hi = _f32(ys)
    lo = _f32(ys - hi)
    x_flat = _flat_beyond(act)
    w_flat = math.sqrt(float(act.f(torch.tensor(x_flat, dtype=torch.float64))) - ys)
    hr = _f32(w_flat / (n - 1))
    w_max = _f32(hr * n)  # intervals 0..n-2 fitted on [0, w_flat]; n-1, past it, is the constant 1
    v_max = _f32(math.sqrt(math.log(ys / -_SMALLEST_Y)))

    def right_target(w: torch.Tensor) -> torch.Tensor:
        x = act.invert(ys + w * w, torch.ones_like(w, dtype=torch.bool))
        return act.df(x)

    def left_target(v: torch.Tensor) -> torch.Tensor:
        x = act.invert(ys * torch.exp(-v * v), torch.zeros_like(v, dtype=torch.bool))
        return torch.exp(torch.log(-act.df(x)) - act.log_neg_f(x))  # f'/f > 0, without underflow

    hl = v_max / n
    right = np.zeros((deg + 1, n))
    right[:, : n - 1] = _fit(np.arange(n - 1) * hr, hr, deg, right_target)
    right[deg, n - 1] = 1.0
    left = _fit(np.arange(n) * hl, hl, deg, left_target)
    return InverseTable(
        y_star_hi=hi,
        y_star_lo=lo,
        x_star=act.x_star,
        w_max=w_max,
        v_max=v_max,
        right=torch.from_numpy(right),
        left=torch.from_numpy(left),
    )
