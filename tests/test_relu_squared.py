"""Squared ReLU keeping only its output: forward bitwise eager's, the gradient from √y at the information
limit (measured on every bfloat16 / float16 input and a float32 grid; the figures are in
``actpatch/kernels/relu_squared.py``), what autograd keeps, torch.compile, torch.func, the Triton kernels
(interpreter; GPU marked).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

import actpatch.functional as AF
from actpatch import nn as ann
from actpatch.accuracy import all_finite_values
from actpatch.kernels import relu_squared as reference
from actpatch.kernels.ops import DOUBLE_BACKWARD_ERROR
from actpatch.measure import saved_bytes

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
U = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # unit roundoff
SPECIALS = [0.0, -0.0, math.inf, -math.inf, math.nan, 1e-30, -1e-30, 1e-4, 3.0, -3.0, 255.9, 256.0, 1e20]


def eager(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


def every_input(dtype: torch.dtype) -> torch.Tensor:
    """Every bfloat16 / float16 value with ±inf and NaN; for float32 every 509th bit pattern of either sign
    (4.2 million each) and the specials."""
    if dtype != torch.float32:
        return torch.cat([all_finite_values(dtype), torch.tensor([math.inf, -math.inf, math.nan]).to(dtype)])
    positive = torch.arange(0, 0x7F800001, 509, dtype=torch.int64).to(torch.int32).view(torch.float32)
    return torch.cat([positive, -positive, torch.tensor(SPECIALS)])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Bitwise equal, or both NaN."""
    ints = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return (a.view(ints) == b.view(ints)) | (a.isnan() & b.isnan())


def grads(fn, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    fn(x).backward(dy)
    return x.grad


def saved_tensors(fn, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        y = fn(x)
    return y, saved


# ------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_is_eager_bitwise_on_every_input(dtype):
    """relu(x).square(), .pow(2) and r * r are the same one rounding; ours is that, bitwise."""
    x = every_input(dtype)
    r = F.relu(x)
    y = eager(x)
    assert same_bits(r.pow(2), y).all() and same_bits(r * r, y).all()
    xa = x.clone().requires_grad_(True)
    ya = AF.relu_squared(xa)
    assert "ReLUSquared" in type(ya.grad_fn).__name__
    assert same_bits(ya.detach(), y).all()


def test_module_is_transformers_relu2_bitwise():
    activations = pytest.importorskip("transformers.activations")
    theirs = activations.ACT2FN["relu2"]
    assert type(theirs).__name__ == "ReLUSquaredActivation"
    for dtype in DTYPES:
        x = every_input(dtype).requires_grad_(True)
        assert same_bits(ann.InvertedReLUSquared()(x).detach(), theirs(x).detach()).all()


# ------------------------------------------------------------------------------------------ gradient


def normal_y(x: torch.Tensor) -> torch.Tensor:
    """Where y = relu(x)² is a normal (finite, nonzero, not subnormal) number of x's dtype."""
    y = eager(x)
    return torch.isfinite(y) & (y >= torch.finfo(x.dtype).smallest_normal)


@pytest.mark.parametrize("dtype", DTYPES)
def test_root_of_y_is_relu_output_where_y_is_normal(dtype):
    """√(fl(r²)) rounded to r's dtype is r: y, rounded, still holds r whole."""
    x = every_input(dtype)
    x = x[normal_y(x)]
    assert x.numel() > 15_000 and torch.equal(reference.root(eager(x)), x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_is_eager_bitwise_where_y_is_normal_and_bounded_below(dtype):
    """On every input (float32: the grid), random dy: dx is eager's bitwise where y is normal, 0 where
    x <= 0 (as eager); where y is subnormal or 0, within √(2 s) |dy| (+ dx's rounding) of 2 r dy in
    float64, s the smallest subnormal, and that bound is reached."""
    x = every_input(dtype)
    x = x[~x.isnan()]
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    ours, theirs = grads(AF.relu_squared, x, dy), grads(eager, x, dy)
    normal = normal_y(x)
    assert same_bits(ours[normal], theirs[normal]).all()
    assert (ours[x <= 0] == 0).all() and (theirs[x <= 0] == 0).all()
    info = torch.finfo(dtype)
    tiny = (x > 0) & (eager(x) < info.smallest_normal)
    exact = (2 * x.double() * dy.double())[tiny]
    limit = math.sqrt(2 * info.smallest_normal * info.eps) * dy.double().abs()[tiny]  # √(2 s) |dy|
    err = (ours[tiny].double() - exact).abs()
    assert (err <= limit * (1 + 2.0**-20) + U[dtype] * exact.abs()).all()
    assert (err / limit).max() > 0.9


def test_edge_values_never_nan_but_for_nan_input():
    """y = 0 (x <= 0, -0, -inf: dx = 0 even for dy = ±inf or NaN, as eager's relu mask), y = inf (finite
    dx from r̂ = √max rounded, at most eager's), NaN x gives NaN dx as eager."""
    for dtype in DTYPES:
        big = 256.0 if dtype == torch.float16 else 2e19  # r² overflows
        x = torch.tensor([0.0, -0.0, -1.0, -math.inf, -1e-30, 0.0, -2.0, big, big, math.nan]).to(dtype)
        dy = torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0, math.inf, math.nan, 1.0, -3.0, 1.0]).to(dtype)
        ours, theirs = grads(AF.relu_squared, x, dy), grads(eager, x, dy)
        assert (ours[:7] == 0).all() and (theirs[:7] == 0).all()
        assert torch.isfinite(ours[7:9]).all() and (ours[7:9].abs() <= theirs[7:9].abs()).all()
        root_max = math.sqrt(torch.finfo(dtype).max)
        torch.testing.assert_close(
            ours[7:9].double(), 2 * root_max * dy[7:9].double(), rtol=2 * U[dtype], atol=0
        )
        assert ours[9].isnan() and theirs[9].isnan()


# ------------------------------------------------------------------------------------------ what is kept


@pytest.mark.parametrize("dtype", DTYPES)
def test_keeps_only_its_output(dtype):
    x = torch.randn(3, 37, dtype=dtype, requires_grad=True)
    y, saved = saved_tensors(AF.relu_squared, x)
    assert len(saved) == 1 and saved[0].data_ptr() == y.data_ptr()
    y_eager, saved_eager = saved_tensors(eager, x)
    assert {t.data_ptr() for t in saved_eager} == {saved_eager[0].data_ptr()} != {y_eager.data_ptr()}  # r


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_relu2_linear_keeps_the_linear_input_and_y_only(dtype):
    """Eager keeps x, r and y (the second Linear's input); inverted: x and y, shared with that Linear."""
    torch.manual_seed(0)
    x = torch.randn(4, 16, dtype=dtype)

    def model(act: torch.nn.Module) -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 64), act, torch.nn.Linear(64, 16)).to(dtype)

    size = dtype.itemsize
    eager_bytes, out_eager = saved_bytes(model(activations_relu2()), {"input": x})
    ours_bytes, out = saved_bytes(model(ann.InvertedReLUSquared()), {"input": x})
    assert eager_bytes == (4 * 16 + 2 * 4 * 64) * size
    assert ours_bytes == (4 * 16 + 4 * 64) * size
    assert torch.equal(out, out_eager)


def activations_relu2() -> torch.nn.Module:
    """transformers' ReLUSquaredActivation where it is installed, else the same ops."""
    try:
        from transformers.activations import ReLUSquaredActivation
    except ImportError:  # pragma: no cover
        return _EagerReLU2()
    return ReLUSquaredActivation()


class _EagerReLU2(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return eager(x)


def test_no_grad_float64_and_meta():
    x = torch.randn(10, requires_grad=True)
    with torch.no_grad():
        assert AF.relu_squared(x).grad_fn is None
    y, saved = saved_tensors(AF.relu_squared, torch.randn(10))
    assert y.grad_fn is None and saved == []
    x64 = torch.randn(10, dtype=torch.float64, requires_grad=True)
    assert "Pow" in type(AF.relu_squared(x64).grad_fn).__name__
    meta = torch.empty(4, 9, device="meta", requires_grad=True)
    y = AF.relu_squared(meta)
    assert y.device.type == "meta" and y.shape == (4, 9)


def test_double_backward_raises_a_clear_error():
    x = torch.randn(10, requires_grad=True)
    (g,) = torch.autograd.grad(AF.relu_squared(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="actpatch") as err:
        g.sum().backward()
    assert str(err.value) == DOUBLE_BACKWARD_ERROR
    (g,) = torch.autograd.grad(torch.ops.actpatch.relu_squared(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


# --------------------------------------------------------------------------------------- torch.compile


def test_compile_is_one_op_each_way_with_no_graph_break():
    """fullgraph (no graph break); the forward graph calls actpatch::relu_squared, the backward
    actpatch::relu_squared_backward, and neither relu nor pow; outputs and gradients are eager's."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, _inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes if n.op == "call_function"})
        return make_boxed_func(gm)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), ann.InvertedReLUSquared(), torch.nn.Linear(32, 4))
    x = torch.randn(5, 8)
    model(x).square().sum().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    out = compiled(x)
    out.square().sum().backward()
    fw, bw = graphs
    assert "actpatch.relu_squared.default" in fw and "actpatch.relu_squared_backward.default" in bw
    assert not any("relu.default" in t or "pow" in t for t in fw | bw if not t.startswith("actpatch"))
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    for a, b in zip(want, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()
    assert torch._dynamo.explain(model)(x).graph_break_count == 0


def test_compile_aot_eager_in_bfloat16():
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), ann.InvertedReLUSquared(), torch.nn.Linear(32, 4))
    model = model.to(torch.bfloat16)
    x = torch.randn(5, 8, dtype=torch.bfloat16, requires_grad=True)
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    out.float().square().sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    ref = model(xr)
    ref.float().square().sum().backward()
    assert torch.equal(out, ref) and torch.equal(x.grad, xr.grad)


# ------------------------------------------------------------------------------------------ torch.func


def close_at_scale(got: torch.Tensor, ref: torch.Tensor, rel: float = 1e-6) -> None:
    assert (got - ref).abs().max() <= rel * ref.abs().max(), ((got - ref).abs().max(), ref.abs().max())


def test_vmap_of_grad_and_jacrev_match_torch():
    xs = torch.randn(4, 5, 16, generator=torch.Generator().manual_seed(0))

    def loss(f):
        return lambda x: (f(x) * torch.arange(16.0)).sum()

    close_at_scale(vmap(grad(loss(AF.relu_squared)))(xs), vmap(grad(loss(eager)))(xs))
    x = torch.randn(7)
    close_at_scale(torch.func.jacrev(AF.relu_squared)(x.requires_grad_()), torch.func.jacrev(eager)(x))


def test_forward_mode_is_torch_exactly():
    """jvp (from x, kept for forward AD only): torch's 2 r · ṙ, bitwise."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    want = jvp(eager, (x,), (t,))[1]
    with fwAD.dual_level():
        out = AF.relu_squared(fwAD.make_dual(x.clone().requires_grad_(), t))
        assert "ReLUSquared" in type(out.grad_fn).__name__
        assert torch.equal(fwAD.unpack_dual(out).tangent, want)
    assert torch.equal(jvp(AF.relu_squared, (x,), (t,))[1], want)


@pytest.mark.parametrize(
    "transform",
    [torch.func.hessian, lambda f: torch.func.jacfwd(grad(f)), lambda f: torch.func.jacrev(grad(f))],
)
def test_second_derivatives_raise_actpatch_error(transform):
    with pytest.raises(RuntimeError, match="double backward") as err:
        transform(lambda x: AF.relu_squared(x).sum())(torch.randn(5))
    assert str(err.value) == DOUBLE_BACKWARD_ERROR


def test_vmap_over_the_custom_op_raises_actpatch_error():
    with pytest.raises(RuntimeError, match="actpatch::relu_squared"):
        vmap(torch.ops.actpatch.relu_squared)(torch.randn(3, 8))


# ---------------------------------------------------------------------------------------- Triton


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow notes from the interpreter
def test_triton_kernels_on_cpu():
    """Through Triton's interpreter: y and dx are the reference's (torch's ops) bitwise on every bf16 / fp16
    value and float32 specials, dy with ±inf and NaN; sizes with partial rows; non-contiguous x and dy."""
    pytest.importorskip("triton")
    from actpatch.kernels import triton_relu_squared as trs

    for dtype in DTYPES:
        x = every_input(dtype) if dtype != torch.float32 else torch.tensor(SPECIALS + [3e-20, 1e-25, 1e-45])
        x = torch.cat([x, (torch.randn(2003, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)])
        y = trs.forward(x)
        assert same_bits(y, eager(x)).all(), dtype
        dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
        dy[:5] = torch.tensor([math.inf, math.nan, 1.0, -1.0, 0.0])
        assert same_bits(trs.backward(dy, y), reference.backward(dy, y)).all(), dtype
    for n in (0, 1, 7, 8, 9, 2049):
        x = torch.randn(n, generator=torch.Generator().manual_seed(n))
        y = trs.forward(x)
        assert y.shape == (n,) and torch.equal(y, eager(x))
        assert torch.equal(trs.backward(x, y), reference.backward(x, y))
    base = torch.randn(37, 19, 3, dtype=torch.bfloat16)
    x = base.transpose(0, 1)
    y = trs.forward(x)
    assert y.stride() == torch.empty_like(x).stride() and torch.equal(y, eager(x))
    dy = torch.randn(3, 19, 37, dtype=torch.bfloat16).transpose(0, 2).transpose(0, 1)
    assert not dy.is_contiguous() and dy.shape == y.shape
    dx = trs.backward(dy, y)
    assert dx.stride() == dy.stride() and torch.equal(dx, reference.backward(dy, y))


def test_triton_under_triton_interpret_env():
    """The kernels as the interpreter sees them when TRITON_INTERPRET=1 is set before Triton's import."""
    pytest.importorskip("triton")
    code = (
        "import torch\n"
        "from actpatch.kernels import relu_squared as ref, triton_relu_squared as trs\n"
        "assert type(trs._forward_kernel).__name__ == 'InterpretedFunction'\n"
        "for dt in (torch.float32, torch.bfloat16, torch.float16):\n"
        "    x = (torch.randn(301) * 3).to(dt)\n"
        "    y = trs.forward(x)\n"
        "    assert torch.equal(y, ref.forward(x)), dt\n"
        "    dy = torch.randn_like(x)\n"
        "    assert torch.equal(trs.backward(dy, y), ref.backward(dy, y)), dt\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ GPU

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_kernels_on_every_input(dtype):
    """On CUDA: the Triton forward is torch's CUDA ops bitwise; the Triton backward is the reference's
    bitwise, subnormal y included, and eager's where y is normal; ops dispatch to the kernels."""
    from actpatch.kernels import ops
    from actpatch.kernels import triton_relu_squared as trs

    x = every_input(dtype).cuda()
    y = trs.forward(x)
    assert same_bits(y, eager(x)).all()
    dy = torch.randn(x.shape, device="cuda").to(dtype)
    dx = trs.backward(dy, y)
    assert same_bits(dx, reference.backward(dy, y)).all()
    normal = normal_y(x)
    assert same_bits(dx[normal], grads(eager, x, dy)[normal]).all()
    assert ops._RELU_SQUARED_KERNELS is trs
    xa = x.clone().requires_grad_(True)
    AF.relu_squared(xa).backward(dy)
    assert same_bits(xa.grad, reference.backward(dy, y)).all()


@gpu
@needs_cuda
def test_gpu_compile_inductor_fullgraph():
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), ann.InvertedReLUSquared(), torch.nn.Linear(256, 8)
    ).cuda()
    x = torch.randn(32, 64, device="cuda")
    torch.compile(model, fullgraph=True)(x).square().sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().sum().backward()
    for a, b in zip(got, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
