"""Fused Triton backwards of the norms that keep their output (``norm_output.py``; CUDA, or CPU tensors under
Triton's interpreter).

One launch per norm: each of P programs takes every P-th tile of rows (``_shape``: rows a tile, warps, P,
tiles prefetched), reads its y, dy and 1/σ once, writes dx once and sums the weight's (and bias's)
gradient over its rows in float32; torch adds the P partial sums, as ``triton_norm.py`` does.  Per row, in
float32, with c the divisor (w, or 1 + w for gemma):

    RMSNorm    n̂ = y / c;  "llama", "t5": ŝ = n̂ rounded to s's dtype, g = dy · w rounded as autograd rounds
               it, dw += dy · ŝ rounded to the product's dtype, n̂ = ŝ;  gemma, torch: g = dy · c, dw += dy · n̂
               dx = r · (g − n̂ · mean(g · n̂))
    LayerNorm  x̂ = (y − b) · (1 / w),  g = dy · w,  dx = rstd · (g − mean(g) − x̂ · mean(g · x̂)),
               dw += dy · x̂,  db += dy

dx and the sums differ from the reference only by float32 rounding (division, reciprocal, summation
order).  The forwards stay torch's own ops (``norm_output.rms_norm_forward``, ``layer_norm_forward``):
bitwise.
"""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl

from .launch import Launcher
from .rms_norm import scaled_dtype
from .triton import _kernel, _sum_combine
from .triton_norm import _TL


@triton.jit
def _rms_backward_kernel(
    dy_ptr,
    y_ptr,
    w_ptr,
    r_ptr,
    dx_ptr,
    sum_ptr,
    n_rows,
    width,
    tiles_per_program,
    GEMMA: tl.constexpr,
    ROUNDED: tl.constexpr,
    S_DTYPE: tl.constexpr,
    GW_DTYPE: tl.constexpr,
    DS_DTYPE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Tiles pid, pid + P, ... of ROWS rows of [n_rows, width]; sum_ptr: this program's float32 partial
    sum of dw."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    in_row = cols < width
    w = tl.load(w_ptr + cols, mask=in_row, other=1).to(tl.float32)
    c = 1.0 + w if GEMMA else w
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for i in tl.range(0, tiles_per_program, num_stages=STAGES):
        rows = (pid + i * tl.num_programs(0)) * ROWS + tl.arange(0, ROWS)
        mask = (rows < n_rows)[:, None] & in_row[None, :]
        at = rows[:, None] * width + cols[None, :]
        y = tl.load(y_ptr + at, mask=mask, other=0).to(tl.float32)
        dy = tl.load(dy_ptr + at, mask=mask, other=0).to(tl.float32)
        r = tl.load(r_ptr + rows, mask=rows < n_rows, other=0)[:, None]
        n = y / c
        if ROUNDED:
            n = n.to(S_DTYPE).to(tl.float32)
            g = (dy * w).to(GW_DTYPE).to(S_DTYPE).to(tl.float32)
            acc += tl.reduce((dy * n).to(DS_DTYPE).to(tl.float32), 0, _sum_combine)
        else:
            g = dy * c
            acc += tl.reduce(dy * n, 0, _sum_combine)
        dx = r * (g - n * (tl.reduce(g * n, 1, _sum_combine) / width)[:, None])
        tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(sum_ptr + pid * BLOCK + cols, acc, mask=in_row)


@triton.jit
def _layer_backward_kernel(
    dy_ptr,
    y_ptr,
    w_ptr,
    b_ptr,
    rstd_ptr,
    dx_ptr,
    sum_ptr,
    n_rows,
    width,
    tiles_per_program,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    STAGES: tl.constexpr,
):
    """Tiles pid, pid + P, ... of ROWS rows of [n_rows, width]; sum_ptr: this program's float32
    partial sums of dw and db.  Masked elements read y = dy = 0 (and b = 0, 1/w = 1 off the row), so
    they add nothing."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    in_row = cols < width
    w = tl.full([BLOCK], 1.0, tl.float32)
    b = tl.full([BLOCK], 0.0, tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=in_row, other=1).to(tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=in_row, other=0).to(tl.float32)
    inv_w = 1.0 / w
    acc_w = tl.full([BLOCK], 0.0, tl.float32)
    acc_b = tl.full([BLOCK], 0.0, tl.float32)
    for i in tl.range(0, tiles_per_program, num_stages=STAGES):
        rows = (pid + i * tl.num_programs(0)) * ROWS + tl.arange(0, ROWS)
        mask = (rows < n_rows)[:, None] & in_row[None, :]
        at = rows[:, None] * width + cols[None, :]
        y = tl.load(y_ptr + at, mask=mask, other=0).to(tl.float32)
        dy = tl.load(dy_ptr + at, mask=mask, other=0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0)[:, None]
        xh = (y - b) * inv_w
        g = dy * w
        mean_g = tl.reduce(g, 1, _sum_combine)[:, None] / width
        mean_gx = tl.reduce(g * xh, 1, _sum_combine)[:, None] / width
        dx = rstd * (g - mean_g - xh * mean_gx)
        tl.store(dx_ptr + at, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        acc_w += tl.reduce(dy * xh, 0, _sum_combine)
        acc_b += tl.reduce(dy, 0, _sum_combine)
    tl.store(sum_ptr + pid * BLOCK + cols, acc_w, mask=in_row)
    tl.store(sum_ptr + (tl.num_programs(0) + pid) * BLOCK + cols, acc_b, mask=in_row)


@cache
def _sms(device: torch.device) -> int:
    """The CUDA device's multiprocessor count."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _shape(block: int, itemsize: int) -> tuple[int, int, int, int]:
    """(rows a tile, warps, programs a multiprocessor, pipeline stages) for rows of ``block`` (a power of
    2) elements of ``itemsize`` bytes: tiles of 8 KiB (16 at 4096 x 2 bytes) and 32 elements a thread,
    2-byte tiles of up to 16 KiB prefetched 2 tiles ahead; the fastest measured on an H200 (16384 rows of
    768-4096, bf16 and float32; docs/benchmarks.md)."""
    if block == 4096 and itemsize == 2:
        return 2, 8, 1, 3
    rows = max(1, 8192 // (block * itemsize))
    return rows, max(4, block // 1024), 2, 3 if itemsize == 2 and rows * block * itemsize <= 16384 else 1


class _Plan:
    """A norm backward's launch for rows of one width, dtype and device, resolved once: P programs over the
    tiles of ``_shape``'s rows of y, each taking every P-th tile; ``plan(n_rows, args, sums)`` launches it on
    ``args`` (all but the partial sums and the sizes) and returns the ``sums`` sums over the programs of
    their float32 partial sums, [sums, width]."""

    __slots__ = ("launcher", "width", "block", "rows", "most")

    def __init__(self, jitted, width: int, dtype: torch.dtype, device: torch.device, consts: dict) -> None:
        kernel, compiled = _kernel(jitted, device)
        self.width, self.block = width, 1 << (width - 1).bit_length()
        self.rows, warps, per_sm, stages = _shape(self.block, dtype.itemsize)
        self.most = per_sm * _sms(device) if compiled else 4
        self.launcher = Launcher(
            kernel, consts | {"ROWS": self.rows, "BLOCK": self.block, "STAGES": stages}, warps
        )

    def __call__(self, n_rows: int, args: tuple, sums: int) -> torch.Tensor:
        tiles = -(-n_rows // self.rows)
        programs = min(self.most, tiles)
        partial = torch.empty(sums, programs, self.block, dtype=torch.float32, device=args[0].device)
        self.launcher(programs, (*args, partial, n_rows, self.width, -(-tiles // programs)))
        return partial.sum(1)[:, : self.width]


# (variant or "layer", dtypes, width, device) -> the backward's plan (and the dtype dw is summed in)
_PLANS: dict[tuple, tuple] = {}


def _rms_plan(
    variant: str, x_dtype: torch.dtype, w_dtype: torch.dtype, dy_dtype: torch.dtype, y_dtype, width, device
) -> tuple[_Plan, torch.dtype]:
    rounded = variant in ("llama", "t5")
    sdt = scaled_dtype(x_dtype, w_dtype, variant)
    summed = torch.promote_types(dy_dtype, sdt) if rounded else torch.float32
    consts = {
        "GEMMA": variant == "gemma",
        "ROUNDED": rounded,
        "S_DTYPE": _TL[sdt],
        "GW_DTYPE": _TL[torch.promote_types(dy_dtype, w_dtype)],
        "DS_DTYPE": _TL[summed],
    }
    plan = _Plan(_rms_backward_kernel, width, y_dtype, device, consts)
    return _PLANS.setdefault((variant, x_dtype, w_dtype, dy_dtype, y_dtype, width, device), (plan, summed))


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
    yc, dyc, width = y.contiguous(), dy.contiguous(), y.shape[-1]
    dx = torch.empty(yc.shape, dtype=x_dtype, device=y.device)
    if not (width and (n_rows := y.numel() // width)):
        return dx, torch.zeros_like(w)
    key = variant, x_dtype, w.dtype, dyc.dtype, y.dtype, width, y.device
    plan, summed = _PLANS.get(key) or _rms_plan(*key)
    return dx, plan(n_rows, (dyc, yc, w, r.contiguous(), dx), 1)[0].to(summed).to(w.dtype)


def _layer_plan(has_w: bool, has_b: bool, dtype: torch.dtype, width: int, device: torch.device) -> tuple:
    plan = _Plan(_layer_backward_kernel, width, dtype, device, {"HAS_W": has_w, "HAS_B": has_b})
    return _PLANS.setdefault((has_w, has_b, dtype, width, device), (plan,))


def layer_backward(
    dy: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dw, db) as ``norm_output.layer_norm_backward_from_output``, in one launch."""
    yc, dyc, width = y.contiguous(), dy.contiguous(), y.shape[-1]
    dx = torch.empty_like(yc)
    if not (width and (n_rows := y.numel() // width)):
        return dx, None if w is None else torch.zeros_like(w), None if b is None else torch.zeros_like(b)
    key = w is not None, b is not None, y.dtype, width, y.device
    (plan,) = _PLANS.get(key) or _layer_plan(*key)
    sums = plan(n_rows, (dyc, yc, yc if w is None else w, yc if b is None else b, rstd.contiguous(), dx), 2)
    if w is not None and b is not None and w.dtype == b.dtype:  # both sums cast at once
        dw, db = sums.to(w.dtype).unbind()
        return dx, dw, db
    dw, db = sums.unbind()
    return dx, None if w is None else dw.to(w.dtype), None if b is None else db.to(b.dtype)
