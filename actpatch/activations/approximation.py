"""The inverse-derivative approximation g_b(y) ≈ f'(f_b^{-1}(y)), fitted once per activation.

With d = y - y* >= 0 (y* split into float32 hi + lo so d is exact near the minimum), three segments:

- right branch (x >= x*): w = √d.  x(w) is analytic at w = 0, so f'(x(w)) is a smooth function of w,
  tabulated on n - 1 intervals up to w_flat, past which |f' - 1| < 1e-7; the last interval, up to
  w_max, is the constant 1, and kernels clamp w there: g = 1 exactly for larger y and y = inf.
- left branch near the minimum (y / y* >= 1/2): w = √d too; the left branch is x(-w) of the same
  analytic inverse, so f' is smooth in w up to w_near = √(|y*| / 2).
- left tail (y / y* < 1/2): v = √(log2(y*/y)) in [1, v_max = √126].  v ~ |x| far left, and f'/f is
  smooth in v, so g = y · r(v) keeps a small relative error down to y = 2⁻¹²⁶ |y*|; below that (y / y*
  a float32 subnormal, flushed to zero as the GPU's log2 does) v is clamped at v_max: an absolute
  error under 1e-38.  log2(y*/y) >= 1 here, so an approximate hardware log2 is accurate relative to it.

The kernels need no division, log1p or correctly rounded log.  Each segment is a table of ``n``
degree-``deg`` polynomials in the local variable s ∈ [0, 1] of ``n`` uniform intervals, least-squares
fitted in float64 at Chebyshev nodes to exact inversion.  ``coefficients`` holds one row per power,
highest first, for Horner's rule in float32.  ``table_for`` gives every dtype 10 intervals of degree 6
per segment: its error (~2e-7 in float32, mostly float32's own evaluation) is far below the information
limit, and an interval's 7 coefficients fit the two 16-byte vectors one GPU thread gathers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from .base import Activation

_FLAT_TOL = 1e-7


@dataclass(frozen=True)
class InverseTable:
    """Everything a kernel needs to evaluate g_b(y); y_star_hi/lo, w_max, w_near and v_max are float32."""

    y_star_hi: float
    y_star_lo: float
    x_star: float
    w_max: float
    w_near: float
    v_max: float
    right: torch.Tensor  # [deg + 1, n] float64, highest power first
    near: torch.Tensor
    tail: torch.Tensor

    @property
    def coefficients(self) -> torch.Tensor:
        """All three segments in one table [deg + 1, 3n]: right, near, tail intervals."""
        return torch.cat([self.right, self.near, self.tail], dim=1)

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


def table_for(act: Activation) -> InverseTable:
    """The table the kernels and the reference use."""
    return inverse_table(act, 10, 6)


@cache
def inverse_table(act: Activation, n: int = 10, deg: int = 6) -> InverseTable:
    ys = act.y_star
    hi = _f32(ys)
    lo = _f32(ys - hi)
    x_flat = _flat_beyond(act)
    w_flat = math.sqrt(float(act.f(torch.tensor(x_flat, dtype=torch.float64))) - ys)
    hr = _f32(w_flat / (n - 1))
    w_max = _f32(hr * n)  # intervals 0..n-2 fitted on [0, w_flat]; n-1, past it, is the constant 1
    w_near = _f32(math.sqrt(-ys / 2))
    v_max = _f32(math.sqrt(126.0))  # log2(y*/y) <= 126 while y / y* is a normal float32

    def w_target(right: bool):
        def target(w: torch.Tensor) -> torch.Tensor:
            return act.df(act.invert(ys + w * w, torch.full(w.shape, right)))

        return target

    def tail_target(v: torch.Tensor) -> torch.Tensor:
        x = act.invert(ys * torch.exp2(-v * v), torch.zeros_like(v, dtype=torch.bool))
        return torch.exp(torch.log(-act.df(x)) - act.log_neg_f(x))  # f'/f > 0, without underflow

    right = np.zeros((deg + 1, n))
    right[:, : n - 1] = _fit(np.arange(n - 1) * hr, hr, deg, w_target(True))
    right[deg, n - 1] = 1.0
    near = _fit(np.arange(n) * (w_near / n), w_near / n, deg, w_target(False))
    ht = (v_max - 1.0) / n
    tail = _fit(1.0 + np.arange(n) * ht, ht, deg, tail_target)
    return InverseTable(
        y_star_hi=hi,
        y_star_lo=lo,
        x_star=act.x_star,
        w_max=w_max,
        w_near=w_near,
        v_max=v_max,
        right=torch.from_numpy(right),
        near=torch.from_numpy(near),
        tail=torch.from_numpy(tail),
    )
