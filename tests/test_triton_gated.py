"""The gated products' Triton kernels: under Triton's interpreter (float32, float16) and on the GPU."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actpatch.kernels import gated, lookup
from actpatch.kernels.bits import packed_size

NAMES = list(gated.GATED)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def inputs(dtype: torch.dtype, n: int = 4001, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """Gates with ±0, tiny, very negative and huge values; ups with zeros; a random dm."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, generator=g) * 3
    a[:8] = torch.tensor([0.0, -0.0, 1e-6, -1e-6, -30.0, -1e4, 2.0**-14, 40.0])
    b = torch.randn(n, generator=g)
    b[-4:] = 0.0
    dm = torch.randn(n, generator=g)
    return tuple(t.to(dtype).to(device) for t in (a, b, dm))


def close_at_scale(got: torch.Tensor, ref: torch.Tensor, rel: float) -> bool:
    return bool((got.float() - ref.float()).abs().max() <= rel * ref.float().abs().max())


def check(name: str, dtype: torch.dtype, device: str, kernels) -> None:
    """Kernels against gated.py, which calls torch's own ops: k and the bits equal; m, db and da within
    the dtype's rounding at their scale (act and act' are written as torch's CUDA kernels write them,
    which agree with torch's to an ulp of act, more in the cancelling tail of 1 + erf)."""
    a, b, dm = inputs(dtype, device=device)
    m, k, bits = kernels.forward(a, b, name)
    mr, kr, bitsr = gated.forward(a, b, name)
    rel = 1e-5 if dtype == torch.float32 else float(torch.finfo(dtype).eps)
    assert torch.equal(k, kr) and torch.equal(bits, bitsr), (name, dtype)
    assert close_at_scale(m, mr, rel), (name, dtype)
    da, db = kernels.backward(dm, m, k, bits, name)
    dar, dbr = gated.backward(dm, mr, kr, bitsr, name)
    assert close_at_scale(db, dbr, rel) and close_at_scale(da, dar, rel), (name, dtype)


def check_overflow(name: str, dtype: torch.dtype, device: str, kernels) -> None:
    """A product past the dtype's range (docs/accuracy.md): the kernels give the reference's gradients
    (da = dm · sign(up) · max · act'(gate) there), to act's rounding as in ``check``."""
    from test_gated import overflow_case

    a, b, dm = (t.to(device) for t in overflow_case(dtype))
    da, db = kernels.backward(dm, *kernels.forward(a, b, name), name)
    dar, dbr = gated.backward(dm, *gated.forward(a, b, name), name)
    rel = 1e-5 if dtype == torch.float32 else float(torch.finfo(dtype).eps)
    assert close_at_scale(db, dbr, rel) and close_at_scale(da, dar, rel), (name, dtype)


def check_eagers_bitwise(name: str, dtype: torch.dtype, device: str, kernels) -> None:
    """On every value a of a 16-bit dtype (b, dm random): m equals eager's act(a) · b bitwise, and
    db = dm · act(a) eager's product backward wherever |act(a)| >= T (any NaN for NaN)."""
    a = lookup.every_value(dtype, device)
    g = torch.Generator().manual_seed(0)
    b, dm = (torch.randn(a.shape, generator=g).to(dtype).to(device) for _ in range(2))
    s = gated.act_forward(name, a)  # torch's own op
    m, k, bits = kernels.forward(a, b, name)
    _, db = kernels.backward(dm, m, k, bits, name)
    kept = s.float().abs() >= gated.KEEP_B_BELOW[dtype]
    for what, got, ref in (("m", m, s * b), ("db", db[kept], (dm * s)[kept])):
        same = (got.view(torch.int16) == ref.view(torch.int16)) | (got.isnan() & ref.isnan())
        assert same.all(), f"{name} {dtype} {what}: {same.float().mean().item():.4%} bitwise eager's"


def run_interpreted(lines: str) -> None:
    """``lines`` in a fresh Python with TRITON_INTERPRET=1 before Triton's import (the kernels run on CPU
    tensors), with ``t`` this module and ``k`` triton_gated."""
    code = (
        "import torch, test_triton_gated as t\n"
        "from actpatch.kernels import triton_gated as k\n"
        "assert type(k._forward_kernel).__name__ == 'InterpretedFunction'\n"
        f"{lines}"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).parent))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_under_triton_interpret_env():
    """The kernels against gated.py under the interpreter (bf16 rounds by truncation there, so bf16 is
    left to the GPU tests)."""
    run_interpreted(
        "for name in t.NAMES:\n"
        "    for dt in (torch.float32, torch.float16):\n"
        "        t.check(name, dt, 'cpu', k)\n"
        "        t.check_overflow(name, dt, 'cpu', k)\n"
    )


def test_interpreted_gelu_mul_is_eagers_bitwise_on_every_float16():
    """GELU (erf) reads torch's act(a) from the device's table (here the CPU's) in forward and backward."""
    run_interpreted("t.check_eagers_bitwise('gelu', torch.float16, 'cpu', k)\n")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_gpu_kernels_match_the_reference(name, dtype):
    from actpatch.kernels import triton_gated

    check(name, dtype, "cuda", triton_gated)
    check_overflow(name, dtype, "cuda", triton_gated)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_gelu_mul_is_eagers_bitwise_on_every_value(dtype):
    from actpatch.kernels import triton_gated

    check_eagers_bitwise("gelu", dtype, "cuda", triton_gated)


@pytest.mark.gpu
@needs_cuda
def test_gpu_silu_mul_matches_eager():
    import torch.nn.functional as F

    import actpatch.functional as AF

    a, b, dm = inputs(torch.bfloat16, n=3 * 4096 + 5, device="cuda")
    a.requires_grad_()
    b.requires_grad_()
    m = AF.silu_mul(a, b)
    mr = F.silu(a) * b
    assert close_at_scale(m, mr, 2**-8)
    (da, db), (dar, dbr) = torch.autograd.grad(m, (a, b), dm), torch.autograd.grad(mr, (a, b), dm)
    assert close_at_scale(db, dbr, 2**-8) and close_at_scale(da, dar, 2**-8)
    same = (m == mr).float().mean().item()
    assert same > 0.99, f"{same:.4%} of the product bitwise equal to eager's"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_gpu_backward_recomputes_the_forwards_act_bitwise(name, dtype):
    """db = dm · act(a) with the backward's act(a) bitwise the forward's (SiLU's division there on div.rn's
    fast path alone) wherever |act(a)| >= T: on every 16-bit gate, in float32 on 2^22 at scale 8 and ±inf."""
    from actpatch.kernels import triton_gated

    if dtype == torch.float32:
        a = torch.cat(
            [torch.randn(2**22, device="cuda") * 8, torch.tensor([math.inf, -math.inf], device="cuda")]
        )
    else:
        a = torch.arange(-(2**15), 2**15, dtype=torch.int32, device="cuda").to(torch.int16).view(dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    b, dm = (torch.randn(a.shape, device="cuda", generator=g).to(dtype) for _ in range(2))
    s = triton_gated.forward(a, torch.ones_like(a), name)[0]  # act(a) · 1
    _, db = triton_gated.backward(dm, *triton_gated.forward(a, b, name), name)
    kept_gate = s.float().abs() >= gated.KEEP_B_BELOW[dtype]
    got, ref = db[kept_gate], (dm * s)[kept_gate]
    assert ((got == ref) | (got.isnan() & ref.isnan())).all(), (name, dtype)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_gpu_halves_kernels_are_the_two_tensor_kernels_bitwise(name, dtype):
    """The halves of one gate_up read in place give the two-tensor kernels' m, k, bits on chunk's views, and
    d(gate_up) their (da, db) side by side, bitwise: widths multiple of 16, of 8 only (4104) (and 13,
    copied as before); 1-D to 3-D; both orders; a gate_up that is not contiguous (copied first)."""
    from test_gated_halves import gate_up_inputs

    from actpatch.kernels import triton_gated as k

    for shape in ((3, 37, 2 * 1024), (7, 2 * 4104), (5, 2 * 13), (2 * 24,), (9, 2 * 40)):
        for gate_first in (True, False):
            gu, dm = (t.cuda() for t in gate_up_inputs(shape, dtype, gate_first))
            if shape[0] == 9:
                gu = gu.mT.contiguous().mT
            m, kk, bits = k.halves_forward(gu, name, gate_first)
            m2, k2, bits2 = k.forward(*gated.halves(gu, gate_first), name)
            assert torch.equal(m, m2) and torch.equal(kk, k2) and torch.equal(bits, bits2), (
                shape,
                gate_first,
            )
            d = k.halves_backward(dm, m, kk, bits, name, gate_first)
            da, db = k.backward(dm, m2, k2, bits2, name)
            assert torch.equal(d, torch.cat((da, db) if gate_first else (db, da), -1)), (shape, gate_first)


@pytest.mark.gpu
@needs_cuda
def test_gpu_halves_fwd_bwd_allocates_its_outputs_alone():
    """One ``torch.autograd.grad`` of silu_mul_halves on a [4096, 2 x 4096] bf16 gate_up peaks, above its
    inputs, at m, k, the bits and d(gate_up) (4 half-sized tensors and the bits; within the caching
    allocator's rounding, under 1 MiB a block); chunk + silu_mul on the views peaks at 5 (m, still held by
    the call, da and db, and chunk's concatenation of them; in forward, the two contiguous copies, m, k)."""
    import actpatch.functional as AF

    rows, width = 4096, 4096
    gu = torch.randn(rows, 2 * width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dm = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)

    def peak(product) -> int:
        product(gu)  # compile and warm up outside the measure
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.autograd.grad(product(gu), gu, dm)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    half, bits = rows * width * 2, 2 * packed_size(rows * width)
    new = peak(lambda g: AF.silu_mul_halves(g, gate_first=False))
    old = peak(lambda g: AF.silu_mul(*g.chunk(2, dim=-1)[::-1]))
    assert 4 * half + bits <= new <= 4 * half + bits + 5 * 2**20, (new, old)
    assert old >= 5 * half, (new, old)
