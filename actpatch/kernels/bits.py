"""1-bit packing: element i of a flattened boolean tensor is bit (i % 8) of byte i // 8."""

from __future__ import annotations

import torch

_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def packed_size(n: int) -> int:
    """Bytes needed for n bits: ceil(n / 8)."""
    return (n + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor (any shape, read in logical row-major order) into ceil(n/8) uint8."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_bits: the first n bits as a flat boolean tensor."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.view(-1, 1) >> shifts) & 1).view(-1)[:n].to(torch.bool)
