"""Forward equality, what autograd keeps, edge values, no-grad paths, compile and meta tensors."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import actpatch.functional as AF
from actpatch import nn as ann
from actpatch.accuracy import all_finite_values
from actpatch.activations import ACTIVATIONS
from actpatch.kernels.bits import pack_bits, packed_size, unpack_bits
from actpatch.kernels.ops import DOUBLE_BACKWARD_ERROR

FUNCS = {
    "gelu": (lambda x: AF.gelu(x), lambda x: F.gelu(x)),
    "gelu_tanh": (lambda x: AF.gelu(x, approximate="tanh"), lambda x: F.gelu(x, approximate="tanh")),
    "silu": (AF.silu, F.silu),
    "quick_gelu": (AF.quick_gelu, lambda x: x * torch.sigmoid(1.702 * x)),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def saved_tensors(fn, x):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        y = fn(x)
    return y, saved


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(FUNCS))
def test_forward_is_bitwise_torch(name, dtype):
    ours, theirs = FUNCS[name]
    x = all_finite_values(torch.bfloat16).to(dtype) if dtype != torch.float16 else all_finite_values(dtype)
    x = x.clone().requires_grad_(True)
    y = ours(x)
    assert y.grad_fn is not None and "actpatch" in type(y.grad_fn).__name__.lower()
    torch.testing.assert_close(y, theirs(x.detach()), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(FUNCS))
def test_saves_only_the_output_and_packed_bits(name, dtype):
    ours, _ = FUNCS[name]
    x = torch.randn(3, 37, dtype=dtype, requires_grad=True)  # 111 elements: not a multiple of 8
    y, saved = saved_tensors(ours, x)
    assert len(saved) == 2
    assert saved[0] is y or saved[0].data_ptr() == y.data_ptr()
    assert saved[1].dtype == torch.uint8 and saved[1].numel() == packed_size(111) == 14


def test_linear_act_linear_keeps_input_output_and_bits():
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
    x = torch.randn(4, 16, requires_grad=False)

    def storages(act):
        _, saved = saved_tensors(lambda t: lin2(act(lin1(t))), x)
        params = {p.untyped_storage().data_ptr() for p in (*lin1.parameters(), *lin2.parameters())}
        seen = {}
        for t in saved:
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                seen[s.data_ptr()] = s.nbytes()
        return sorted(seen.values())

    assert storages(F.gelu) == [4 * 16 * 4, 4 * 64 * 4, 4 * 64 * 4]  # x, h, gelu(h)
    assert storages(AF.gelu) == [4 * 64 // 8, 4 * 16 * 4, 4 * 64 * 4]  # bits, x, gelu(h)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(FUNCS))
def test_edge_values_give_finite_gradients(name, dtype):
    ours, theirs = FUNCS[name]
    info = torch.finfo(dtype)
    x_star = ACTIVATIONS[name].x_star
    vals = [0.0, -0.0, info.tiny, -info.tiny, info.tiny / 4, -info.tiny / 4, info.max, -info.max, 1e4, -1e4]
    vals += [x_star + k * 1e-3 for k in range(-20, 21)]
    x = torch.tensor(vals, dtype=dtype)
    xa = x.clone().requires_grad_(True)
    ours(xa).sum().backward()
    xt = x.clone().requires_grad_(True)
    theirs(xt).sum().backward()
    finite = torch.isfinite(xt.grad)
    assert torch.isfinite(xa.grad[finite]).all(), x[finite][~torch.isfinite(xa.grad[finite])]
    assert xa.grad[0].item() == pytest.approx(xt.grad[0].item(), abs=1e-6)  # f'(0) = 0.5


@pytest.mark.parametrize("name", list(FUNCS))
def test_infinite_output_has_slope_one(name):
    """Where the forward gives +inf the slope is 1 (torch itself returns NaN there); NaN stays NaN."""
    ours, theirs = FUNCS[name]
    x = torch.tensor([math.inf, 70000.0], dtype=torch.float32, requires_grad=True)
    ours(x).sum().backward()
    assert x.grad[1].item() == 1.0
    if math.isinf(theirs(x.detach())[0]):
        assert x.grad[0].item() == 1.0
    else:  # F.gelu(inf) is NaN in torch: the NaN propagates instead of being hidden
        assert math.isnan(x.grad[0].item())


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (9,), (5, 0, 3)])
def test_empty_and_odd_sizes(shape):
    x = torch.randn(shape, requires_grad=True)
    y = AF.silu(x)
    y.sum().backward()
    expected = torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x)))
    torch.testing.assert_close(x.grad, expected.detach(), atol=2e-6, rtol=0)


def test_non_contiguous_input_and_gradient():
    base = torch.randn(40, 30, dtype=torch.float32)
    x = base.t().requires_grad_(True)  # a transposed leaf view
    y = AF.gelu(x)
    torch.testing.assert_close(y, F.gelu(x.detach()), rtol=0, atol=0)
    dy = torch.randn(60, 40)[::2]  # strided upstream gradient
    y.backward(dy)
    xr = x.detach().clone().requires_grad_(True)
    F.gelu(xr).backward(dy)
    torch.testing.assert_close(x.grad, xr.grad, atol=2e-4, rtol=0)  # the float32 limit is 1.4e-4


def test_autocast_bf16_linear_stack():
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)
    x = torch.randn(8, 16)

    def grads(act):
        for p in (*lin1.parameters(), *lin2.parameters()):
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = lin2(act(lin1(x)))
        out.float().square().sum().backward()
        return out.detach(), lin1.weight.grad.clone()

    out_ref, g_ref = grads(F.silu)
    out, g = grads(AF.silu)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    torch.testing.assert_close(g, g_ref, rtol=0.05, atol=0.05)


def test_no_grad_paths_compute_and_keep_nothing_extra():
    x = torch.randn(10, requires_grad=True)
    with torch.no_grad():
        assert AF.gelu(x).grad_fn is None
    with torch.inference_mode():
        assert AF.silu(torch.randn(10)).grad_fn is None
    y, saved = saved_tensors(AF.quick_gelu, torch.randn(10))
    assert y.grad_fn is None and saved == []


def test_float64_keeps_torch_autograd():
    x = torch.randn(10, dtype=torch.float64, requires_grad=True)
    y = AF.gelu(x)
    assert "Gelu" in type(y.grad_fn).__name__
    assert torch.autograd.gradcheck(AF.gelu, (x[:4].detach().requires_grad_(True),))


def test_double_backward_raises_a_clear_error():
    x = torch.randn(10, requires_grad=True)
    (g,) = torch.autograd.grad(AF.gelu(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="actpatch"):
        g.sum().backward()
    assert "create_graph" in DOUBLE_BACKWARD_ERROR


def test_bad_approximate_is_rejected():
    with pytest.raises(ValueError, match="approximate"):
        AF.gelu(torch.randn(3), approximate="fast")
    with pytest.raises(ValueError, match="approximate"):
        ann.InvertedGELU("erf")


def test_meta_tensors():
    x = torch.empty(4, 9, device="meta", requires_grad=True)
    for name, (ours, _) in FUNCS.items():
        y = ours(x)
        assert y.device.type == "meta" and y.shape == x.shape, name


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32),
        ann.InvertedGELU("tanh"),
        torch.nn.Linear(32, 32),
        ann.InvertedSiLU(),
        torch.nn.Linear(32, 32),
        ann.InvertedQuickGELU(),
        torch.nn.Linear(32, 4),
    )
    x = torch.randn(5, 8)
    out = model(x)
    out.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out_c = compiled(x)
    out_c.square().sum().backward()
    torch.testing.assert_close(out_c, out)
    for a, b in zip(grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(a, b)


def test_modules_match_torch_modules():
    x = torch.randn(6, 10)
    torch.testing.assert_close(ann.InvertedGELU()(x), torch.nn.GELU()(x), rtol=0, atol=0)
    torch.testing.assert_close(ann.InvertedGELU("tanh")(x), torch.nn.GELU("tanh")(x), rtol=0, atol=0)
    torch.testing.assert_close(ann.InvertedSiLU()(x), torch.nn.SiLU()(x), rtol=0, atol=0)
    assert "tanh" in repr(ann.InvertedGELU("tanh"))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), max_size=300))
def test_bit_packing_round_trips(bools):
    mask = torch.tensor(bools, dtype=torch.bool)
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(len(bools))
    assert torch.equal(unpack_bits(packed, len(bools)), mask)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 6), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_bit_packing_layout(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) > 0.5
    packed = pack_bits(mask.t())  # logical row-major order of the (non-contiguous) view
    flat = mask.t().reshape(-1)
    for i in range(flat.numel()):
        assert bool((packed[i // 8] >> (i % 8)) & 1) == bool(flat[i])
