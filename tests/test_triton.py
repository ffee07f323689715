"""Triton kernels against the PyTorch reference.

On CPU the launchers run the kernels through Triton's interpreter (they wrap each kernel in an
InterpretedFunction for non-CUDA tensors, so this works whatever was imported first); one test also runs
them in a fresh process started with TRITON_INTERPRET=1.  Tests marked ``gpu`` need CUDA and run through
the device tool; a skip there is not a pass.

Tolerances: y within one unit in the last place of the dtype, plus |x|·2⁻²¹ where the formula cancels
(1 + erf(z) or 1 + tanh(z) deep in the left tail, y tiny); bits identical; dx within one ulp in
bfloat16/float16, and within 2e-6·|dy| + 1e-6·|dx| in float32 (the reference's t = u·n/v_max + n keeps
s = t - ⌊t⌋ to about 8e-6, so one-ulp differences in u move p by up to ~1e-6).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from actpatch.activations import ACTIVATIONS, inverse_table, table_for  # noqa: E402
from actpatch.kernels import reference  # noqa: E402
from actpatch.kernels import triton as tk  # noqa: E402
from actpatch.kernels.bits import pack_bits, packed_size  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAMES = list(ACTIVATIONS)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")

warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy overflow notes from the interpreter


def expected_bits(x: torch.Tensor, name: str) -> torch.Tensor:
    """pack([x >= x*]) with x compared in float32."""
    x_star = torch.tensor(ACTIVATIONS[name].x_star, dtype=torch.float32)
    return pack_bits(x.float() >= x_star.to(x.device))


def ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of |v| in ``dtype`` (subnormal spacing near zero), as float64."""
    info = torch.finfo(dtype)
    emin = math.log2(info.smallest_normal)
    e = torch.floor(torch.log2(v.double().abs().clamp_min(info.smallest_normal))).clamp_min(emin)
    return torch.exp2(e - {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype])


def assert_y_close(y: torch.Tensor, yr: torch.Tensor, x: torch.Tensor) -> None:
    """Equal, or within one ulp of the dtype plus |x|·2⁻²¹ (8 float32 ulps of the erf/tanh/exp term).

    On CPU, |x| >= 1e30 is left out and float32 subnormal results may differ by flushing: torch's CPU
    kernels overflow, give NaN or flush to zero there where CUDA's (and the kernels) do not.
    """
    assert y.shape == yr.shape and y.dtype == yr.dtype
    skip_huge = not y.is_cuda
    y, yr, x = y.cpu(), yr.cpu(), x.cpu()
    same = (y == yr) | (y.isnan() & yr.isnan())
    diff = (y.double() - yr.double()).abs()
    bound = ulp(yr, y.dtype) + x.double().abs().nan_to_num(posinf=0.0) * 2.0**-21
    ok = same | (torch.isfinite(y) & torch.isfinite(yr) & (diff <= bound))
    if skip_huge:
        ok |= ~(x.float().abs() < 1e30) | (diff <= torch.finfo(torch.float32).smallest_normal)
    assert ok.all(), f"y mismatch at x={x[~ok][:5].tolist()}: {y[~ok][:5].tolist()} vs {yr[~ok][:5].tolist()}"


def assert_dx_close(dx: torch.Tensor, dxr: torch.Tensor, dy: torch.Tensor) -> None:
    assert dx.shape == dxr.shape and dx.dtype == dxr.dtype
    dx, dxr, dy = dx.cpu(), dxr.cpu(), dy.cpu()
    same = (dx == dxr) | (dx.isnan() & dxr.isnan())
    diff = (dx.double() - dxr.double()).abs()
    if dx.dtype == torch.float32:
        bound = 2e-6 * dy.double().abs() + 1e-6 * dxr.double().abs()
    else:
        bound = ulp(dxr, dx.dtype)
    ok = same | (torch.isfinite(dx) & torch.isfinite(dxr) & (diff <= bound))
    assert ok.all(), f"dx mismatch: {dx[~ok][:5].tolist()} vs {dxr[~ok][:5].tolist()}"


def edge_inputs(name: str, dtype: torch.dtype) -> torch.Tensor:
    """Zeros, infinities, NaN, subnormals, the dtype's extremes, values around x*, and a random spread."""
    info = torch.finfo(dtype)
    tiny = float(info.smallest_normal)
    sub = tiny * 2.0 ** -(info.bits - 9 if dtype == torch.float32 else 3)
    specials = [0.0, -0.0, math.inf, -math.inf, math.nan, tiny, -tiny, sub, -sub, info.max, -info.max]
    specials += [1e-30, -1e-30, 1e4, -1e4, 60.0, -60.0, 90.0, -90.0, 120.0, -120.0]
    x_star = torch.tensor(ACTIVATIONS[name].x_star, dtype=torch.float32).to(dtype)
    near = [x_star]
    for direction in (-math.inf, math.inf):
        v = x_star
        for _ in range(6):
            v = torch.nextafter(v.float(), torch.tensor(direction)).to(dtype)
            if dtype != torch.float32:  # nextafter in float32 may round back; step in the dtype's grid
                v = v + torch.sign(torch.tensor(direction)).to(dtype) * ulp(v, dtype).to(dtype)
            near.append(v)
    g = torch.Generator().manual_seed(1234)
    parts = [
        torch.tensor(specials, dtype=torch.float32).to(dtype),
        torch.stack(near).to(dtype),
        (torch.randn(997, generator=g) * 4).to(dtype),
        torch.linspace(-12, 6, 1001).to(dtype),
        torch.linspace(-1.6, -0.5, 333).to(dtype),
    ]
    return torch.cat(parts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_forward_and_backward_match_reference(name, dtype):
    act = ACTIVATIONS[name]
    x = edge_inputs(name, dtype)
    y, bits = tk.forward(x, act)
    yr, _ = reference.forward(x, act)
    assert_y_close(y, yr, x)
    assert torch.equal(bits, expected_bits(x, name))
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    dx = tk.backward(dy, yr, bits, act)
    assert_dx_close(dx, reference.backward(dy, yr, bits, act), dy)
    finite = torch.isfinite(yr)
    assert torch.isfinite(dx[finite]).all()


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 2047, 2048, 2049, 5001])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sizes(n, dtype):
    act = ACTIVATIONS["silu"]
    x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3).to(dtype)
    y, bits = tk.forward(x, act)
    assert y.shape == (n,) and bits.shape == (packed_size(n),) and bits.dtype == torch.uint8
    assert_y_close(y, reference.forward(x, act)[0], x)
    assert torch.equal(bits, expected_bits(x, "silu"))
    dy = torch.randn_like(x)
    dx = tk.backward(dy, y, bits, act)
    assert_dx_close(dx, reference.backward(dy, y, bits, act), dy)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["gelu", "gelu_tanh"])
def test_non_contiguous(name, dtype):
    act = ACTIVATIONS[name]
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(37, 19, 3, generator=g) * 3).to(dtype)
    for x in (base.transpose(0, 1), base[:, ::2, 1], base.permute(2, 0, 1)):
        assert not x.is_contiguous()
        y, bits = tk.forward(x, act)
        yr, _ = reference.forward(x, act)
        assert y.shape == x.shape and y.stride() == torch.empty_like(x).stride()
        assert_y_close(y.reshape(-1), yr.reshape(-1), x.reshape(-1))
        assert torch.equal(bits, expected_bits(x, name))
        dy = torch.randn(x.shape[::-1], generator=g).to(dtype).transpose(0, -1)  # non-contiguous too
        dx = tk.backward(dy, y, bits, act)
        assert dx.shape == dy.shape
        assert_dx_close(dx.reshape(-1), reference.backward(dy, y, bits, act).reshape(-1), dy.reshape(-1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_backward_is_finite_on_every_finite_y(name, dtype):
    """y = ±0, subnormal, below y* by rounding, at y*, huge (right), +inf (right: g = 1)."""
    act = ACTIVATIONS[name]
    table = inverse_table(act)
    info = torch.finfo(dtype)
    ys = torch.tensor(table.y_star_hi, dtype=torch.float32)
    common = [0.0, -0.0, float(info.smallest_normal), -float(info.smallest_normal), -1e-30, 1e-30, -1e-3]
    common += [float(v) for v in (ys, torch.nextafter(ys, torch.tensor(-1.0)), ys - 1e-3, ys - 0.1)]
    right_only = [float(info.max), 5.0]
    y = torch.tensor(common + right_only + common, dtype=torch.float32).to(dtype)
    right = torch.tensor([True] * (len(common) + len(right_only)) + [False] * len(common))
    bits = pack_bits(right)
    dy = torch.ones_like(y)
    dx = tk.backward(dy, y, bits, act)
    assert torch.isfinite(dx).all(), dx
    assert_dx_close(dx, reference.backward(dy, y, bits, act), dy)
    y_inf = torch.tensor([math.inf], dtype=dtype)
    assert tk.backward(torch.ones_like(y_inf), y_inf, pack_bits(torch.tensor([True])), act).item() == 1.0


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=70),
    st.sampled_from(NAMES),
    st.sampled_from(DTYPES),
)
def test_property_any_float32_input(values, name, dtype):
    act = ACTIVATIONS[name]
    x = torch.tensor(values, dtype=torch.float32).to(dtype)
    y, bits = tk.forward(x, act)
    assert_y_close(y, reference.forward(x, act)[0], x)
    assert torch.equal(bits, expected_bits(x, name))
    dy = torch.ones_like(x)
    assert_dx_close(tk.backward(dy, y, bits, act), reference.backward(dy, y, bits, act), dy)


def same_bits(y: torch.Tensor, yr: torch.Tensor) -> torch.Tensor:
    """Bitwise equal (so +0 and -0 differ), or both NaN."""
    return (y.view(torch.int16) == yr.view(torch.int16)) | (y.isnan() & yr.isnan())


@pytest.mark.parametrize("name", tk.ARITHMETIC_FLOAT16)
def test_float16_forward_is_torch_on_every_value_table_or_arithmetic(name):
    """fp16 SiLU / QuickGELU run the arithmetic forward only where it was checked to be torch's on every
    float16 value (on a CPU: QuickGELU yes, SiLU no: numpy's exp is not torch's); y is torch's anyway."""
    from actpatch.kernels.lookup import every_value

    act = ACTIVATIONS[name]
    x = every_value(torch.float16)
    y, bits = tk.forward(x, act)
    assert same_bits(y, act.forward(x)).all()
    assert torch.equal(bits, expected_bits(x, name))


def test_float16_table_in_gather_order_puts_the_bf16_grid_side_by_side():
    """Entry i moves to rotr3(i), where the forward kernel reads x's bits: the float16 values with three
    low zero bits (those on the bfloat16 grid) fill the first 8,192 entries."""
    from actpatch.kernels.lookup import gather_order

    table = torch.arange(65536, dtype=torch.int32).to(torch.int16)  # entry i holds i's bits
    ordered = gather_order(table)
    assert ordered is gather_order(table)
    i = torch.arange(65536)
    assert torch.equal(ordered[((i >> 3) | (i << 13)) & 0xFFFF], table)
    assert not (ordered[:8192].long() & 7).any() and (ordered[8192:].long() & 7).all()


def test_float16_arithmetic_forward_that_is_not_torch_falls_back_to_the_table(monkeypatch):
    from actpatch.kernels.lookup import every_value

    monkeypatch.setitem(tk.ACT_CODES, "quick_gelu", tk.ACT_CODES["silu"])  # a wrong formula
    monkeypatch.setattr(tk, "_ARITHMETIC_IS_TORCH", {})
    monkeypatch.setattr(tk, "_FORWARD_PLANS", {})
    act = ACTIVATIONS["quick_gelu"]
    x = every_value(torch.float16)
    assert not tk._arithmetic_is_torch(act, x.dtype, x.device)
    assert same_bits(tk.forward(x, act)[0], act.forward(x)).all()


def test_under_triton_interpret_env():
    """The kernels as the interpreter sees them when TRITON_INTERPRET=1 is set before Triton's import
    (the RMSNorm backward's on a non-contiguous x)."""
    code = (
        "import torch\n"
        "from actpatch.activations import ACTIVATIONS\n"
        "from actpatch.kernels import reference, triton as tk\n"
        "assert type(tk._forward_kernel).__name__ == 'InterpretedFunction'\n"
        "for name, act in ACTIVATIONS.items():\n"
        "    for dt in (torch.float32, torch.bfloat16, torch.float16):\n"
        "        x = (torch.randn(301) * 3).to(dt)\n"
        "        y, b = tk.forward(x, act)\n"
        "        yr, br = reference.forward(x, act)\n"
        "        assert (y.float() - yr.float()).abs().max() <= 1e-2 * yr.float().abs().max()\n"
        "        dx = tk.backward(torch.ones_like(y), y, b, act)\n"
        "        dxr = reference.backward(torch.ones_like(y), y, b, act)\n"
        "        assert (dx.float() - dxr.float()).abs().max() <= 1e-2, (name, dt)\n"
        "from actpatch.kernels import rms_norm, triton_norm\n"
        "assert type(triton_norm._backward_kernel).__name__ == 'InterpretedFunction'\n"
        "for variant in rms_norm.VARIANTS:\n"
        "    for dt in (torch.float32, torch.float16):\n"
        "        x, w = (torch.randn(7, 3, 50) * 2).to(dt).transpose(0, 1), torch.rand(50).to(dt)\n"
        "        y, r = rms_norm.forward(x, w, 1e-6, variant)\n"
        "        dy = torch.randn(y.shape).to(y.dtype)\n"
        "        got = triton_norm.backward(dy, x, w, r, variant)\n"
        "        for g, e in zip(got, rms_norm.backward(dy, x, w, r, variant), strict=True):\n"
        "            assert (g.float() - e.float()).abs().max() <= 2e-3 * e.float().abs().max(), variant\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# ----------------------------------------------------------------------------------------------- GPU


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_gpu_forward_is_torch_and_backward_is_reference_on_every_16bit_value(name, dtype):
    from actpatch.accuracy import all_finite_values

    act = ACTIVATIONS[name]
    x = torch.cat([all_finite_values(dtype), torch.tensor([math.inf, -math.inf, math.nan]).to(dtype)]).cuda()
    y, bits = tk.forward(x, act)
    yr = act.forward(x)  # torch's own CUDA ops
    same = same_bits(y, yr).float().mean().item()
    assert same == 1.0, f"{same:.4%} bitwise equal"  # the table is torch's op; the arithmetic is checked
    assert torch.equal(bits, expected_bits(x, name))
    dy = torch.randn(x.shape, device="cuda").to(dtype)
    dx = tk.backward(dy, yr, bits, act)
    dxr = reference.backward(dy, yr, bits, act)
    assert_dx_close(dx, dxr, dy)
    assert torch.isfinite(dx[torch.isfinite(yr)]).all()


@gpu
@needs_cuda
@pytest.mark.parametrize("name", NAMES)
def test_gpu_float32(name):
    act = ACTIVATIONS[name]
    x = torch.cat([edge_inputs(name, torch.float32), torch.randn(1_000_003) * 4]).cuda()
    y, bits = tk.forward(x, act)
    yr = act.forward(x)
    assert_y_close(y, yr, x)
    assert torch.equal(bits, expected_bits(x, name))
    dy = torch.randn_like(x)
    assert_dx_close(tk.backward(dy, yr, bits, act), reference.backward(dy, yr, bits, act), dy)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_sizes_and_layouts(dtype):
    act = ACTIVATIONS["gelu"]
    for n in (1, 7, 8, 9, 2047, 2049, 1_000_001):
        x = (torch.randn(n, device="cuda") * 3).to(dtype)
        y, bits = tk.forward(x, act)
        assert_y_close(y, act.forward(x), x)
        assert torch.equal(bits, expected_bits(x, "gelu"))
    x = (torch.randn(129, 67, 5, device="cuda") * 3).to(dtype).transpose(0, 2)
    y, bits = tk.forward(x, act)
    assert y.stride() == torch.empty_like(x).stride()
    assert_y_close(y.reshape(-1), act.forward(x).reshape(-1), x.reshape(-1))
    assert torch.equal(bits, expected_bits(x, "gelu"))
    dy = torch.randn_like(x)
    assert_dx_close(tk.backward(dy, y, bits, act), reference.backward(dy, y, bits, act), dy)
    empty = torch.empty(0, 3, device="cuda", dtype=dtype)
    y, bits = tk.forward(empty, act)
    assert y.shape == (0, 3) and bits.numel() == 0
    assert tk.backward(empty, empty, bits, act).shape == (0, 3)


@gpu
@needs_cuda
def test_gpu_ops_dispatch_to_triton(monkeypatch):
    import actpatch.functional as AF

    calls = []
    fwd, bwd = tk._forward, tk._backward  # where every path's launches go (the eager path's resolved plans)
    monkeypatch.setattr(tk, "_forward", lambda *a, **k: (calls.append("f"), fwd(*a, **k))[1])
    monkeypatch.setattr(tk, "_backward", lambda *a, **k: (calls.append("b"), bwd(*a, **k))[1])
    x = torch.randn(1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    AF.silu(x).sum().backward()
    assert calls == ["f", "b"]


@gpu
@needs_cuda
def test_gpu_more_than_2_to_the_31_elements():
    n = 2**31 + 8 * 1000 + 3
    if torch.cuda.get_device_properties(0).total_memory < 40 * 2**30:
        pytest.skip("needs 40 GiB of GPU memory")
    act = ACTIVATIONS["silu"]
    x = torch.empty(n, device="cuda", dtype=torch.bfloat16).normal_(0, 3)
    y, bits = tk.forward(x, act)
    dx = tk.backward(y, y, bits, act)  # dy = y: no extra buffer
    tail = slice(n - 8 * 100_000 - 3, n)  # starts on a byte boundary: n - tail is a multiple of 8
    start = tail.start // 8
    assert_y_close(y[tail], act.forward(x[tail]), x[tail])
    assert torch.equal(bits[start:], expected_bits(x[tail], "silu"))
    assert_dx_close(dx[tail], reference.backward(y[tail], y[tail], bits[start:], act), y[tail])
    del x, y, bits, dx
    torch.cuda.empty_cache()


@gpu
@needs_cuda
def test_gpu_compile_has_no_graph_breaks():
    from actpatch.nn import InvertedGELU, InvertedSiLU

    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256),
        InvertedGELU(),
        torch.nn.Linear(256, 256),
        InvertedSiLU(),
        torch.nn.Linear(256, 8),
    ).cuda()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(32, 64, device="cuda")
    compiled(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    for a, b in zip(grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@gpu
@needs_two_gpus
def test_gpu_launches_run_on_the_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current (a model spread over GPUs): the kernels run on cuda:1,
    and give what they give on cuda:0."""
    act = ACTIVATIONS["silu"]
    x0 = (torch.randn(100_003, device="cuda:0") * 3).to(torch.bfloat16)
    dy0 = torch.randn_like(x0)
    x1, dy1 = x0.to("cuda:1"), dy0.to("cuda:1")
    assert torch.cuda.current_device() == 0
    for _ in range(2):  # the first launches compile
        y0, bits0 = tk.forward(x0, act)
        dx0 = tk.backward(dy0, y0, bits0, act)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            y1, bits1 = tk.forward(x1, act)
            dx1 = tk.backward(dy1, y1, bits1, act)
            torch.cuda.synchronize(1)
        kernels = [e for e in prof.events() if e.name.endswith("_kernel")]
        assert {e.name for e in kernels} >= {"_forward_lookup_kernel", "_backward_lookup_kernel"}, kernels
        assert {e.device_index for e in kernels} == {1}
        assert y1.device == dx1.device == x1.device
        for ours, there in ((y1, y0), (bits1, bits0), (dx1, dx0)):
            assert torch.equal(ours.cpu(), there.cpu())


def _left_inverse(act, y: torch.Tensor) -> torch.Tensor:
    """x on the left branch (x < x*) with f(x) = y, by bisection in float64."""
    lo = torch.full_like(y, -40.0)
    hi = torch.full_like(y, act.x_star)
    for _ in range(200):
        mid = (lo + hi) / 2
        above = act.forward(mid) > y  # the left branch falls from 0 to y*
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return (lo + hi) / 2


def test_the_coefficient_planes_hold_each_interval_as_two_vectors():
    act = ACTIVATIONS["silu"]
    table = table_for(act)
    planes = tk.interval_coefficients(act, table, torch.device("cpu"))
    assert planes.shape == (2, 32, 4)  # 30 intervals, a plane whole 128-byte lines
    rows = planes.transpose(0, 1).reshape(32, 8)  # interval i: powers 0-3, then 4-7 (highest first)
    assert torch.equal(rows[:30, :7], table.coefficients.float().T)
    assert not rows[30:].any() and not rows[:, 7:].any()
    with pytest.raises(ValueError, match="degrees up to 7"):
        tk.interval_coefficients(act, inverse_table(act, 4, 8), torch.device("cpu"))


@pytest.mark.parametrize("name", NAMES)
def test_the_near_segment_ends_where_the_tail_begins(name):
    """Every float32 y around y*/2 on the left branch (q = 1/2, where the near segment ends and the tail
    begins): t stays in its own segment, so g is f' there, in the reference and the kernel (both once read
    the tail's first interval as the near one's end: n + n⁻ rounds to 2n; gelu_tanh gave 1.43 for -0.12)."""
    act = ACTIVATIONS[name]
    half = torch.tensor(table_for(act).y_star_hi / 2, dtype=torch.float32)
    steps = torch.arange(-3000, 3001, dtype=torch.int32)
    y = (half.view(torch.int32) + steps).view(torch.float32)
    bits = pack_bits(torch.zeros(y.shape, dtype=torch.bool))
    x = _left_inverse(act, y.double()).requires_grad_()
    (exact,) = torch.autograd.grad(act.forward(x).sum(), x)
    dy = torch.ones_like(y)
    for g in (reference.backward(dy, y, bits, act), tk.backward(dy, y, bits, act)):
        assert (g.double() - exact).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["gelu", "silu"])
def test_the_eager_path_through_the_kernels_gives_what_the_kernels_give(monkeypatch, name, dtype):
    """``actpatch.functional`` with the kernels taking CPU tensors (the interpreter), through the calls
    resolved once per dtype and device (``ops.activation_calls``): y and dx those of ``forward`` and
    ``backward`` called directly, with and without a formula's tables, and over a non-contiguous x."""
    from transformers.activations import NewGELUActivation

    import actpatch.functional as AF
    from actpatch.kernels import ops

    monkeypatch.setattr(ops, "_on_gpu", lambda t: True)
    monkeypatch.setattr(ops, "_EAGER_PLANS", {})
    act = ACTIVATIONS[name]
    x = (torch.randn(3, 67) * 3).to(dtype)
    for xs in (x, x.t()):
        leaf = xs.detach().requires_grad_()
        y = AF.gelu(leaf) if name == "gelu" else AF.silu(leaf)
        dy = torch.randn_like(y)
        (dx,) = torch.autograd.grad(y, leaf, dy)
        y_k, bits = tk.forward(xs, act)
        assert torch.equal(y, y_k) and torch.equal(dx, tk.backward(dy, y_k, bits, act))
    if dtype != torch.float32:  # a formula's tables: y is the formula's own
        leaf, formula = x.detach().requires_grad_(), NewGELUActivation()
        y = AF.gelu(leaf, "tanh", formula=formula)
        assert torch.equal(y, formula(x))
        (dx,) = torch.autograd.grad(y, leaf, torch.ones_like(y))
        assert torch.isfinite(dx.float()).all()
