"""CUDA's bf16 autocast on the meta device, for dry runs: meta tensors have no autocast dispatch.

Within :class:`MetaAutocast`, meta tensors (standing for CUDA ones: tensors on other devices, such as the
inputs a norm is recognised on, are left alone) are cast as ``torch.autocast("cuda", torch.bfloat16)`` does:

- the ops autocast runs in bf16 (``LOWER``: matmuls, Linear, convolutions, attention) get their floating
  arguments cast to bf16; a parameter's cast (a leaf that requires grad) is made once and reused until the
  block ends, as autocast's cache does, so the ops that save it share one bf16 copy;
- the ops autocast runs in float32 (``FLOAT32``: softmax, log-softmax, norms, losses, exp/log/pow ...) get
  their bf16 and fp16 arguments cast to float32;
- every other op runs as it is (type promotion: bf16 times float32 is float32).

The casts run below the block's other modes (a probe entered inside it sees the op, not the casts), as
autocast's happen below ``__torch_function__``.  Above this mode, actpatch's probe calls its own meta SDPA
(``fused_sdpa``: the fused kernel's saved tensors) in place of ``F.scaled_dot_product_attention``, and its
grouped-query path saves q, k and v itself: within the block that function gets them cast to bf16 first,
as autocast casts SDPA's arguments.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .analysis import probe

LOWER = frozenset(
    {"linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv"}
    | {"addr", "mv", "einsum", "chain_matmul", "linalg_multi_dot", "linalg_vecdot", "prelu"}
    | {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "conv_tbc"}
    | {"scaled_dot_product_attention", "_scaled_dot_product_efficient_attention"}
    | {"_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention"}
)
FLOAT32 = frozenset(
    {"softmax", "log_softmax", "cross_entropy", "nll_loss", "layer_norm", "group_norm", "rms_norm", "norm"}
    | {"acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal"}
    | {"rsqrt", "sinh", "tan", "pow", "__pow__", "softplus", "cosine_similarity", "kl_div", "l1_loss"}
    | {"smooth_l1_loss", "huber_loss", "mse_loss", "binary_cross_entropy_with_logits", "logsumexp"}
    | {"cumsum", "cumprod", "prod", "sum", "linalg_vector_norm", "dist", "cdist", "renorm"}
)
_LOW = (torch.bfloat16, torch.float16)


class MetaAutocast(TorchFunctionMode):
    """bf16 autocast's casts on any device (meant for meta, which has none); see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(parameter) -> (it, its cast)
        self.sdpa = probe.fused_sdpa

    def __enter__(self) -> MetaAutocast:
        probe.fused_sdpa = lambda *args, **kwargs: self.sdpa(*_map(self._lower, args), **kwargs)
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        probe.fused_sdpa = self.sdpa
        super().__exit__(*exc)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in LOWER:
            cast = self._lower
        elif name in FLOAT32:
            cast = _float32
        else:
            return func(*args, **kwargs)
        return func(*_map(cast, args), **dict(zip(kwargs, _map(cast, tuple(kwargs.values())), strict=True)))

    def _lower(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype != torch.float32 or not t.is_meta:
            return t
        if not (t.is_leaf and t.requires_grad):
            return t.to(torch.bfloat16)
        if id(t) not in self.cache:
            self.cache[id(t)] = (t, t.to(torch.bfloat16))  # the parameter kept: its id is not reused
        return self.cache[id(t)][1]


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in _LOW and t.is_meta else t


def _map(cast: Any, values: tuple) -> tuple:
    """``values`` with ``cast`` applied to each tensor, also inside lists and tuples."""
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(cast(v))
        elif isinstance(v, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in v):
            out.append(type(v)(cast(t) if isinstance(t, torch.Tensor) else t for t in v))
        else:
            out.append(v)
    return tuple(out)
