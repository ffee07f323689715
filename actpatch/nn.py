"""Drop-in modules for the inverted activations (same outputs, less memory kept for backward)."""

from __future__ import annotations

import torch
from torch import nn

from . import functional


class InvertedGELU(nn.Module):
    """GELU that keeps its output and 1 bit per element for backward instead of its input."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"InvertedGELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.gelu(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class InvertedSiLU(nn.Module):
    """SiLU / Swish x σ(x) that keeps its output and 1 bit per element for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.silu(x)


class InvertedQuickGELU(nn.Module):
    """QuickGELU x σ(1.702 x) that keeps its output and 1 bit per element for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.quick_gelu(x)


class PackedDropout(nn.Dropout):
    """``nn.Dropout`` (the same outputs and gradients, bitwise) that keeps its mask as 1 bit per element.

    A subclass, so code that finds dropouts by ``isinstance`` (or sets ``.p``) still finds this one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(x)
        return functional.dropout(x, self.p, self.training)


__all__ = ["InvertedGELU", "InvertedQuickGELU", "InvertedSiLU", "PackedDropout"]
