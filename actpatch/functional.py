"""Autograd-aware inverted activations.

Each function returns exactly what its torch counterpart returns.  When a gradient will be taken
(grad mode on, x requires grad, x float32/bfloat16/float16) autograd keeps only the returned output y
and ceil(n/8) bytes of branch bits [x >= x*]; the backward computes f'(x) from them.  Otherwise
(no grad, inference_mode, float64) the plain torch op runs and nothing extra is computed or kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .activations import ACTIVATIONS
from .activations.sigmoid_gated import quick_gelu_forward
from .kernels.ops import OPS

INVERTIBLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _inverted(name: str, x: torch.Tensor, plain: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    if x.requires_grad and torch.is_grad_enabled() and x.dtype in INVERTIBLE_DTYPES:
        return OPS[name][0](x)[0]
    return plain(x)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU, x Φ(x) (``approximate="none"``) or 0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³))) (``"tanh"``)."""
    if approximate == "none":
        return _inverted("gelu", x, F.gelu)
    if approximate == "tanh":
        return _inverted("gelu_tanh", x, ACTIVATIONS["gelu_tanh"].forward)
    raise ValueError(f"actpatch.functional.gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU / Swish, x σ(x)."""
    return _inverted("silu", x, F.silu)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """QuickGELU, x σ(1.702 x) (CLIP's activation)."""
    return _inverted("quick_gelu", x, quick_gelu_forward)
