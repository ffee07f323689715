"""Drop-in modules for the inverted activations (same outputs, less memory kept for backward).

Each takes an optional ``formula``: an elementwise module computing the same activation with its own
rounding (GPT-2's ``NewGELUActivation``, ``FastGELUActivation``), whose output is then returned bitwise
(``actpatch.functional``); it is held as a plain attribute, not a submodule (paths and state_dict stay).
"""

from __future__ import annotations

import torch
from torch import nn

from . import functional
from .functional import Formula


class _Inverted(nn.Module):
    def __init__(self, formula: Formula | None = None) -> None:
        super().__init__()
        self.__dict__["formula"] = formula

    def extra_repr(self) -> str:
        return "" if self.formula is None else f"formula={type(self.formula).__name__}"


class InvertedGELU(_Inverted):
    """GELU that keeps its output and 1 bit per element for backward instead of its input."""

    def __init__(self, approximate: str = "none", formula: Formula | None = None) -> None:
        super().__init__(formula)
        if approximate not in ("none", "tanh"):
            raise ValueError(f"InvertedGELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.gelu(x, self.approximate, formula=self.formula)

    def extra_repr(self) -> str:
        return ", ".join(filter(None, (f"approximate={self.approximate!r}", super().extra_repr())))


class InvertedSiLU(_Inverted):
    """SiLU / Swish x σ(x) that keeps its output and 1 bit per element for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.silu(x, formula=self.formula)


class InvertedQuickGELU(_Inverted):
    """QuickGELU x σ(1.702 x) that keeps its output and 1 bit per element for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.quick_gelu(x, formula=self.formula)


class InvertedReLUSquared(nn.Module):
    """Squared ReLU relu(x)² (transformers' ``ReLUSquaredActivation``, ``ACT2FN["relu2"]``), bitwise, that
    keeps only its output for backward (r = √y; eager keeps relu's output r too)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.relu_squared(x)


class PackedDropout(nn.Dropout):
    """``nn.Dropout`` (the same outputs and gradients, bitwise) that keeps its mask as 1 bit per element.

    A subclass, so code that finds dropouts by ``isinstance`` (or sets ``.p``) still finds this one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(x)
        return functional.dropout(x, self.p, self.training)


__all__ = ["InvertedGELU", "InvertedQuickGELU", "InvertedReLUSquared", "InvertedSiLU", "PackedDropout"]
