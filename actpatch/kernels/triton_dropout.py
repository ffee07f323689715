"""Triton kernels of the bit-mask dropout in ``dropout.py`` (CUDA; CPU tensors under Triton's interpreter).

pack(mask)               reads native_dropout's bool mask once, writes its bits once (1/8 byte an element)
backward(dy, bits, p)    reads dy and the bits once, writes dx = (m · dy) · s once, in float32 as
                         native_dropout_backward computes it (s = 1 / (1 - p) in float32), so dx is
                         torch's bitwise

The forward's y and mask come from torch's own ``native_dropout`` (the same random stream as the model's
dropout); only the mask's packing is added.  Tiles of ROWS × 8 elements, one bits byte a row, 64-bit
offsets, as the activations' kernels (``triton.py``), whose tile preamble each kernel repeats: a
``@triton.jit`` helper cannot be called from a kernel that Triton's interpreter runs after import.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bits import packed_size
from .dropout import scale
from .triton import _f32, _kernel, _launch, _sum_combine

ROWS, WARPS = 128, 4


@triton.jit
def _pack_kernel(mask_ptr, bits_ptr, n_elements, row_start, ROWS: tl.constexpr, FULL_ROWS: tl.constexpr):
    """bits[r] = Σ_c mask[8r + c] << c."""
    pid = tl.program_id(0).to(tl.int64)
    rows = row_start + pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, 8)
    offs = rows[:, None] * 8 + cols[None, :]
    if FULL_ROWS:
        row_mask = rows < n_elements // 8
        mask = tl.broadcast_to(row_mask[:, None], [ROWS, 8])
    else:
        row_mask = rows * 8 < n_elements
        mask = offs < n_elements
    kept = tl.load(mask_ptr + offs, mask=mask, other=0).to(tl.int32) != 0
    byte = tl.reduce(kept.to(tl.int32) << cols[None, :], 1, _sum_combine)
    tl.store(bits_ptr + rows, byte.to(tl.uint8), mask=row_mask)


@triton.jit
def _backward_kernel(
    dy_ptr,
    bits_ptr,
    dx_ptr,
    n_elements,
    row_start,
    s,
    ROWS: tl.constexpr,
    FULL_ROWS: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
):
    """dx = (m · dy) · s in float32, m the element's bit."""
    pid = tl.program_id(0).to(tl.int64)
    rows = row_start + pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, 8)
    offs = rows[:, None] * 8 + cols[None, :]
    if FULL_ROWS:
        row_mask = rows < n_elements // 8
        mask = tl.broadcast_to(row_mask[:, None], [ROWS, 8])
    else:
        row_mask = rows * 8 < n_elements
        mask = offs < n_elements
    byte = tl.load(bits_ptr + rows, mask=row_mask, other=0).to(tl.int32)
    m = ((byte[:, None] >> cols[None, :]) & 1).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0)
    if BF16_BY_HAND:  # int16 views of bfloat16 tensors (interpreter only: its casts to bfloat16 truncate)
        dx = (m * ((dy.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)) * s
        dxb = dx.to(tl.uint32, bitcast=True)
        dxb = tl.where(dx == dx, (dxb + 0x7FFF + ((dxb >> 16) & 1)) >> 16, 0x7FC0)
        tl.store(dx_ptr + offs, dxb.to(tl.int16), mask=mask)
    else:
        tl.store(dx_ptr + offs, ((m * dy.to(tl.float32)) * s).to(dx_ptr.dtype.element_ty), mask=mask)


def pack(mask: torch.Tensor) -> torch.Tensor:
    """The bits of a bool tensor, read in row-major order: uint8 [ceil(n/8)]."""
    n = mask.numel()
    bits = torch.empty(packed_size(n), dtype=torch.uint8, device=mask.device)
    if n:
        kernel, _ = _kernel(_pack_kernel, mask.device)
        _launch(kernel, n, ROWS, WARPS, (mask.contiguous().view(torch.uint8), bits, n))
    return bits


def backward(dy: torch.Tensor, bits: torch.Tensor, p: float) -> torch.Tensor:
    """dx, a fresh tensor like ``dy``, for float32 / bfloat16 / float16 ``dy``."""
    n = dy.numel()
    dyc = dy.contiguous()
    dx = torch.empty_like(dyc)
    if n:
        kernel, compiled = _kernel(_backward_kernel, dy.device)
        by_hand = not compiled and dy.dtype == torch.bfloat16
        args = (dyc.view(torch.int16), bits, dx.view(torch.int16), n) if by_hand else (dyc, bits, dx, n)
        _launch(kernel, n, ROWS, WARPS, args, s=_f32(scale(p)), BF16_BY_HAND=by_hand)
    if dyc is dy:
        return dx
    out = torch.empty_like(dy)
    out.copy_(dx)
    return out
