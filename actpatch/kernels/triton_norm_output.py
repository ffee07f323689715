"""Fused Triton backwards of the norms that keep their output (``norm_output.py``; CUDA, or CPU tensors under
Triton's interpreter).

One launch per norm: each program takes every P-th row, reads its y, dy and 1/σ once, writes dx once and
sums the weight's (and bias's) gradient over its rows in float32; torch adds the P partial sums, as
``triton_norm.py`` does.  Per row, in float32, with c the divisor (w, or 1 + w for gemma):

    RMSNorm    n̂ = y / c;  "llama", "t5": ŝ = n̂ rounded to s's dtype, g = dy · w rounded as autograd rounds
               it, dw += dy · ŝ rounded to the product's dtype, n̂ = ŝ;  gemma, torch: g = dy · c, dw += dy · n̂
               dx = r · (g − n̂ · mean(g · n̂))
    LayerNorm  x̂ = (y − b) / w,  g = dy · w,  dx = rstd · (g − mean(g) − x̂ · mean(g · x̂)),
               dw += dy · x̂,  db += dy

dx and the sums differ from the reference only by float32 rounding (division, summation order).  The
forwards stay torch's own ops (``norm_output.rms_norm_forward``, ``layer_norm_forward``): bitwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch
from .rms_norm import scaled_dtype
from .triton import _kernel, _sum_combine
from .triton_norm import _TL, _programs, _warps


@triton.jit
def _rms_backward_kernel(
    dy_ptr,
    y_ptr,
    w_ptr,
    r_ptr,
    dx_ptr,
    dw_ptr,
    n_rows,
    width,
    rows_per_program,
    GEMMA: tl.constexpr,
    ROUNDED: tl.constexpr,
    S_DTYPE: tl.constexpr,
    GW_DTYPE: tl.constexpr,
    DS_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Rows pid, pid + P, ... of [n_rows, width]; dw_ptr: this program's float32 partial sum [BLOCK]."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    in_row = cols < width
    w = tl.load(w_ptr + cols, mask=in_row, other=1).to(tl.float32)
    c = 1.0 + w if GEMMA else w
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for i in range(0, rows_per_program):
        row = pid + i * tl.num_programs(0) + 0 * cols  # the row, once per column (for the masks)
        mask = in_row & (row < n_rows)
        at = row * width + cols
        y = tl.load(y_ptr + at, mask=mask, other=0).to(tl.float32)
        dy = tl.load(dy_ptr + at, mask=mask, other=0).to(tl.float32)
        r = tl.load(r_ptr + row, mask=mask, other=0)
        n = y / c
        if ROUNDED:
            n = n.to(S_DTYPE).to(tl.float32)
            g = (dy * w).to(GW_DTYPE).to(S_DTYPE).to(tl.float32)
            acc += (dy * n).to(DS_DTYPE).to(tl.float32)
        else:
            g = dy * c
            acc += dy * n
        dx = r * (g - n * (tl.reduce(g * n, 0, _sum_combine) / width))
        tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid * BLOCK + cols, acc, mask=in_row)


@triton.jit
def _layer_backward_kernel(
    dy_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    rstd_ptr,
    dx_ptr,
    dw_ptr,
    db_ptr,
    n_rows,
    width,
    rows_per_program,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Rows pid, pid + P, ... of [n_rows, width]; dw_ptr, db_ptr: this program's float32 partial sums."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    in_row = cols < width
    w = tl.full([BLOCK], 1.0, tl.float32)
    b = tl.full([BLOCK], 0.0, tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=in_row, other=1).to(tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=in_row, other=0).to(tl.float32)
    acc_w = tl.full([BLOCK], 0.0, tl.float32)
    acc_b = tl.full([BLOCK], 0.0, tl.float32)
    for i in range(0, rows_per_program):
        row = pid + i * tl.num_programs(0) + 0 * cols
        mask = in_row & (row < n_rows)
        at = row * width + cols
        y = tl.load(y_ptr + at, mask=mask, other=0).to(tl.float32)
        dy = tl.load(dy_ptr + at, mask=mask, other=0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row, mask=mask, other=0)
        xh = tl.where(mask, (y - b) / w, 0.0)
        g = dy * w
        mean_g = tl.reduce(g, 0, _sum_combine) / width
        mean_gx = tl.reduce(g * xh, 0, _sum_combine) / width
        dx = rstd * (g - mean_g - xh * mean_gx)
        tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        acc_w += dy * xh
        acc_b += dy
    tl.store(dw_ptr + pid * BLOCK + cols, acc_w, mask=in_row)
    tl.store(db_ptr + pid * BLOCK + cols, acc_b, mask=in_row)


def _rows(y: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(y, dy) contiguous, the row count and width."""
    width = y.shape[-1]
    return y.contiguous(), dy.contiguous(), (y.numel() // width if width else 0), width


def _launch(jitted, n_rows: int, width: int, device: torch.device, args: tuple, consts: dict, sums: int):
    """Launches one program per P rows; returns the ``sums`` partial-sum buffers, each [P, width]."""
    kernel, compiled = _kernel(jitted, device)
    programs = min(_programs(device) if compiled else 4, n_rows)
    block = triton.next_power_of_2(width)
    partial = [torch.empty(programs, block, dtype=torch.float32, device=device) for _ in range(sums)]
    steps = -(-n_rows // programs)
    launch(
        kernel, programs, (*args, *partial, n_rows, width, steps), consts | {"BLOCK": block}, _warps(block)
    )
    return [p[:, :width] for p in partial]


def rms_backward(
    dy: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    r: torch.Tensor,
    variant: str,
    x_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw) as ``norm_output.rms_norm_backward_from_output``, in one launch."""
    x_dtype = x_dtype or y.dtype
    yc, dyc, n_rows, width = _rows(y, dy)
    dx = torch.empty(yc.shape, dtype=x_dtype, device=y.device)
    if n_rows == 0:
        return dx, torch.zeros_like(w)
    rounded = variant in ("llama", "t5")
    sdt = scaled_dtype(x_dtype, w.dtype, variant)
    summed = torch.promote_types(dyc.dtype, sdt) if rounded else torch.float32
    consts = {
        "GEMMA": variant == "gemma",
        "ROUNDED": rounded,
        "S_DTYPE": _TL[sdt],
        "GW_DTYPE": _TL[torch.promote_types(dyc.dtype, w.dtype)],
        "DS_DTYPE": _TL[summed],
    }
    args = (dyc, yc, w, r.contiguous(), dx)
    (partial,) = _launch(_rms_backward_kernel, n_rows, width, y.device, args, consts, 1)
    return dx, partial.sum(0).to(summed).to(w.dtype)


def layer_backward(
    dy: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dw, db) as ``norm_output.layer_norm_backward_from_output``, in one launch."""
    yc, dyc, n_rows, width = _rows(y, dy)
    dx = torch.empty_like(yc)
    if n_rows == 0:
        return dx, None if w is None else torch.zeros_like(w), None if b is None else torch.zeros_like(b)
    args = (dyc, yc, yc if w is None else w, yc if b is None else b, rstd.contiguous(), dx)
    consts = {"HAS_W": w is not None, "HAS_B": b is not None}
    pw, pb = _launch(_layer_backward_kernel, n_rows, width, y.device, args, consts, 2)
    return dx, None if w is None else pw.sum(0).to(w.dtype), None if b is None else pb.sum(0).to(b.dtype)
