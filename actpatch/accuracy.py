"""Gradient accuracy of the inverted activations against the exact derivative and the information limit.

For an input x (in the training dtype) the forward stores y = round(f(x)) and b = [x >= x*].  Exact
inversion of the stored y, x̂ = f_b^{-1}(y) in float64, still misses f'(x) by

    limit(x) = |f'(x̂) - f'(x)|

— the best any implementation can do from (y, b).  actpatch's gradient g(x) (autograd through
actpatch.functional with dy = 1, so rounded to the dtype) passes at x when

    |g(x) - f'(x)| <= 2 · max(limit over x and its 2 neighbours on each side) + tol,

with tol = 1e-5 in float32 and one unit in the last place of f'(x) in bfloat16/float16; and overall
max |g - f'| <= 1.5 · max limit.  Where torch's own gradient is finite, g must be finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import functional
from .activations import ACTIVATIONS, Activation

FP32_TOL = 1e-5
NEIGHBOURS = 2
MAX_RATIO = 1.5

_FUNCTIONAL = {
    "gelu": lambda x: functional.gelu(x),
    "gelu_tanh": lambda x: functional.gelu(x, approximate="tanh"),
    "silu": functional.silu,
    "quick_gelu": functional.quick_gelu,
}


@dataclass
class Accuracy:
    """Per-input errors of one activation in one dtype (float64 tensors, sorted by x)."""

    activation: str
    dtype: torch.dtype
    x: torch.Tensor
    error: torch.Tensor
    limit: torch.Tensor
    bound: torch.Tensor
    nonfinite: int

    @property
    def max_error(self) -> float:
        return float(self.error.max())

    @property
    def max_limit(self) -> float:
        return float(self.limit.max())

    @property
    def ratio(self) -> float:
        return self.max_error / self.max_limit

    @property
    def violations(self) -> int:
        return int((self.error > self.bound).sum())

    @property
    def passed(self) -> bool:
        return self.violations == 0 and self.nonfinite == 0 and self.max_error <= MAX_RATIO * self.max_limit


def all_finite_values(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 16-bit float dtype, ±0 and subnormals included, sorted."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return x[torch.isfinite(x)].sort().values


def float32_grid(act: Activation, n: int = 2_000_001, n_min: int = 400_001) -> torch.Tensor:
    """A dense float32 grid on ±40, a denser one within ±0.05 of x*, and special values."""
    specials = [0.0, 1e-45, 1e-38, 1e-30, 1e-10, 1e-3, 1.0, 1e4, 1e30, 3.4e38]
    s = torch.tensor(specials, dtype=torch.float64)
    x_star = torch.tensor(act.x_star, dtype=torch.float32)
    neighbours = [x_star]
    for direction in (-math.inf, math.inf):
        v = x_star
        for _ in range(16):
            v = torch.nextafter(v, torch.tensor(direction))
            neighbours.append(v)
    parts = [
        torch.linspace(-40.0, 40.0, n, dtype=torch.float64),
        torch.linspace(act.x_star - 0.05, act.x_star + 0.05, n_min, dtype=torch.float64),
        -torch.logspace(0, 2, 20_001, dtype=torch.float64),
        s,
        -s,
        torch.stack(neighbours).double(),
    ]
    return torch.cat(parts).float().unique()


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    info = torch.finfo(dtype)
    mant = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    emin = round(math.log2(info.smallest_normal))
    e = torch.floor(torch.log2(v.abs().clamp_min(info.smallest_normal))).clamp_min(emin)
    return torch.exp2(e - mant)


def _window_max(v: torch.Tensor, k: int) -> torch.Tensor:
    padded = F.pad(v[None, None], (k, k), mode="replicate")[0, 0]
    return padded.unfold(0, 2 * k + 1, 1).max(dim=1).values


def _grad(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad


def measure(act_name: str, x: torch.Tensor) -> Accuracy:
    """Errors of actpatch's gradient at the (sorted, finite) inputs x, on x's device and dtype."""
    act = ACTIVATIONS[act_name]
    dtype = x.dtype
    y, g = _grad(_FUNCTIONAL[act_name], x)
    _, g_torch = _grad(act.forward, x)
    x64 = x.double().cpu()
    exact = act.df_safe(x64)
    right = (x.float() >= act.x_star).cpu()
    x_hat = act.invert(y.double().cpu(), right)
    limit = (act.df_safe(x_hat) - exact).abs()
    g64 = g.double().cpu()
    error = (g64 - exact).abs()
    tol = torch.full_like(exact, FP32_TOL) if dtype == torch.float32 else _ulp(exact, dtype)
    bound = 2.0 * _window_max(limit, NEIGHBOURS) + tol
    nonfinite = int((~torch.isfinite(g64) & torch.isfinite(g_torch.double().cpu())).sum())
    error = torch.nan_to_num(error, nan=math.inf)
    return Accuracy(act_name, dtype, x64, error, limit, bound, nonfinite)


def measure_dtype(act_name: str, dtype: torch.dtype, device: str | torch.device = "cpu") -> Accuracy:
    """All finite values for bf16/fp16, the dense grid for float32."""
    x = float32_grid(ACTIVATIONS[act_name]) if dtype == torch.float32 else all_finite_values(dtype)
    return measure(act_name, x.to(device))
