"""What an invertible activation is: f, f' and the branch point, in float64 (pure math, no autograd).

Every activation here has one minimum x* with f' < 0 on (-inf, x*) and f' > 0 on (x*, inf).
The output y = f(x) plus one bit b = [x >= x*] determines x, so f'(x) = f'(f_b^{-1}(y)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Activation:
    """One activation family.

    ``forward`` is the exact eager formula actpatch reproduces (any dtype, any device);
    ``f``, ``df`` and ``log_neg_f`` (log(-f(x)) for x < 0, finite deep in the left tail) are float64 math.
    """

    name: str
    forward: Fn
    f: Fn
    df: Fn
    log_neg_f: Fn
    x_star: float = field(init=False)
    y_star: float = field(init=False)

    def __post_init__(self) -> None:
        x_star = _bisect(self.df, -3.0, 0.0, increasing=True)
        object.__setattr__(self, "x_star", x_star)
        object.__setattr__(self, "y_star", float(self.f(torch.tensor(x_star, dtype=torch.float64))))

    def invert(self, y: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """x = f_b^{-1}(y) in float64 by bisection.

        y below the minimum maps to x*, y >= 0 on the left branch to -inf, y = +inf on the right to +inf.
        """
        y = y.to(torch.float64)
        right = right.to(torch.bool)
        big = y.abs().nan_to_num(posinf=0.0) * 1.01 + 2.0
        # Left branch: f decreases from 0 (x -> -inf) to y* (x = x*); right: increases from y* to inf.
        lo = torch.where(right, torch.full_like(y, self.x_star), -(3.0 * big + 400.0))
        hi = torch.where(right, big, torch.full_like(y, self.x_star))
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            fm = self.f(mid)
            go_right = torch.where(right, fm < y, fm > y)
            lo = torch.where(go_right, mid, lo)
            hi = torch.where(go_right, hi, mid)
        x = 0.5 * (lo + hi)
        x = torch.where(y <= self.y_star, torch.full_like(x, self.x_star), x)
        x = torch.where(~right & (y >= 0), torch.full_like(x, -math.inf), x)
        return torch.where(right & torch.isposinf(y), y, x)

    def df_safe(self, x: torch.Tensor) -> torch.Tensor:
        """f'(x) in float64 with the limits f'(-inf) = 0 and f'(inf) = 1."""
        x = x.to(torch.float64)
        g = self.df(x.clamp(-1e4, 1e4))
        g = torch.where(x < -1e4, torch.zeros_like(g), g)
        return torch.where(x > 1e4, torch.ones_like(g), g)


def _bisect(fn: Fn, lo: float, hi: float, *, increasing: bool) -> float:
    a = torch.tensor(lo, dtype=torch.float64)
    b = torch.tensor(hi, dtype=torch.float64)
    for _ in range(200):
        m = 0.5 * (a + b)
        if (fn(m) < 0) == increasing:
            a = m
        else:
            b = m
    return float(0.5 * (a + b))
