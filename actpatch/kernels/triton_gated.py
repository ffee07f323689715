"""Fused Triton kernels for the gated products of ``gated.py`` (CUDA; Triton's interpreter in tests).

forward(a, b)              reads a and b once; writes m = act(a) · b, k (a, or b where |act(a)| < T) and
                           the two bit masks [u (k holds b), z (a > -1)] once.
backward(dm, m, k, bits)   reads them once; writes da and db once.
halves_forward(gate_up), halves_backward(dm, m, k, bits)
                           the same kernels on the two halves of one gate_up [.., 2I], read in place (rows
                           of stride 2I, no contiguous copies of them), and d(gate_up) written as one
                           [.., 2I] tensor, da and db each into its half (no concatenation after); for I a
                           multiple of 8 (``HALVES``), otherwise as forward and backward on copies.

The arithmetic is ``gated.py``'s, element by element, in float32 with the dtype's roundings where torch
rounds: act(a) as torch's own CUDA kernels compute it (``act``), rounded to the dtype; the product of the
rounded values, rounded; in backward, b = m / act(a) rounded to the dtype, clamped to its finite range,
and act'(a) as torch's silu_backward / gelu_backward compute it (``act_grad``).  Compiled, the backward
takes b = m / act(a) and the sigmoid in SiLU' from the hardware's approximate reciprocal (1 ulp), and
GELU's density exp(-a²/2) from its approximate exp (1e-6 relative for |a| <= 4, where it counts), where
torch divides and exponentiates to 0.5-1 ulp: da is rounded to bf16/fp16, and in float32 stays within 1e-5
of its scale.  act(a) itself, and so m and db = dm · act(a), is torch's bitwise for SiLU (its division on
``_div_rn``'s fast path) and GELU tanh in every dtype.  GELU (erf) in bfloat16 and float16 reads act(a),
forward and backward, from the table of torch's own op at every value of the dtype on the device
(``lookup.forward_table``, one 2-byte gather per element; ``TABLE``), so it is torch's bitwise too; in
float32 act(a) is libdevice's erf formula (Triton's bundled libdevice), within an ulp of torch's CUDA erf
but not bitwise.  Tiles are [ROWS, 8] as in ``triton.py``, so each bit-mask byte belongs to one tile row.
The halves' element offsets come from ``_strided``.
Under Triton's interpreter (only with TRITON_INTERPRET=1, where nested kernels work) float32 and float16
match torch; bfloat16 is rounded by truncation there, so it is checked on the GPU only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..activations import ACTIVATIONS
from . import lookup
from .gated import KEEP_B_BELOW, halves
from .triton import Rows, _kernel, libdevice

GATED_CODES = {"gelu": 0, "gelu_tanh": 1, "silu": 2}
# Launch shapes, ROWS rows of 8 elements per program with this many warps, the fastest in the H200 sweep
# (benchmarks/kernels.py --sweep-gated, silu_mul + gelu_mul, bf16 8192 x 14336):
FORWARD_ROWS, FORWARD_WARPS = 64, 2  # 0.2414 + 0.2550 ms against 0.2428 + 0.2548 at 128 x 4
# the backward with dm and k issued first: 0.2842 + 0.3826 (64 x 2: 0.2840 + 0.3825, 64 x 4: 0.3095 + 0.4703)
BACKWARD_ROWS, BACKWARD_WARPS = 128, 4


@triton.jit
def _exp(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.exp(x)
    return tl.exp(x)


@triton.jit
def _erf(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.erf(x)
    return tl.math.erf(x)


@triton.jit
def _tanh(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        return libdevice.tanh(x)
    e = tl.exp(-2.0 * tl.abs(x))  # tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _rcp(x, LIBDEVICE: tl.constexpr):
    """1 / x; compiled, the hardware's approximation (1 ulp; 0 past 2^126, as subnormals flush)."""
    if LIBDEVICE:
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    return 1.0 / x


@triton.jit
def _div_rn(x, d, IN_RANGE: tl.constexpr, LIBDEVICE: tl.constexpr):
    """x / d correctly rounded.  IN_RANGE (compiled): div.rn.f32's own fast path (Markstein's correction of
    x times a refined reciprocal) without its range check and slow path, which hold registers; it gives
    div.rn's result for d in [1, 2^126) and x / d normal or 0 (and for x = +inf), as SiLU's backward has."""
    if IN_RANGE and LIBDEVICE:
        return tl.inline_asm_elementwise(
            """{ .reg .f32 r, e, q, t, nd; .reg .pred p;
            neg.f32 nd, $2; rcp.approx.ftz.f32 r, $2; fma.rn.f32 e, nd, r, 0f3F800000; fma.rn.f32 r, e, r, r;
            mul.rn.f32 q, $1, r; fma.rn.f32 t, nd, q, $1; fma.rn.f32 $0, t, r, q;
            testp.notanumber.f32 p, t; @p mov.f32 $0, q; }""",
            "=r,r,r", [x, d], dtype=tl.float32, is_pure=True, pack=1,
        )  # fmt: skip
    return tl.math.div_rn(x, d)


@triton.jit
def act(x, ACT: tl.constexpr, LIBDEVICE: tl.constexpr, IN_RANGE: tl.constexpr = False):
    """act(x) in float32, written as torch's CUDA kernels write it; IN_RANGE: only for x = 0 or |act(x)| >= T
    (``_div_rn``)."""
    if ACT == 0:  # GELU: x * 0.5 * (1 + erf(x * M_SQRT1_2))
        return x * 0.5 * (1.0 + _erf(x * 0.7071067811865476, LIBDEVICE))
    elif ACT == 1:  # GELU tanh: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
        return 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * (x * x * x)), LIBDEVICE))
    else:  # SiLU: x / (1 + exp(-x))
        return _div_rn(x, 1.0 + _exp(-x, LIBDEVICE), IN_RANGE, LIBDEVICE)


@triton.jit
def act_grad(x, ACT: tl.constexpr, LIBDEVICE: tl.constexpr):
    """act'(x) in float32, written as torch's gelu_backward / silu_backward CUDA kernels write it."""
    if ACT == 0:  # cdf + x * pdf, pdf = exp(-x^2 / 2) / sqrt(2 pi)
        cdf = 0.5 * (1.0 + _erf(x * 0.7071067811865476, LIBDEVICE))
        return cdf + x * (tl.exp(-0.5 * x * x) * 0.3989422804014327)  # the fast exp
    elif ACT == 1:
        inner = 0.7978845608028654 * (x + 0.044715 * (x * x * x))
        t = _tanh(inner, LIBDEVICE)
        dinner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dinner
    else:  # sigmoid * (1 + x * (1 - sigmoid)), the sigmoid to 1 ulp
        s = _rcp(1.0 + _exp(-x, LIBDEVICE), LIBDEVICE)
        return s * (1.0 + x * (1.0 - s))


@triton.jit
def _tile(n_elements, row_start, ROWS: tl.constexpr, FULL_ROWS: tl.constexpr):
    rows = row_start + tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, 8)
    offs = rows[:, None] * 8 + cols[None, :]
    if FULL_ROWS:  # one mask per row of 8: loads and stores stay vectors
        row_mask = rows < n_elements // 8
        mask = tl.broadcast_to(row_mask[:, None], [ROWS, 8])
    else:
        row_mask = rows * 8 < n_elements
        mask = offs < n_elements
    return rows, cols, offs, row_mask, mask


@triton.jit
def _strided(rows, cols, offs, width, stride, HALVES: tl.constexpr):
    """Where the flat elements ``offs`` of a and b (da, db) are.  HALVES: in rows of ``width`` elements (a
    multiple of 8), ``stride`` apart (a multiple of 8), offs + (offs // width) · (stride - width): a tile
    row's 8 elements lie in one row, contiguous from a multiple of 8 (one division per tile row; the dense
    layout's 16-byte vector loads and stores).  Otherwise offs itself (dense)."""
    if HALVES:
        first = rows * 8
        start = tl.multiple_of(first + (first // width) * (stride - width), 8)
        return start[:, None] + cols[None, :]
    return offs


@triton.jit
def _forward_kernel(
    a_ptr, b_ptr, m_ptr, k_ptr, bits_ptr, table_ptr, n_elements, n_bytes, width, stride, row_start,
    keep_below, ACT: tl.constexpr, ROWS: tl.constexpr, FULL_ROWS: tl.constexpr, LIBDEVICE: tl.constexpr,
    TABLE: tl.constexpr, HALVES: tl.constexpr,
):  # fmt: skip
    rows, cols, offs, row_mask, mask = _tile(n_elements, row_start, ROWS, FULL_ROWS)
    ab = _strided(rows, cols, offs, width, stride, HALVES)
    a = tl.load(a_ptr + ab, mask=mask, other=0)
    b = tl.load(b_ptr + ab, mask=mask, other=0)
    af = a.to(tl.float32)
    if TABLE:  # torch's act(a): the entry of a's bits
        index = a.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        s = tl.load(table_ptr + index, mask=mask, other=0).to(a.dtype, bitcast=True)
    else:
        s = act(af, ACT, LIBDEVICE).to(a.dtype)
    m = (s.to(tl.float32) * b.to(tl.float32)).to(a.dtype)
    keep_b = (tl.abs(s.to(tl.float32)) < keep_below) & mask
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(k_ptr + offs, tl.where(keep_b, b, a), mask=mask)
    u = tl.reduce(keep_b.to(tl.int32) << cols[None, :], 1, tl.standard._sum_combine)
    z = tl.reduce(((af > -1.0) & mask).to(tl.int32) << cols[None, :], 1, tl.standard._sum_combine)
    tl.store(bits_ptr + rows, u.to(tl.uint8), mask=row_mask)
    tl.store(bits_ptr + n_bytes + rows, z.to(tl.uint8), mask=row_mask)


@triton.jit
def _backward_kernel(
    dm_ptr, m_ptr, k_ptr, bits_ptr, table_ptr, da_ptr, db_ptr, n_elements, n_bytes, width, stride,
    row_start, top, ACT: tl.constexpr, ROWS: tl.constexpr, FULL_ROWS: tl.constexpr, LIBDEVICE: tl.constexpr,
    TABLE: tl.constexpr, HALVES: tl.constexpr,
):  # fmt: skip
    rows, cols, offs, row_mask, mask = _tile(n_elements, row_start, ROWS, FULL_ROWS)
    u = tl.load(bits_ptr + rows, mask=row_mask, other=0).to(tl.int32)
    z = tl.load(bits_ptr + n_bytes + rows, mask=row_mask, other=0).to(tl.int32)
    keep_b = ((u[:, None] >> cols[None, :]) & 1) != 0
    kept_far = (((u & ~z)[:, None] >> cols[None, :]) & 1) != 0  # u and not z: da = 0
    # dm and k as volatile loads, which keep their program order: dm is issued before k, which act(a)
    # needs first; else ptxas issues dm's load only after act(a), a second memory latency per thread
    # (H200, silu_mul bf16 8192 x 14336: 0.288 ms against 0.313-0.325)
    dm = tl.load(dm_ptr + offs, mask=mask, other=0, volatile=True)
    m = tl.load(m_ptr + offs, mask=mask, other=0).to(tl.float32)
    k16 = tl.load(k_ptr + offs, mask=mask, other=0, volatile=True)
    k = k16.to(tl.float32)
    dmf = dm.to(tl.float32)
    a = tl.where(keep_b, 0.0, k)
    if TABLE:  # the forward's entry: of a's bits, or of 0's (act(0) = 0) under u
        index = tl.where(keep_b, 0, k16.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)
        s = tl.load(table_ptr + index, mask=mask, other=0).to(dm.dtype, bitcast=True).to(tl.float32)
    else:
        s = act(a, ACT, LIBDEVICE, IN_RANGE=True).to(dm.dtype).to(tl.float32)
    # m / s to 2 ulp: |s| >= T, so s / 4 and 4 / s are normal (1 / s past 2^126 stays subnormal, not 0)
    ratio = tl.minimum(tl.maximum(m * (_rcp(s * 0.25, LIBDEVICE) * 0.25), -top), top)  # NaN stays NaN
    b = tl.where(keep_b, k, ratio).to(dm.dtype).to(tl.float32)
    db = dmf * s  # s = act(0) = 0 under u
    grad_s = (dmf * b).to(dm.dtype).to(tl.float32)
    da = tl.where(kept_far, 0.0, grad_s * act_grad(a, ACT, LIBDEVICE))  # act'(0) = 1/2 under u and z
    ab = _strided(rows, cols, offs, width, stride, HALVES)
    tl.store(da_ptr + ab, da.to(dm.dtype), mask=mask)
    tl.store(db_ptr + ab, db.to(dm.dtype), mask=mask)


def _table(name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """GELU (erf) in bfloat16 / float16: torch's own op at every value of the dtype on ``device``
    (``lookup.forward_table``), which the kernels read act(a) from; None (act computed) otherwise."""
    if name == "gelu" and dtype in lookup.DTYPES:
        return lookup.forward_table(ACTIVATIONS["gelu"], dtype, device)
    return None


# (name, dtype, device, halves) -> (rows launch, table or None), resolved at the first call
_FORWARD_PLANS: dict[tuple, tuple] = {}
_BACKWARD_PLANS: dict[tuple, tuple] = {}


def _forward_plan(
    name: str, dtype: torch.dtype, device: torch.device, halves: bool
) -> tuple[Rows, torch.Tensor | None]:
    kernel, compiled = _kernel(_forward_kernel, device)
    table = _table(name, dtype, device)
    kwargs = {
        "keep_below": KEEP_B_BELOW[dtype], "ACT": GATED_CODES[name], "LIBDEVICE": compiled,
        "TABLE": table is not None, "HALVES": halves,
    }  # fmt: skip
    rows = Rows(kernel, FORWARD_ROWS, FORWARD_WARPS, kwargs)
    return _FORWARD_PLANS.setdefault((name, dtype, device, halves), (rows, table))


def _backward_plan(
    name: str, dtype: torch.dtype, device: torch.device, halves: bool
) -> tuple[Rows, torch.Tensor | None]:
    kernel, compiled = _kernel(_backward_kernel, device)
    table = _table(name, dtype, device)
    kwargs = {
        "top": float(torch.finfo(dtype).max), "ACT": GATED_CODES[name], "LIBDEVICE": compiled,
        "TABLE": table is not None, "HALVES": halves,
    }  # fmt: skip
    rows = Rows(kernel, BACKWARD_ROWS, BACKWARD_WARPS, kwargs)
    return _BACKWARD_PLANS.setdefault((name, dtype, device, halves), (rows, table))


def forward(a: torch.Tensor, b: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m, k, bits) as ``gated.forward`` returns them; m and k contiguous, shaped like a."""
    return _forward(a.contiguous(), b.contiguous(), name, 1, 1, False)


def halves_forward(
    gate_up: torch.Tensor, name: str, gate_first: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m, k, bits) as ``gated.halves_forward`` returns them, each half of gate_up (last dimension 2I, even;
    copied first only where gate_up is not contiguous) read where it lies where I is a multiple of 8.
    Otherwise rows would share tiles of 8, whose per-element offsets change the compiled arithmetic (float32
    GELU tanh's da moved by an ulp on the H200): ``forward`` on the halves, copied, as before."""
    gate_up = gate_up.contiguous()
    width = gate_up.shape[-1] // 2
    a, b = halves(gate_up, gate_first)
    return _forward(a, b, name, width, 2 * width, True) if width % 8 == 0 else forward(a, b, name)


def backward(
    dm: torch.Tensor, m: torch.Tensor, k: torch.Tensor, bits: torch.Tensor, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(da, db) as ``gated.backward`` returns them."""
    dm = dm.contiguous()
    da, db = dm.new_empty(dm.shape), dm.new_empty(dm.shape)
    _backward(dm, m, k, bits, da, db, name, 1, 1, False)
    return da, db


def halves_backward(
    dm: torch.Tensor, m: torch.Tensor, k: torch.Tensor, bits: torch.Tensor, name: str, gate_first: bool
) -> torch.Tensor:
    """d(gate_up) as ``gated.halves_backward`` returns it: one fresh [.., 2I] tensor, da and db written into
    its halves (I not a multiple of 8: ``backward``'s, concatenated, as ``halves_forward``)."""
    dm = dm.contiguous()
    width = dm.shape[-1]
    if width % 8:
        da, db = backward(dm, m, k, bits, name)
        return torch.cat((da, db) if gate_first else (db, da), dim=-1)
    d_gate_up = dm.new_empty((*dm.shape[:-1], 2 * width))
    _backward(dm, m, k, bits, *halves(d_gate_up, gate_first), name, width, 2 * width, True)
    return d_gate_up


def _forward(
    a: torch.Tensor, b: torch.Tensor, name: str, width: int, stride: int, halves: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward kernel on a and b (dense, or ``halves``: rows of ``width`` elements, ``stride`` apart)."""
    n = a.numel()
    m, k = a.new_empty(a.shape), a.new_empty(a.shape)
    n_bytes = (n + 7) >> 3
    bits = torch.empty(2 * n_bytes, dtype=torch.uint8, device=a.device)
    if n:
        key = name, a.dtype, a.device, halves
        rows, table = _FORWARD_PLANS.get(key) or _forward_plan(*key)
        rows(n, (a, b, m, k, bits, bits if table is None else table, n, n_bytes, width, stride))
    return m, k, bits


def _backward(
    dm: torch.Tensor, m: torch.Tensor, k: torch.Tensor, bits: torch.Tensor, da: torch.Tensor,
    db: torch.Tensor, name: str, width: int, stride: int, halves: bool,
) -> None:  # fmt: skip
    """The backward kernel from dm (contiguous) and the saved tensors into da and db (dense, or ``halves``:
    rows of ``width`` elements, ``stride`` apart)."""
    n = dm.numel()
    if n:
        key = name, dm.dtype, dm.device, halves
        rows, table = _BACKWARD_PLANS.get(key) or _backward_plan(*key)
        saved = (m.contiguous(), k.contiguous(), bits, bits if table is None else table)
        rows(n, (dm, *saved, da, db, n, (n + 7) >> 3, width, stride))
