"""Norms that keep their output: forward bitwise the module's, accuracy against eager, what autograd keeps,
weights that cannot be divided by, misuse, the fused Triton backward."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from test_norms import HF_NORMS
from torch import nn

import actpatch.functional as AF
from actpatch.kernels import norm_output as no
from actpatch.kernels import rms_norm

warnings.filterwarnings("ignore", category=RuntimeWarning)  # numpy overflow notes from the interpreter
HALF = [torch.bfloat16, torch.float16]
ALL = [torch.float32, *HALF]
RMS = sorted(no.VARIANTS)
W = 128


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(dtype, rows=512, width=W, seed=0):
    return (torch.randn(rows, width, generator=_gen(seed)) * 3).to(dtype)


def _w(dtype, width=W, seed=1, mean=0.6):
    """Weights ~ N(mean, 0.3): some channels near zero (they divide fine: RMSNorm's error is relative)."""
    return (torch.randn(width, generator=_gen(seed)) * 0.3 + mean).to(dtype)


def _bias(w):
    """A bias ~ N(0, 0.2), clipped to 0.9 |w| (within ``safe_weight``'s half-precision bound)."""
    b = torch.randn(w.shape, generator=_gen(5)).to(w.device) * 0.2
    return (b.sign() * torch.minimum(b.abs(), 0.9 * w.float().abs())).to(w.dtype)


def _rms_module(variant, dtype):
    if variant == "torch":
        return lambda x, w: F.rms_norm(x, x.shape[-1:], w, 1e-6)
    return lambda x, w: no.rms_norm_forward(x, w, 1e-6, variant)[0]


def _grads(fn, *inputs, dy):
    """Gradients of (fn(*inputs) · dy).sum() with respect to every input that is not None."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    fn(*leaves).backward(dy)
    return [t.grad for t in leaves if t is not None]


def _dist(got, ref):
    """Max distance, relative to the reference's largest entry."""
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _ours_rms(variant):
    return lambda x, w: AF.rms_norm_from_output(x, w, 1e-6, variant, keep_output=True)


def _norm_module(variant: str) -> nn.Module:
    """The module computing ``variant``: ``nn.RMSNorm``, Hugging Face's, litgpt's or torchtune's."""
    if variant == "litgpt":
        return pytest.importorskip("litgpt.model").RMSNorm(W, eps=1e-6)
    if variant == "tune":
        return pytest.importorskip("torchtune.modules").RMSNorm(W, eps=1e-6)  # its weight is ``scale``
    return nn.RMSNorm(W, eps=1e-6) if variant == "torch" else HF_NORMS[variant](W, eps=1e-6)


@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("variant", RMS)
def test_rms_forward_bitwise(variant, dtype):
    x, w = _x(dtype).requires_grad_(), _w(dtype).requires_grad_()
    module = _norm_module(variant).to(dtype)
    with torch.no_grad():
        next(module.parameters()).copy_(w)
    assert torch.equal(_ours_rms(variant)(x, w), module(x))


@pytest.mark.parametrize("dtype", ALL, ids=str)
def test_nn_rms_norm_eps_none_bitwise(dtype):
    module = nn.RMSNorm(W, eps=None).to(dtype)
    x = _x(dtype).requires_grad_()
    y = AF.rms_norm_from_output(x, module.weight, None, "torch", keep_output=True)
    assert torch.equal(y, module(x))


@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize(("affine", "bias"), [(True, True), (True, False), (False, False)])
def test_layer_norm_forward_bitwise_native_layer_norm_is_f_layer_norm(dtype, affine, bias):
    module = nn.LayerNorm(W, elementwise_affine=affine, bias=bias).to(dtype)
    if affine:
        with torch.no_grad():
            module.weight.normal_(1.0, 0.2, generator=_gen(4))
    x = _x(dtype).requires_grad_()
    assert torch.equal(no.layer_norm_forward(x, module.weight, module.bias, 1e-5)[0], module(x))
    assert torch.equal(AF.layer_norm(x, (W,), module.weight, module.bias, keep_output=True), module(x))


@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("variant", RMS)
def test_rms_accuracy(variant, dtype):
    """float32: within 2e-3 of eager at each gradient's largest entry; half: each gradient within 2× eager
    half's own distance from a float32 reference."""
    x, w = _x(dtype), _w(dtype)
    dy = torch.randn(x.shape, generator=_gen(2)).to(dtype)
    eager = _grads(_rms_module(variant, dtype), x, w, dy=dy)
    ours = _grads(_ours_rms(variant), x, w, dy=dy)
    if dtype == torch.float32:
        assert all(_dist(o, e) < 2e-3 for o, e in zip(ours, eager, strict=True))
        return
    ref = _grads(_rms_module(variant, torch.float32), x.float(), w.float(), dy=dy.float())
    for o, e, r in zip(ours, eager, ref, strict=True):
        assert _dist(o, r) <= 2 * _dist(e, r)


@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_accuracy(dtype, with_bias):
    x, w = _x(dtype), _w(dtype, mean=1.0)
    b = _bias(w) if with_bias else None
    assert no.keeps_output(w, b, dtype)
    dy = torch.randn(x.shape, generator=_gen(2)).to(dtype)
    eager = _grads(lambda *t: F.layer_norm(t[0], (W,), *t[1:]), x, w, b, dy=dy)
    ours = _grads(lambda *t: AF.layer_norm(t[0], (W,), *t[1:], keep_output=True), x, w, b, dy=dy)
    if dtype == torch.float32:
        assert all(_dist(o, e) < 2e-3 for o, e in zip(ours, eager, strict=True))
        return
    up = [t.float() if t is not None else None for t in (x, w, b)]
    ref = _grads(lambda *t: F.layer_norm(t[0], (W,), *t[1:]), *up, dy=dy.float())
    for o, e, r in zip(ours, eager, ref, strict=True):
        assert _dist(o, r) <= 2 * _dist(e, r)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps while fn runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("kind", ["llama", "torch", "layer"])
def test_norm_and_linear_keep_the_linears_input_plus_4_bytes_a_row(kind):
    x = _x(torch.bfloat16, rows=6 * 7).reshape(6, 7, W).requires_grad_()
    w = _w(torch.bfloat16, mean=1.0).requires_grad_()
    linear = nn.Linear(W, 64, dtype=torch.bfloat16)
    if kind == "layer":
        norm = lambda: AF.layer_norm(x, (W,), w, None, keep_output=True)  # noqa: E731
    else:
        norm = lambda: AF.rms_norm_from_output(x, w, 1e-6, kind, keep_output=True)  # noqa: E731
    y = norm().detach().requires_grad_()
    alone = _saved_bytes(lambda: linear(y))
    both = _saved_bytes(lambda: linear(norm()))
    assert both == alone + w.nbytes + 6 * 7 * 4


def test_zero_weights_mid_training_keep_the_input_and_the_gradient_is_right():
    """A weight that becomes exactly zero after a step: the next forward keeps x (the version changed), its
    gradient is eager's; the check runs once per weight change."""
    w = nn.Parameter(_w(torch.float32, mean=1.0))
    x = _x(torch.float32).requires_grad_()
    assert no.keeps_output(w, None, torch.float32, "llama")
    with torch.no_grad():
        w[3] = 0.0  # an optimizer step (bumps _version)
    assert not no.keeps_output(w, None, torch.float32, "llama")
    y = AF.rms_norm_from_output(x, w, 1e-6, "llama")
    y.backward(torch.ones_like(y))
    dx, dw = _grads(_rms_module("llama", torch.float32), x, w, dy=torch.ones_like(y))
    assert torch.isfinite(w.grad).all() and torch.allclose(w.grad, dw) and torch.allclose(x.grad, dx)
    with torch.no_grad():
        w[3] = 1.0
    assert no.keeps_output(w, None, torch.float32, "llama")


def test_the_decision_for_every_dtype_at_once_is_each_dtypes():
    """``keeps_output_by_dtype`` (made outside a compiled graph) answers as ``keeps_output`` per dtype: 1e-5
    is a normal number's weight in bfloat16 and float32, but gives subnormal y in float16."""
    w = torch.ones(4)
    w[1] = 1e-5
    want = {torch.float32: True, torch.bfloat16: True, torch.float16: False}
    assert no.keeps_output_by_dtype(w, None, "llama") == want
    assert {dt: no.keeps_output(w, None, dt, "llama") for dt in want} == want


def test_the_decision_is_cached_until_the_weight_changes(monkeypatch):
    w, calls = _w(torch.bfloat16, mean=1.0), []
    monkeypatch.setattr(no, "_safe_weight_on_device", lambda *a: calls.append(a) or torch.tensor(True))
    for _ in range(3):
        no.keeps_output(w, None, torch.bfloat16, "torch")
    w.add_(0.0)
    no.keeps_output(w, None, torch.bfloat16, "torch")
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("c", "b", "dtype", "safe"),
    [
        ([1.0, 0.5], None, torch.bfloat16, True),
        ([1.0, 0.0], None, torch.float32, False),  # 0/0
        ([1.0, 1e-5], None, torch.float16, False),  # below fp16's smallest normal: subnormal y
        ([1.0, 1e-3], None, torch.float16, True),
        ([1.0, 0.1], [0.0, 0.5], torch.bfloat16, False),  # the bias dwarfs the weight: y's rounding amplified
        ([1.0, 0.1], [0.0, 0.5], torch.float32, True),  # float32: room for 2^10
    ],
)
def test_safe_weight(c, b, dtype, safe):
    assert no.safe_weight(torch.tensor(c), None if b is None else torch.tensor(b), dtype) == safe


def test_gemma_weight_near_minus_one_and_mixed_dtypes_keep_the_input():
    w = _w(torch.float32)
    w[0] = -1.0
    assert not no.keeps_output(w, None, torch.float32, "gemma") and no.keeps_output(
        w, None, torch.float32, "t5"
    )
    assert not no.keeps_output(_w(torch.float32), None, torch.bfloat16, "gemma")  # y coarser than dw
    assert no.keeps_output(_w(torch.float32), None, torch.bfloat16, "llama")  # s recovered exactly


@pytest.mark.parametrize("kind", ["llama", "layer"])
def test_output_modified_in_place_is_autograd_s_error(kind):
    x, w = _x(torch.float32, rows=4).requires_grad_(), _w(torch.float32, mean=1.0).requires_grad_()
    y = AF.layer_norm(x, (W,), w) if kind == "layer" else AF.rms_norm_from_output(x, w, 1e-6)
    y.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_no_grad_is_the_plain_op_and_double_backward_is_a_clear_error():
    x, w = _x(torch.float32, rows=4).requires_grad_(), _w(torch.float32, mean=1.0).requires_grad_()
    with torch.no_grad():
        y = AF.layer_norm(x, (W,), w)
        assert y.grad_fn is None and torch.equal(y, F.layer_norm(x, (W,), w))
    with torch.inference_mode():
        assert AF.rms_norm_from_output(x, w, 1e-6, "torch").grad_fn is None
    for y in (AF.layer_norm(x, (W,), w), AF.rms_norm_from_output(x, w, 1e-6)):
        assert type(y.grad_fn).__name__.startswith("Actpatch")
        (dx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="actpatch: .*double backward"):
            dx.sum().backward()


@pytest.mark.parametrize("kind", ["llama", "gemma", "torch", "layer"])
def test_torch_func_jvp_and_vmap(kind):
    x, w = _x(torch.float32, rows=6), _w(torch.float32, mean=1.0)
    tx, tw = torch.randn_like(x), torch.randn_like(w)
    if kind == "layer":
        ours = lambda a, b: AF.layer_norm(a, (W,), b, keep_output=True)  # noqa: E731
        plain = lambda a, b: F.layer_norm(a, (W,), b)  # noqa: E731
    else:
        ours = lambda a, b: AF.rms_norm_from_output(a, b, 1e-6, kind, keep_output=True)  # noqa: E731
        plain = _rms_module(kind, torch.float32)
    _, got = torch.func.jvp(ours, (x, w), (tx, tw))
    _, expected = torch.func.jvp(plain, (x, w), (tx, tw))
    torch.testing.assert_close(got, expected)
    grad = torch.func.grad(lambda a: ours(a, w).square().sum())
    torch.testing.assert_close(
        torch.func.vmap(grad)(x[:, None]),
        torch.func.vmap(torch.func.grad(lambda a: plain(a, w).square().sum()))(x[:, None]),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind", [*RMS, "layer", "layer-no-bias", "layer-no-affine"])
@pytest.mark.parametrize("shape", [(37, 100), (3, 5, 64), (1, 6), (0, 32)], ids=str)
def test_triton_backward_matches_the_reference(kind, dtype, shape):
    """Under Triton's interpreter (float32, float16: it rounds bfloat16 by truncation; bf16: the GPU)."""
    from actpatch.kernels import triton_norm_output as tno

    width = shape[-1]
    x = _x(dtype, rows=max(1, torch.Size(shape[:-1]).numel()), width=width)[: torch.Size(shape[:-1]).numel()]
    x = x.reshape(shape)
    w = _w(dtype, width=width)
    dy = torch.randn(shape, generator=_gen(3)).to(dtype)
    if kind in RMS:
        y, r = no.rms_norm_forward(x, w, 1e-6, kind)
        got, ref = tno.rms_backward(dy, y, w, r, kind), no.rms_norm_backward_from_output(dy, y, w, r, kind)
    else:
        wl = None if kind == "layer-no-affine" else w
        b = (torch.randn(width, generator=_gen(6)) * 0.2).to(dtype) if kind == "layer" else None
        y, rstd = no.layer_norm_forward(x, wl, b, 1e-5)
        got = tno.layer_backward(dy, y, wl, b, rstd)
        ref = no.layer_norm_backward_from_output(dy, y, wl, b, rstd)
    for g, r in zip(got, ref, strict=True):
        assert (g is None) == (r is None)
        if r is not None and r.numel() and x.numel():
            assert g.dtype == r.dtype and g.shape == r.shape
            assert _dist(g, r) < (1e-6 if dtype == torch.float32 else 1e-3)


def test_layer_norm_backward_op_outputs_alias_nothing_on_the_fused_kernel_s_path(monkeypatch):
    """The custom op (what a compiled graph's backward calls) through the Triton kernel (interpreted), whose
    dw and db are rows of one buffer: torch refuses a custom op's outputs that alias one another."""
    from actpatch.kernels import ops

    monkeypatch.setattr(ops, "_on_gpu", lambda t: True)
    x, w = _x(torch.float32, rows=8, width=32), _w(torch.float32, width=32)
    b = _bias(w)
    y, rstd = no.layer_norm_forward(x, w, b, 1e-5)
    dy = torch.randn(y.shape, generator=_gen(3))
    dx, dw, db = torch.ops.actpatch.layer_norm_keep_output_backward(dy, y, w, b, rstd)
    ref = no.layer_norm_backward_from_output(dy, y, w, b, rstd)
    assert dw.untyped_storage().data_ptr() != db.untyped_storage().data_ptr()
    assert all(_dist(g, r) < 1e-6 for g, r in zip((dx, dw, db), ref, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ALL, ids=str)
@pytest.mark.parametrize("kind", [*RMS, "layer"])
def test_gpu_fused_backward_accuracy_and_forward_bitwise(kind, dtype):
    """On CUDA: forward bitwise, each gradient within the accuracy bars against eager on the GPU."""
    x, w = _x(dtype, rows=4096, width=4096).cuda(), _w(dtype, width=4096, mean=1.0).cuda()
    b = _bias(w) if kind == "layer" else None
    assert no.keeps_output(w, b, dtype, "layer" if kind == "layer" else kind)  # what a caller would check
    dy = torch.randn(x.shape, generator=_gen(2)).to(dtype).cuda()
    if kind == "layer":
        plain = lambda *t: F.layer_norm(t[0], (4096,), *t[1:])  # noqa: E731
        ours = lambda *t: AF.layer_norm(t[0], (4096,), *t[1:], keep_output=True)  # noqa: E731
        args = (x, w, b)
    else:
        plain, ours, args = _rms_module(kind, dtype), _ours_rms(kind), (x, w)
    assert torch.equal(ours(*args), plain(*args))
    eager, got = _grads(plain, *args, dy=dy), _grads(ours, *args, dy=dy)
    if dtype == torch.float32:
        assert all(_dist(o, e) < 2e-3 for o, e in zip(got, eager, strict=True))
        return
    ref = _grads(plain, *[t.float() if t is not None else None for t in args], dy=dy.float())
    for o, e, r in zip(got, eager, ref, strict=True):
        assert _dist(o, r) <= 2 * _dist(e, r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_gpu_compile_one_op_per_norm_no_graph_breaks(with_bias):
    """Inductor, bf16: with a bias the fused backward's dw and db share one buffer (the op copies db)."""
    x = _x(torch.bfloat16, rows=64, width=256).cuda().requires_grad_()
    w = _w(torch.bfloat16, width=256, mean=1.0).cuda()
    b = _bias(w).requires_grad_() if with_bias else None
    w.requires_grad_()

    def f(x):
        h = AF.layer_norm(x, (256,), w, b, keep_output=True)
        return AF.rms_norm_from_output(h, w, 1e-6, "llama", keep_output=True).float().square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    compiled(x).backward()
    assert all(torch.isfinite(t.grad).all() for t in (x, w, b) if t is not None)


def test_t5_with_a_float32_weight_rebuilds_the_unrounded_normalised_row():
    """T5LayerNorm with a float32 weight and half x does not round x̂ before the weight multiplies it
    (``rms_norm.scaled_dtype``): rebuilt from the float32 output, dw is eager's within float32 rounding."""
    x, w = _x(torch.bfloat16), _w(torch.float32, mean=1.0)
    y, r = no.rms_norm_forward(x, w, 1e-6, "t5")
    dy = torch.randn(y.shape, generator=_gen(2))
    dx_eager, dw_eager = rms_norm.backward(dy, x, w, r, "t5")
    dx, dw = no.rms_norm_backward_from_output(dy, y, w, r, "t5", x_dtype=x.dtype)
    assert y.dtype == torch.float32 and _dist(dw, dw_eager) < 1e-5 and _dist(dx, dx_eager) < 1e-2
