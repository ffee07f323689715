"""GELU with the error function: f(x) = x Φ(x),  f'(x) = Φ(x) + x φ(x).

x* = -0.7517915, y* = -0.1699712.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Activation

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _f(x: torch.Tensor) -> torch.Tensor:
    return x * torch.special.ndtr(x)


def _df(x: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(x) + x * torch.exp(-0.5 * x * x) * _INV_SQRT_2PI


def _log_neg_f(x: torch.Tensor) -> torch.Tensor:
    return torch.log(-x) + torch.special.log_ndtr(x)


GELU = Activation(
    name="gelu",
    forward=lambda x: F.gelu(x, approximate="none"),
    f=_f,
    df=_df,
    log_neg_f=_log_neg_f,
)
