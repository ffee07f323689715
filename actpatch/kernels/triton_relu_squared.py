"""Fused Triton kernels of squared ReLU (``relu_squared.py``) (CUDA; CPU tensors under Triton's interpreter).

forward(x)       reads x once, writes y = r · r once, r = relu(x) (NaN kept): one float32 multiply,
                 exact for 16-bit x, rounded to x's dtype, as torch's square of relu's output
backward(dy, y)  reads y and dy once, writes dx = dy · (2 r̂) once, r̂ = √y (y clamped to its dtype's
                 largest value) correctly rounded in float32, then rounded to y's dtype, 0 where y = 0:
                 the reference's r̂ (relu's output r itself where y is normal), and dx eager's and the
                 reference's bitwise

One pass each where eager's forward makes two (relu writes r, square reads it) and its backward two
(square's 2 r dy, relu's mask).  Tiles of ROWS × 8 elements with 64-bit offsets and ``triton.py``'s
launcher (whole rows with per-row masks, then the last partial row), whose tile preamble each kernel
repeats: a ``@triton.jit`` helper cannot be called from a kernel that Triton's interpreter runs after
import.  Under the interpreter bfloat16 is read and written as int16 and rounded by hand (its casts to
bfloat16 truncate).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton import Rows, _f32, _kernel

ROWS, WARPS = 128, 4


@triton.jit
def _forward_kernel(
    x_ptr,
    y_ptr,
    n_elements,
    row_start,
    ROWS: tl.constexpr,
    FULL_ROWS: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
):
    """y = r · r in float32, r = x where not x < 0 (so NaN stays NaN), else 0."""
    pid = tl.program_id(0).to(tl.int64)
    rows = row_start + pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    offs = rows[:, None] * 8 + tl.arange(0, 8)[None, :]
    if FULL_ROWS:  # noqa: SIM108  (one mask per row of 8: loads and stores stay 16-byte vectors)
        mask = tl.broadcast_to((rows < n_elements // 8)[:, None], [ROWS, 8])
    else:
        mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask, other=0)
    if BF16_BY_HAND:  # noqa: SIM108  (x holds bfloat16 bits as int16: the interpreter's casts are inexact)
        xf = ((x.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        xf = x.to(tl.float32)
    r = tl.where(xf < 0.0, 0.0, xf)
    y = r * r
    if BF16_BY_HAND:  # round to nearest even by hand
        yb = y.to(tl.uint32, bitcast=True)
        yb = tl.where(y == y, (yb + 0x7FFF + ((yb >> 16) & 1)) >> 16, 0x7FC0)
        tl.store(y_ptr + offs, yb.to(tl.int16), mask=mask)
    else:
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    dy_ptr,
    y_ptr,
    dx_ptr,
    n_elements,
    row_start,
    y_max,
    ROWS: tl.constexpr,
    FULL_ROWS: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
):
    """dx = dy · (2 r̂) in float32, r̂ = √min(y, y_max) rounded to y's dtype; 0 where y = 0 (NaN y: NaN dx)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = row_start + pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    offs = rows[:, None] * 8 + tl.arange(0, 8)[None, :]
    if FULL_ROWS:  # noqa: SIM108  (one mask per row of 8: loads and stores stay 16-byte vectors)
        mask = tl.broadcast_to((rows < n_elements // 8)[:, None], [ROWS, 8])
    else:
        mask = offs < n_elements
    y = tl.load(y_ptr + offs, mask=mask, other=0)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0)
    if BF16_BY_HAND:  # int16 views of bfloat16 tensors (interpreter only)
        y = ((y.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
        dy = ((dy.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        y = y.to(tl.float32)
        dy = dy.to(tl.float32)
    r = tl.math.sqrt_rn(tl.minimum(y, y_max, propagate_nan=tl.PropagateNan.ALL))
    if BF16_BY_HAND:  # round to nearest even by hand
        rb = r.to(tl.uint32, bitcast=True)
        r = tl.where(r == r, (((rb + 0x7FFF + ((rb >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True), r)
    else:
        r = r.to(y_ptr.dtype.element_ty).to(tl.float32)
    dx = tl.where(y == 0.0, 0.0, dy * (2.0 * r))
    if BF16_BY_HAND:
        db = dx.to(tl.uint32, bitcast=True)
        db = tl.where(dx == dx, (db + 0x7FFF + ((db >> 16) & 1)) >> 16, 0x7FC0)
        tl.store(dx_ptr + offs, db.to(tl.int16), mask=mask)
    else:
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _like(t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out``, computed from t's contiguous copy, in t's layout: itself where t is contiguous."""
    if t.is_contiguous():
        return out
    like = torch.empty_like(t)
    like.copy_(out)
    return like


# (forward, dtype, device) -> launches, resolved at the first call
_PLANS: dict[tuple, Rows] = {}


def _plan(forward: bool, dtype: torch.dtype, device: torch.device) -> Rows:
    kernel, compiled = _kernel(_forward_kernel if forward else _backward_kernel, device)
    by_hand = not compiled and dtype == torch.bfloat16
    kwargs = {"BF16_BY_HAND": by_hand} | ({} if forward else {"y_max": _f32(torch.finfo(dtype).max)})
    views = (torch.int16,) * (2 if forward else 3) if by_hand else ()
    return _PLANS.setdefault((forward, dtype, device), Rows(kernel, ROWS, WARPS, kwargs, views))


def forward(x: torch.Tensor) -> torch.Tensor:
    """y = relu(x)², a fresh tensor like ``x`` (shape, and strides for dense x), float32 / bf16 / fp16 x."""
    xc = x.contiguous()
    yc = torch.empty_like(xc)
    if n := x.numel():
        key = True, x.dtype, x.device
        (_PLANS.get(key) or _plan(*key))(n, (xc, yc, n))
    return _like(x, yc)


def backward(dy: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dx = dy · (2 r̂), a fresh tensor like ``dy`` (of y's dtype: float32 / bf16 / fp16)."""
    dyc = dy.contiguous()
    dxc = torch.empty_like(dyc)
    if n := y.numel():
        key = False, y.dtype, y.device
        (_PLANS.get(key) or _plan(*key))(n, (dyc, y.contiguous(), dxc, n))
    return _like(dy, dxc)
