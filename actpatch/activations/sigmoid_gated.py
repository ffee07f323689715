"""Activations of the form f(x) = x σ(h(x)).

f'(x) = σ(h) + x σ(h) σ(-h) h'(x);  log(-f(x)) = log(-x) + log σ(h(x)) for x < 0.

- SiLU / Swish:    h(x) = x                        x* = -1.2784645, y* = -0.2784645
- QuickGELU:       h(x) = 1.702 x                  x* = -0.7511535, y* = -0.1636095
- GELU (tanh):     h(x) = 2 k (x + a x³), k = √(2/π), a = 0.044715, since 0.5 (1 + tanh u) = σ(2u)
                                                   x* = -0.7524614, y* = -0.1700408
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .base import Activation

QUICK_GELU_SCALE = 1.702
_K = math.sqrt(2.0 / math.pi)
_A = 0.044715


def _family(
    name: str,
    forward: Callable[[torch.Tensor], torch.Tensor],
    h: Callable[[torch.Tensor], torch.Tensor],
    dh: Callable[[torch.Tensor], torch.Tensor],
) -> Activation:
    def f(x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(h(x))

    def df(x: torch.Tensor) -> torch.Tensor:
        hx = h(x)
        s = torch.sigmoid(hx)
        return s + x * s * torch.sigmoid(-hx) * dh(x)

    def log_neg_f(x: torch.Tensor) -> torch.Tensor:
        return torch.log(-x) + F.logsigmoid(h(x))

    return Activation(name=name, forward=forward, f=f, df=df, log_neg_f=log_neg_f)


def quick_gelu_forward(x: torch.Tensor) -> torch.Tensor:
    """x σ(1.702 x), written as Hugging Face's QuickGELUActivation and CLIP write it."""
    return x * torch.sigmoid(QUICK_GELU_SCALE * x)


SILU = _family("silu", F.silu, lambda x: x, lambda x: torch.ones_like(x))
QUICK_GELU = _family(
    "quick_gelu",
    quick_gelu_forward,
    lambda x: QUICK_GELU_SCALE * x,
    lambda x: torch.full_like(x, QUICK_GELU_SCALE),
)
GELU_TANH = _family(
    "gelu_tanh",
    lambda x: F.gelu(x, approximate="tanh"),
    lambda x: 2.0 * _K * (x + _A * x * x * x),
    lambda x: 2.0 * _K * (1.0 + 3.0 * _A * x * x),
)
