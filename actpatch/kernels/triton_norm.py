"""Fused Triton backward of the RMSNorm in ``rms_norm.py`` (CUDA; CPU tensors under Triton's interpreter).

backward(dy, x, w, r, variant) -> (dx, dw), as ``rms_norm.backward`` computes them, in one launch: each
program takes every P-th row, reads its x, dy and r once and writes dx once, and sums the weight's
gradient over its rows in float32; torch adds the P partial sums (P: two per multiprocessor).  Per row,
with n = x · r in float32:

    "llama", "t5"  s = n rounded to s's dtype,  g = dy · w rounded as autograd rounds it (to the
                   product's dtype, then to s's),  dw += dy · s rounded to the product's dtype
    "gemma", "litgpt"  g = dy · c (c = 1 + w, or w: ``rms_norm.factor``),  dw += dy · n
    dx = r · (g - n · mean(g · n))

dx and dw differ from ``rms_norm.backward``'s only by float32 summation order (mean and Σ over rows),
before the rounding to their dtypes.  The forward stays ``rms_norm.forward`` (torch's ops: bitwise the
module's output).
"""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl

from .launch import launch
from .rms_norm import UNROUNDED, scaled_dtype
from .triton import _kernel, _sum_combine

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _backward_kernel(
    dy_ptr,
    x_ptr,
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
    w = tl.load(w_ptr + cols, mask=in_row, other=0).to(tl.float32)
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for i in range(0, rows_per_program):
        row = pid + i * tl.num_programs(0) + 0 * cols  # the row, once per column (for the masks)
        mask = in_row & (row < n_rows)
        at = row * width + cols
        x = tl.load(x_ptr + at, mask=mask, other=0).to(tl.float32)
        dy = tl.load(dy_ptr + at, mask=mask, other=0).to(tl.float32)
        r = tl.load(r_ptr + row, mask=mask, other=0)
        n = x * r
        if ROUNDED:
            s = n.to(S_DTYPE).to(tl.float32)
            g = (dy * w).to(GW_DTYPE).to(S_DTYPE).to(tl.float32)
            acc += (dy * s).to(DS_DTYPE).to(tl.float32)
        else:
            g = dy * (1.0 + w if GEMMA else w)
            acc += dy * n
        dx = r * (g - n * (tl.reduce(g * n, 0, _sum_combine) / width))
        tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid * BLOCK + cols, acc, mask=in_row)


def _warps(block: int) -> int:
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


@cache
def _programs(device: torch.device) -> int:
    """Two programs per multiprocessor of a CUDA device."""
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def backward(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, variant: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw) from the kept x, w and r = 1/rms (float32, [..., 1])."""
    width = x.shape[-1]
    xc, dyc = x.contiguous(), dy.contiguous()
    n_rows = xc.numel() // width if width else 0
    dx = torch.empty_like(xc)
    if n_rows == 0:
        return dx, torch.zeros_like(w)
    sdt = scaled_dtype(x.dtype, w.dtype, variant)
    summed = (
        torch.float32 if variant in UNROUNDED else torch.promote_types(dyc.dtype, sdt)
    )  # dw's sum's dtype
    kernel, compiled = _kernel(_backward_kernel, x.device)
    programs = min(_programs(x.device) if compiled else 4, n_rows)
    block = triton.next_power_of_2(width)
    partial = torch.empty(programs, block, dtype=torch.float32, device=x.device)
    launch(
        kernel,
        programs,
        (dyc, xc, w, r.contiguous(), dx, partial, n_rows, width, -(-n_rows // programs)),
        {
            "GEMMA": variant == "gemma",
            "ROUNDED": variant not in UNROUNDED,
            "S_DTYPE": _TL[sdt],
            "GW_DTYPE": _TL[torch.promote_types(dyc.dtype, w.dtype)],
            "DS_DTYPE": _TL[summed],
            "BLOCK": block,
        },
        _warps(block),
    )
    return dx, partial[:, :width].sum(0).to(summed).to(w.dtype)
