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

from .dropout import scale
from .triton import Rows, _f32, _kernel, _sum_combine

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


# device -> the packing's launches; (dtype, device, p) -> the backward's; resolved at the first call
_PACK_PLANS: dict[torch.device, Rows] = {}
_BACKWARD_PLANS: dict[tuple, Rows] = {}


def _pack_plan(device: torch.device) -> Rows:
    kernel, _ = _kernel(_pack_kernel, device)
    return _PACK_PLANS.setdefault(device, Rows(kernel, ROWS, WARPS, {}, (torch.uint8,)))


def _backward_plan(dtype: torch.dtype, device: torch.device, p: float) -> Rows:
    kernel, compiled = _kernel(_backward_kernel, device)
    by_hand = not compiled and dtype == torch.bfloat16
    kwargs = {"s": _f32(scale(p)), "BF16_BY_HAND": by_hand}
    rows = Rows(kernel, ROWS, WARPS, kwargs, (torch.int16, None, torch.int16) if by_hand else ())
    return _BACKWARD_PLANS.setdefault((dtype, device, p), rows)


def pack(mask: torch.Tensor) -> torch.Tensor:
    """The bits of a bool tensor, read in row-major order: uint8 [ceil(n/8)]."""
    n = mask.numel()
    bits = torch.empty((n + 7) >> 3, dtype=torch.uint8, device=mask.device)
    if n:
        (_PACK_PLANS.get(mask.device) or _pack_plan(mask.device))(n, (mask.contiguous(), bits, n))
    return bits


def backward(dy: torch.Tensor, bits: torch.Tensor, p: float) -> torch.Tensor:
    """dx, a fresh tensor like ``dy``, for float32 / bfloat16 / float16 ``dy``."""
    n = dy.numel()
    dyc = dy.contiguous()
    dx = torch.empty_like(dyc)
    if n:
        key = dy.dtype, dy.device, p
        (_BACKWARD_PLANS.get(key) or _backward_plan(*key))(n, (dyc, bits, dx, n))
    if dyc is dy:
        return dx
    out = torch.empty_like(dy)
    out.copy_(dx)
    return out
