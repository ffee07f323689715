"""Dropout that keeps its mask as packed bits: torch's own dropout, bitwise, with 1/8 byte per element kept.

    forward(x, p)          -> (y, bits)   y = torch's training-mode dropout of x (the same random draws,
                                          the same values); bits = pack(m), m = [element kept]
    backward(dy, bits, p)  -> dx          the gradient torch computes from the mask it would have kept

Torch's ``dropout`` runs ``native_dropout`` on fused devices (CUDA, XPU, lazy, PrivateUse1; 0 < p < 1),
which keeps a bool mask (1 byte per element) and differentiates as ``native_dropout_backward``:

    dx = (m · dy) · s  in float32, s = 1 / (1 - p) rounded to float32, then rounded to dy's dtype.

Elsewhere (CPU, MPS, meta) it draws a noise tensor in x's dtype, n = bernoulli(1 - p) / (1 - p), keeps
it (2 or 4 bytes per element) and returns x · n, so dx = dy · n.  Both paths are followed here op for
op, so y and dx are torch's bitwise on every device; only what is kept changes, to ceil(numel/8) bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .bits import pack_bits, unpack_bits


def fused(device: torch.device) -> bool:
    """Whether torch's dropout runs ``native_dropout`` (its fused kernel) on ``device``."""
    return device.type in ("cuda", "xpu", "lazy", torch._C._get_privateuse1_backend_name())


def scale(p: float) -> float:
    """native_dropout's backward scale 1 / (1 - p), as its autograd formula computes it."""
    return 1.0 / (1.0 - p)


def forward(
    x: torch.Tensor, p: float, pack: Callable[[torch.Tensor], torch.Tensor] = pack_bits
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, bits) for 0 < p < 1, as torch's dropout computes y on x's device; ``pack`` packs the bool mask
    (``bits.pack_bits``, or a kernel doing the same)."""
    if x.is_cuda or fused(x.device):
        y, mask = torch.native_dropout(x, p, True)
        return y, pack(mask)
    noise = torch.empty_like(x).bernoulli_(1 - p)
    noise.div_(1 - p)
    return x * noise, pack(noise != 0)


def backward(dy: torch.Tensor, bits: torch.Tensor, p: float) -> torch.Tensor:
    """dx as torch's dropout backward computes it from its own kept mask (or noise)."""
    mask = unpack_bits(bits, dy.numel()).view(dy.shape)
    if fused(dy.device):
        return torch.ops.aten.native_dropout_backward(dy, mask, scale(p))
    return dy * mask.to(dy.dtype).div_(1 - p)
