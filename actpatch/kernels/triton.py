"""Fused Triton kernels for the inverted activations (CUDA; also CPU tensors under Triton's interpreter).

forward(x)            reads x once, writes y = f(x) (torch's own eager formula, in float32) and the
                      packed branch bits [x >= x*] (element i is bit i % 8 of byte i // 8, row-major).
backward(dy, y, bits) reads y, bits and dy once, writes dx = dy · g_b(y) once, where g_b is the fitted
                      inverse-derivative table of ``actpatch.activations.table_for``, evaluated as
                      ``reference.inverse_derivative`` does:

    d = max((y - y*_hi) - y*_lo, 0),  q = y / y*,  tail = left branch and q < 1/2
    u = √(-log2 q) in the tail, else √d
    t = min(u n / w_max, n⁻) (right), min(n + u n / w_near, (2n)⁻) (left, near y*),
        clamp(2n + (u - 1) n / (v_max - 1), 2n, (3n)⁻) (tail);  i = ⌊t⌋ in [0, 3n)
    (each segment's offset added before clamping to its end: n + n⁻ rounds to 2n in float32)
    p = Horner(coef[i], t - i);   g = y p in the tail, p elsewhere.

On CUDA interval i's coefficients come in two 16-byte gathers (``interval_coefficients``: two planes of 4
float32 per interval).

For bfloat16 and float16 both directions read tables of the whole dtype instead (``lookup.py``): the
forward y's bits from the entry of x's bits (float16: of those rotated right by 3, ``lookup.gather_order``),
the backward g from the entry of (branch, y's bits): y is torch's own op's bitwise, and dx the reference's.
The arithmetic above runs for float32, and for the float16 forwards of ``ARITHMETIC_FLOAT16`` where it is
checked to give torch's y on every float16 value.

Each program handles ROWS × 8 elements as a [ROWS, 8] tile, so one bits byte belongs to one tile row:
the forward packs a row with an in-register sum, the backward loads one byte per row.  Offsets are 64-bit.

Importing this module raises ImportError when Triton is missing (ops.py then keeps the PyTorch path).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
import torch
import triton
import triton.language as tl

from ..activations import ACTIVATIONS, Activation, InverseTable, table_for
from . import lookup
from .bits import packed_size
from .launch import Launcher
from .reference import device_coefficients, right_end

try:  # Triton >= 3.0 (the CUDA libdevice wrappers); absent under very old releases
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    from triton.language.extra.cuda import libdevice

# tl.sum's own combine function: the interpreter recognises it (and sums with numpy), so the kernels also
# run through an InterpretedFunction wrapped after import, where tl.sum (a compiled helper) cannot.
_sum_combine = tl.standard._sum_combine

__all__ = ["forward", "backward", "ACT_CODES"]

ACT_CODES = {"gelu": 0, "gelu_tanh": 1, "silu": 2, "quick_gelu": 3}
# A Python float near or under 2^-126 may become a float64 constant in Triton (and drag the math to
# float64), so float32's smallest normal (below it the backward flushes y / y* to 0) is made from its bits.

# Launch shapes, ROWS rows of 8 elements per program with this many warps, the fastest in the H200
# sweeps (benchmarks/kernels.py --sweep): the arithmetic kernels in float32 and float16,
FORWARD_ROWS, FORWARD_WARPS = 128, 4  # fp16 SiLU 0.130 ms against 0.137 at 256 x 4; fp32 0.229 / 0.235
BACKWARD_ROWS, BACKWARD_WARPS = 128, 4  # fp32 0.330 ms, as at 64 x 2 and 256 x 8; 4 elements a thread slower
# the lookups in bfloat16,
LOOKUP_FORWARD_ROWS, LOOKUP_FORWARD_WARPS = 128, 4  # 0.1222 ms against 0.1276 at 256 x 4
LOOKUP_BACKWARD_ROWS, LOOKUP_BACKWARD_WARPS = 64, 2
# and the float16 backward, two rows a thread (its gathers miss more: fp16 y spreads over 8 times more
# entries; SiLU / GELU tanh 0.174 ms against 0.188 / 0.182 at 64 x 2, 0.179 / 0.181 at 128 x 4).
LOOKUP_BACKWARD_ROWS_FLOAT16 = 128
# float16 forwards faster as arithmetic than as gathers from the 65,536-entry table (H200, 8192 x 14336,
# N(0, 4) inputs: SiLU 0.128 against 0.158 ms, QuickGELU 0.144 against 0.157; on the bf16 grid, where the
# gathers are a bf16 table's (``lookup.gather_order``), 0.128 and 0.145 against 0.125); used where the
# arithmetic gives torch's y on every float16 value, checked once per device.  GELU tanh's arithmetic is
# torch's too on the H200 but slower (0.152-0.154 ms: libdevice's tanh, both branches, ~34 instructions an
# element against the table's ~16).
ARITHMETIC_FLOAT16 = ("silu", "quick_gelu")
_ARITHMETIC_IS_TORCH: dict[tuple[str, torch.device], bool] = {}
# (name, dtype, device, options) -> a forward's or backward's launches and table, resolved at the first call
_FORWARD_PLANS: dict[tuple, tuple] = {}
_BACKWARD_PLANS: dict[tuple, tuple] = {}
_INTERVAL_COEFFICIENTS: dict[tuple[str, int, int, torch.device], torch.Tensor] = {}


@triton.jit
def _forward_kernel(
    x_ptr,
    y_ptr,
    bits_ptr,
    n_elements,
    row_start,
    x_star,
    ACT: tl.constexpr,
    ROUND_INTERMEDIATE: tl.constexpr,
    ROWS: tl.constexpr,
    FULL_ROWS: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
):
    """y = f(x) in float32 (rounded once, or as torch's eager ops round); bits = pack([x >= x*])."""
    pid = tl.program_id(0).to(tl.int64)
    rows = row_start + pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, 8)
    offs = rows[:, None] * 8 + cols[None, :]
    if FULL_ROWS:  # one mask per row of 8: loads and stores stay 16-byte vectors
        row_mask = rows < n_elements // 8
        mask = tl.broadcast_to(row_mask[:, None], [ROWS, 8])
    else:
        row_mask = rows * 8 < n_elements
        mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask, other=0)
    if BF16_BY_HAND:  # noqa: SIM108  (x holds bfloat16 bits as int16: the interpreter's casts are inexact)
        xf = ((x.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        xf = x.to(tl.float32)
    if ACT == 0:  # GELU (erf): x * 0.5 * (1 + erf(x * M_SQRT1_2))
        z = xf * 0.7071067811865476
        if LIBDEVICE:  # noqa: SIM108
            e = libdevice.erf(z)
        else:
            e = tl.math.erf(z)
        y = xf * 0.5 * (1.0 + e)
    elif ACT == 1:  # GELU (tanh): 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
        inner = 0.7978845608028654 * (xf + 0.044715 * (xf * xf * xf))
        if LIBDEVICE:
            th = libdevice.tanh(inner)
        else:  # tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|)
            e = tl.exp(-2.0 * tl.abs(inner))
            th = (1.0 - e) / (1.0 + e)
            th = tl.where(inner < 0, -th, th)
        y = 0.5 * xf * (1.0 + th)
    elif ACT == 2:  # SiLU: x / (1 + exp(-x))
        if LIBDEVICE:  # noqa: SIM108
            e = libdevice.exp(-xf)
        else:
            e = tl.exp(-xf)
        y = tl.math.div_rn(xf, 1.0 + e)
    else:  # QuickGELU: x * sigmoid(1.702 * x), three eager ops, each rounded to x's dtype
        z = xf * 1.702
        if ROUND_INTERMEDIATE:
            if BF16_BY_HAND:
                zb = z.to(tl.uint32, bitcast=True)
                zb = ((zb + 0x7FFF + ((zb >> 16) & 1)) >> 16) << 16
                z = tl.where(z == z, zb.to(tl.float32, bitcast=True), z)
            else:
                z = z.to(x.dtype).to(tl.float32)
        if LIBDEVICE:  # noqa: SIM108
            e = libdevice.exp(-z)
        else:
            e = tl.exp(-z)
        s = tl.math.div_rn(1.0, 1.0 + e)
        if ROUND_INTERMEDIATE:
            if BF16_BY_HAND:
                sb = s.to(tl.uint32, bitcast=True)
                sb = ((sb + 0x7FFF + ((sb >> 16) & 1)) >> 16) << 16
                s = tl.where(s == s, sb.to(tl.float32, bitcast=True), s)
            else:
                s = s.to(x.dtype).to(tl.float32)
        y = xf * s
    if BF16_BY_HAND:  # round to nearest even by hand: the interpreter's float32 -> bfloat16 truncates
        yb = y.to(tl.uint32, bitcast=True)
        yb = tl.where(y == y, (yb + 0x7FFF + ((yb >> 16) & 1)) >> 16, 0x7FC0)
        tl.store(y_ptr + offs, yb.to(tl.int16), mask=mask)
    else:
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    right = xf >= x_star
    if not FULL_ROWS:  # (whole rows are masked at the store)
        right = right & mask
    byte = tl.reduce(right.to(tl.int32) << cols[None, :], 1, _sum_combine)
    tl.store(bits_ptr + rows, byte.to(tl.uint8), mask=row_mask)


@triton.jit
def _gather4(at):
    """The four float32 at ``at`` (16-byte aligned), one vector load through the read-only cache."""
    return tl.inline_asm_elementwise(
        "ld.global.nc.v4.f32 {$0, $1, $2, $3}, [$4];",
        "=r,=r,=r,=r,l",
        [at],
        dtype=(tl.float32, tl.float32, tl.float32, tl.float32),
        is_pure=True,
        pack=1,
    )


@triton.jit
def _backward_kernel(
    dy_ptr,
    y_ptr,
    bits_ptr,
    dx_ptr,
    coef_ptr,
    n_elements,
    row_start,
    y_hi,
    y_lo,
    inv_y_hi,
    t_end,
    t_end2,
    t_end3,
    scale_right,
    scale_near,
    scale_tail,
    N: tl.constexpr,
    DEG: tl.constexpr,
    INTERVALS: tl.constexpr,
    ROWS: tl.constexpr,
    FULL_ROWS: tl.constexpr,
    GPU: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
):
    """dx = dy · g_b(y); coef: the [2, INTERVALS, 4] float32 table of ``interval_coefficients`` (power j of
    interval i, highest first, at (j // 4, i, j % 4))."""
    pid = tl.program_id(0).to(tl.int64)
    rows = row_start + pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, 8)
    offs = rows[:, None] * 8 + cols[None, :]
    if FULL_ROWS:  # one mask per row of 8: loads and stores stay 16-byte vectors
        row_mask = rows < n_elements // 8
        mask = tl.broadcast_to(row_mask[:, None], [ROWS, 8])
    else:
        row_mask = rows * 8 < n_elements
        mask = offs < n_elements
    # dy and y as volatile loads, which keep their program order: both are issued up front, before the
    # arithmetic on y (else ptxas may issue dy's load only once y has arrived: a second memory latency)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0, volatile=True)
    y = tl.load(y_ptr + offs, mask=mask, other=0, volatile=True)
    byte = tl.load(bits_ptr + rows, mask=row_mask, other=0).to(tl.int32)
    right = ((byte[:, None] >> cols[None, :]) & 1) != 0
    if BF16_BY_HAND:  # int16 views of bfloat16 tensors (interpreter only)
        y = ((y.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
        dy = ((dy.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    else:
        y = y.to(tl.float32)
        dy = dy.to(tl.float32)

    # NaN y (gelu(+inf) is NaN, on the right branch) must give NaN dx: on the GPU it flows through
    # NaN-propagating max/min to t, whose index converts to 0 (float-to-int of NaN is 0), into p.
    d = tl.maximum((y - y_hi) - y_lo, 0.0, propagate_nan=tl.PropagateNan.ALL)
    if GPU:  # y / y* as a product with the float32 reciprocal; the hardware's log2 and √ (~1 ulp each),
        # flushing subnormals: q < 2⁻¹²⁶ has log2 = -inf, u = inf (the tail's end); d is 0 or >= 2⁻²⁷
        q = y * inv_y_hi
        tail = (q < 0.5) & ~right
        lg = tl.inline_asm_elementwise(
            "lg2.approx.ftz.f32 $0, $1;", "=r,r", [tl.maximum(q, 0.0)], dtype=tl.float32, is_pure=True,
            pack=1,
        )  # fmt: skip
        u = tl.inline_asm_elementwise(
            "sqrt.approx.ftz.f32 $0, $1;", "=r,r", [tl.where(tail, -lg, d)], dtype=tl.float32, is_pure=True,
            pack=1,
        )  # fmt: skip
    else:  # interpreter: correctly rounded division and square root, numpy's log2 (subnormal q flushed)
        q = tl.math.div_rn(y, y_hi)
        tail = (q < 0.5) & ~right
        normal = tl.full([ROWS, 8], 0x00800000, tl.int32).to(tl.float32, bitcast=True)
        u = tl.math.sqrt_rn(tl.where(tail, -tl.log2(tl.where(q < normal, 0.0, q)), d))
    # dx = dy · g with g = y p in the tail, p elsewhere, as (dy · y) · p
    dyy = dy * tl.where(tail, y, 1.0)
    # t_end, t_end2, t_end3: the float32 below N, 2N, 3N, so t stays in its segment's last interval
    t_tail = tl.minimum(tl.maximum((u - 1.0) * scale_tail + 2.0 * N, 2.0 * N), t_end3)
    scale = tl.where(right, scale_right, scale_near)
    near = u * scale + tl.where(right, 0.0, N)
    t_w = tl.minimum(near, tl.where(right, t_end, t_end2), propagate_nan=tl.PropagateNan.ALL)
    t = tl.where(tail, t_tail, t_w)
    if GPU:  # t in [0, 3N) or NaN; the interval's coefficients in two 16-byte gathers, one from each plane
        fi = tl.floor(t)
        at = coef_ptr + fi.to(tl.int32) * 4
        c = _gather4(at) + _gather4(at + 4 * INTERVALS)
        s = t - fi
        p = c[0]
        for j in tl.static_range(1, DEG + 1):
            p = p * s + c[j]
    else:  # numpy's NaN-to-int is undefined: mirror reference._horner's nan_to_num and clamp
        t = tl.where(t == t, t, 0.0)
        fi = tl.minimum(tl.floor(t), 3.0 * N - 1.0)
        s = t - fi
        at = coef_ptr + fi.to(tl.int32) * 4
        p = tl.load(at)
        for j in tl.static_range(1, DEG + 1):
            p = p * s + tl.load(at + (j // 4) * 4 * INTERVALS + j % 4)
    dx = dyy * p
    if not GPU:  # numpy: NaN t was zeroed above
        dx = tl.where(y == y, dx, y)
    if BF16_BY_HAND:
        db = dx.to(tl.uint32, bitcast=True)
        db = tl.where(dx == dx, (db + 0x7FFF + ((db >> 16) & 1)) >> 16, 0x7FC0)
        tl.store(dx_ptr + offs, db.to(tl.int16), mask=mask)
    else:
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _forward_lookup_kernel(
    x_ptr,
    y_ptr,
    bits_ptr,
    table_ptr,
    n_elements,
    row_start,
    x_star,
    ROWS: tl.constexpr,
    FULL_ROWS: tl.constexpr,
    FP16: tl.constexpr,
):
    """16-bit x and y as int16: y = table[x's bits] (float16: at x's bits rotated right by 3, the table in
    ``lookup.gather_order``); bits = pack([x >= x*]), x read as bf16 or fp16."""
    pid = tl.program_id(0).to(tl.int64)
    rows = row_start + pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, 8)
    offs = rows[:, None] * 8 + cols[None, :]
    if FULL_ROWS:  # one mask per row of 8: loads and stores stay 16-byte vectors
        row_mask = rows < n_elements // 8
        mask = tl.broadcast_to(row_mask[:, None], [ROWS, 8])
    else:
        row_mask = rows * 8 < n_elements
        mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask, other=0)
    index = x.to(tl.int32) & 0xFFFF
    if FP16:
        index = ((index >> 3) | (index << 13)) & 0xFFFF
    tl.store(y_ptr + offs, tl.load(table_ptr + index, mask=mask, other=0), mask=mask)
    if FP16:  # noqa: SIM108
        xf = x.to(tl.float16, bitcast=True).to(tl.float32)
    else:
        xf = ((x.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    right = xf >= x_star
    if not FULL_ROWS:  # (whole rows are masked at the store)
        right = right & mask
    byte = tl.reduce(right.to(tl.int32) << cols[None, :], 1, _sum_combine)
    tl.store(bits_ptr + rows, byte.to(tl.uint8), mask=row_mask)


@triton.jit
def _backward_lookup_kernel(
    dy_ptr,
    y_ptr,
    bits_ptr,
    dx_ptr,
    table_ptr,
    n_elements,
    row_start,
    ROWS: tl.constexpr,
    FULL_ROWS: tl.constexpr,
    BF16_BY_HAND: tl.constexpr,
):
    """dx = dy · table[branch · 65536 + y's bits] (y as int16; table: float32 g of lookup.backward_table)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = row_start + pid * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, 8)
    offs = rows[:, None] * 8 + cols[None, :]
    if FULL_ROWS:  # one mask per row of 8: loads and stores stay 16-byte vectors
        row_mask = rows < n_elements // 8
        mask = tl.broadcast_to(row_mask[:, None], [ROWS, 8])
    else:
        row_mask = rows * 8 < n_elements
        mask = offs < n_elements
    # y before the bits: with two rows a thread (float16's shape) the bits' bytes move between threads
    # through shared memory behind a barrier, and a load written after that is issued only once the bits
    # have arrived (H200, fp16 SiLU at 128 x 2: 0.174 ms with y first, 0.186 without)
    y = tl.load(y_ptr + offs, mask=mask, other=0)
    byte = tl.load(bits_ptr + rows, mask=row_mask, other=0).to(tl.int32)
    right = (byte[:, None] >> cols[None, :]) & 1
    g = tl.load(table_ptr + ((right << 16) | (y.to(tl.int32) & 0xFFFF)), mask=mask, other=0.0)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0)
    if BF16_BY_HAND:  # int16 views of bfloat16 tensors (interpreter only)
        dx = ((dy.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True) * g
        db = dx.to(tl.uint32, bitcast=True)
        db = tl.where(dx == dx, (db + 0x7FFF + ((db >> 16) & 1)) >> 16, 0x7FC0)
        tl.store(dx_ptr + offs, db.to(tl.int16), mask=mask)
    else:
        tl.store(dx_ptr + offs, (dy.to(tl.float32) * g).to(dx_ptr.dtype.element_ty), mask=mask)


def _kernel(jitted, device: torch.device):
    """(kernel, compiled): the compiled kernel on CUDA; Triton's interpreter on any other device
    (also on CUDA when TRITON_INTERPRET=1 was set before this module was imported)."""
    interpreted = type(jitted).__name__ == "InterpretedFunction"
    if device.type == "cuda" or interpreted:
        return jitted, not interpreted
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(jitted.fn), False


@cache
def _f32(v: float) -> float:
    return float(np.float32(v))


def interval_coefficients(act: Activation, table: InverseTable, device: torch.device) -> torch.Tensor:
    """``_backward_kernel``'s coefficients on ``device``, cached: float32 [2, P, 4], in plane k row i the
    powers 4k to 4k + 3 of interval i (highest first; zeros past the deg + 1 <= 8), P = 3n rounded up to 8
    rows (a plane is whole 128-byte lines).  A thread gathers an interval's coefficients as two 16-byte
    vectors, and a warp's gather from one plane touches half the lines a row of 8 would."""
    key = (act.name, table.n, table.deg, device)
    if key not in _INTERVAL_COEFFICIENTS:
        if table.deg > 7:
            raise ValueError(f"the Triton backward evaluates degrees up to 7, not {table.deg}")
        coef = device_coefficients(act, table, device)
        rows = torch.zeros(-(-coef.shape[1] // 8) * 8, 8, dtype=torch.float32, device=device)
        rows[: coef.shape[1], : coef.shape[0]] = coef.T
        _INTERVAL_COEFFICIENTS[key] = rows.view(-1, 2, 4).transpose(0, 1).contiguous()
    return _INTERVAL_COEFFICIENTS[key]


@cache
def _table_scalars(table: InverseTable) -> dict:
    """``_backward_kernel``'s scalar arguments for ``table``, as float32 values."""
    return {
        "y_hi": table.y_star_hi,
        "y_lo": table.y_star_lo,
        "inv_y_hi": _f32(1.0 / table.y_star_hi),
        "t_end": right_end(table.n),
        "t_end2": right_end(2 * table.n),
        "t_end3": right_end(3 * table.n),
        "scale_right": _f32(table.n / table.w_max),
        "scale_near": _f32(table.n / table.w_near),
        "scale_tail": _f32(table.n / (table.v_max - 1.0)),
        "N": table.n,
        "DEG": table.deg,
    }


class Rows:
    """A row kernel's launches over n elements, in tiles of ``rows`` rows of 8: the whole rows with per-row
    masks (vector loads), then the last partial row, if any, alone.  ``rows_launch(n, args)``: ``args`` the
    kernel's positional parameters up to ``row_start`` (which follows them), ``kwargs`` the rest but ROWS and
    FULL_ROWS; ``views`` as ``Launcher``'s."""

    __slots__ = ("rows", "whole", "last")

    def __init__(self, kernel, rows: int, warps: int, kwargs: dict, views: tuple = ()) -> None:
        self.rows = rows
        self.whole = Launcher(kernel, kwargs | {"ROWS": rows, "FULL_ROWS": True}, warps, views)
        self.last = Launcher(kernel, kwargs | {"ROWS": 1, "FULL_ROWS": False}, 1, views)

    def __call__(self, n: int, args: tuple) -> None:
        full = n >> 3
        if full:  # ceil division (triton.cdiv is a JIT function: microseconds per host call)
            self.whole(-(-full // self.rows), (*args, 0))
        if n & 7:
            self.last(1, (*args, full))


_I16 = torch.int16


def _forward_plan(name: str, dtype: torch.dtype, device: torch.device, lookup_table: bool, default: bool):
    """(rows launch, table): the forward of ``name`` for x of ``dtype`` on ``device``, resolved once (kept in
    ``_FORWARD_PLANS``); table: the lookup kernel's default table where it reads one (``default``: no table
    given), else None."""
    key, act = (name, dtype, device, lookup_table, default), ACTIVATIONS[name]
    if dtype in lookup.DTYPES and not (
        default and (not lookup_table or _arithmetic_is_torch(act, dtype, device))
    ):
        kernel, _ = _kernel(_forward_lookup_kernel, device)
        kwargs = {"x_star": _f32(act.x_star), "FP16": dtype == torch.float16}
        table = _gather_order(lookup.forward_table(act, dtype, device), dtype) if default else None
        rows = Rows(kernel, LOOKUP_FORWARD_ROWS, LOOKUP_FORWARD_WARPS, kwargs, (_I16, _I16))
        return _FORWARD_PLANS.setdefault(key, (rows, table))
    kernel, compiled = _kernel(_forward_kernel, device)
    by_hand = not compiled and dtype == torch.bfloat16
    kwargs = {
        "x_star": _f32(act.x_star),
        "ACT": ACT_CODES[name],
        "ROUND_INTERMEDIATE": dtype != torch.float32,
        "LIBDEVICE": compiled,
        "BF16_BY_HAND": by_hand,
    }
    rows = Rows(kernel, FORWARD_ROWS, FORWARD_WARPS, kwargs, (_I16, _I16) if by_hand else ())
    return _FORWARD_PLANS.setdefault(key, (rows, None))


def forward(
    x: torch.Tensor, act: Activation, table: torch.Tensor | None = None, *, lookup_table: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, bits): y a fresh tensor like ``x`` (shape, and strides for dense x), bits uint8 [ceil(n/8)].
    16-bit x reads y from ``table`` (a module's own formula's) or ``lookup.forward_table`` unless
    ``lookup_table`` is False (for benchmarks) or the arithmetic is faster and checked to be torch's
    (``ARITHMETIC_FLOAT16``)."""
    key = act.name, x.dtype, x.device, lookup_table, table is None
    rows, default = _FORWARD_PLANS.get(key) or _forward_plan(*key)
    return _forward(rows, default if table is None else _gather_order(table, x.dtype), x)


def _gather_order(table: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A forward table in the order the lookup kernel reads it for x of ``dtype`` (lookup.gather_order)."""
    return lookup.gather_order(table) if dtype == torch.float16 else table


def _forward(rows: Rows, table: torch.Tensor | None, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward`` through a resolved plan: ``rows`` reading ``table`` where one is given (the lookups)."""
    n = x.numel()
    bits = x.new_empty((n + 7) >> 3, dtype=torch.uint8)
    xc = x.contiguous()
    yc = torch.empty_like(xc)
    if n:
        rows(n, (xc, yc, bits, n) if table is None else (xc, yc, bits, table, n))
    if xc is x:
        return yc, bits
    y = torch.empty_like(x)
    y.copy_(yc)
    return y, bits


def _arithmetic_is_torch(act: Activation, dtype: torch.dtype, device: torch.device) -> bool:
    """For float16 x of an ``ARITHMETIC_FLOAT16`` activation: whether ``_forward_kernel`` gives torch's
    y (bitwise; any NaN for NaN) on every float16 value on ``device``, checked once per device."""
    if dtype != torch.float16 or act.name not in ARITHMETIC_FLOAT16:
        return False
    key = (act.name, device)
    if key not in _ARITHMETIC_IS_TORCH:
        v = lookup.every_value(torch.float16, device)
        y = torch.empty_like(v)
        rows, _ = _forward_plan(act.name, torch.float16, device, False, True)  # the arithmetic
        rows(
            v.numel(),
            (v, y, torch.empty(packed_size(v.numel()), dtype=torch.uint8, device=device), v.numel()),
        )
        torch_y = lookup.forward_table(act, torch.float16, device).view(torch.float16)
        same = (y.view(torch.int16) == torch_y.view(torch.int16)) | (y.isnan() & torch_y.isnan())
        _ARITHMETIC_IS_TORCH[key] = bool(same.all())
    return _ARITHMETIC_IS_TORCH[key]


def _backward_plan(
    name: str, dtype: torch.dtype, device: torch.device, table: InverseTable | None, default: bool
):
    """(rows launch, table tensor): the backward of ``name`` for y of ``dtype`` on ``device``, resolved once:
    the lookup kernel where ``table`` (an InverseTable to evaluate) is None, its table
    ``lookup.backward_table`` where ``default`` (no g table given); else the arithmetic kernel and its
    coefficients (kept in ``_BACKWARD_PLANS``)."""
    key, act = (name, dtype, device, table, default), ACTIVATIONS[name]
    if table is None:
        kernel, compiled = _kernel(_backward_lookup_kernel, device)
        by_hand = not compiled and dtype == torch.bfloat16
        views = (_I16, _I16, None, _I16) if by_hand else (None, _I16)
        per = LOOKUP_BACKWARD_ROWS_FLOAT16 if dtype == torch.float16 else LOOKUP_BACKWARD_ROWS
        rows = Rows(kernel, per, LOOKUP_BACKWARD_WARPS, {"BF16_BY_HAND": by_hand}, views)
        return _BACKWARD_PLANS.setdefault(
            key, (rows, lookup.backward_table(act, dtype, device) if default else None)
        )
    kernel, compiled = _kernel(_backward_kernel, device)
    by_hand = not compiled and dtype == torch.bfloat16
    coef = interval_coefficients(act, table, device)
    kwargs = _table_scalars(table) | {"INTERVALS": coef.shape[1], "GPU": compiled, "BF16_BY_HAND": by_hand}
    views = (_I16, _I16, None, _I16) if by_hand else ()
    return _BACKWARD_PLANS.setdefault(key, (Rows(kernel, BACKWARD_ROWS, BACKWARD_WARPS, kwargs, views), coef))


def backward(
    dy: torch.Tensor,
    y: torch.Tensor,
    bits: torch.Tensor,
    act: Activation,
    *,
    lookup_table: bool = True,
    table: InverseTable | None = None,
    g_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """dx = dy · g_b(y), a fresh tensor like ``dy``; 16-bit y with a ``g_table`` (float32 [2 · 65536], a
    formula's: ``lookup.backward_table_of``) reads g from it.

    On CUDA, y / y* is y times a float32 reciprocal, log2 and √ the hardware's approximate ones (an ulp or
    two: y's own rounding moves g far more); under the interpreter, correctly rounded division and √ and
    numpy's log2.  16-bit y reads g from ``lookup.backward_table`` unless ``lookup_table`` is False or a
    ``table`` (default ``table_for(act)``, what the reference uses) is given: for benchmarks.
    """
    read = g_table is not None or (y.dtype in lookup.DTYPES and table is None and lookup_table)
    table = None if read else table or table_for(act)
    key = act.name, y.dtype, y.device, table, g_table is None
    rows, default = _BACKWARD_PLANS.get(key) or _backward_plan(*key)
    return _backward(rows, default if g_table is None else g_table, dy, y, bits)


def _backward(rows: Rows, table: torch.Tensor, dy: torch.Tensor, y: torch.Tensor, bits: torch.Tensor):
    """``backward`` through a resolved plan: ``rows`` reading ``table`` (a g table or coefficients)."""
    n = y.numel()
    dyc = dy.contiguous()
    dxc = torch.empty_like(dyc)
    if n:
        rows(n, (dyc, y.contiguous(), bits, dxc, table, n))
    if dyc is dy:
        return dxc
    dx = torch.empty_like(dy)
    dx.copy_(dxc)
    return dx


def prepared(act: Activation, dtype: torch.dtype, device: torch.device) -> tuple[Callable, Callable]:
    """``forward(x, table)`` and ``backward(dy, y, bits, g_table)`` as ``forward`` and ``backward`` compute
    them for tensors of ``dtype`` on ``device``, the launches without a given table resolved now: such a
    call allocates its outputs and launches."""
    key = act.name, dtype, device, True, True
    f_rows, f_table = _FORWARD_PLANS.get(key) or _forward_plan(*key)
    key = act.name, dtype, device, None if dtype in lookup.DTYPES else table_for(act), True
    b_rows, b_table = _BACKWARD_PLANS.get(key) or _backward_plan(*key)

    def forward_(x: torch.Tensor, table: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return _forward(f_rows, f_table, x) if table is None else forward(x, act, table)

    def backward_(dy: torch.Tensor, y: torch.Tensor, bits: torch.Tensor, g_table: torch.Tensor | None):
        if g_table is None:
            return _backward(b_rows, b_table, dy, y, bits)
        return backward(dy, y, bits, act, g_table=g_table)

    return forward_, backward_
