"""Activations written as Python formulas (GPT-2's ``gelu_new``, ``FastGELU``): the patched forward is the
module's own, bitwise, in every dtype; the 16-bit backward sits at the information limit of the formula's
own rounding (the half-range of f' over the inputs each (branch, y) stands for)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import tiny_model
from transformers.activations import FastGELUActivation, NewGELUActivation

import actpatch
from actpatch import functional
from actpatch.accuracy import all_finite_values
from actpatch.activations import ACTIVATIONS
from actpatch.analysis.inputs import input_spec
from actpatch.analysis.sites import runs_torch_op
from actpatch.kernels import lookup, reference

GELU_TANH = ACTIVATIONS["gelu_tanh"]
FORMULAS = [NewGELUActivation(), FastGELUActivation()]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _inverted(formula, x):
    x = x.clone().requires_grad_(True)
    y = functional.gelu(x, "tanh", formula=formula)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad


@pytest.mark.parametrize("formula", FORMULAS, ids=lambda f: type(f).__name__)
def test_python_formulas_are_told_from_torch_ops(formula):
    assert not runs_torch_op(formula, "gelu_tanh")
    assert runs_torch_op(torch.nn.GELU(approximate="tanh"), "gelu_tanh")
    assert runs_torch_op(torch.nn.SiLU(), "silu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("formula", FORMULAS, ids=lambda f: type(f).__name__)
def test_the_forward_is_the_formulas_own_bitwise(formula, dtype):
    if dtype == torch.float32:
        x = torch.cat([torch.linspace(-30, 30, 200_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e30])])
    else:
        x = lookup.every_value(dtype)
    y, g = _inverted(formula, x)
    with torch.no_grad():
        assert _same(y, formula(x))
    finite = torch.isfinite(x) & torch.isfinite(formula(x).detach())
    assert torch.isfinite(g[finite]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("formula", FORMULAS, ids=lambda f: type(f).__name__)
def test_the_16_bit_backward_is_at_the_formulas_information_limit(formula, dtype):
    """|g - f'(x)| is at most half the spread of f' over the inputs of x's class (plus the rounding of g to
    the dtype), for every finite value; the reference's g from the exact inverse of y misses that bar."""
    x = all_finite_values(dtype)
    x = x[x.abs() < 30]
    y, g = _inverted(formula, x)
    limit = _assert_at_the_formulas_limit(x, y, g)
    right = x.float() >= GELU_TANH.x_star
    from_exact_inverse = reference.inverse_derivative(y, right, GELU_TANH).to(dtype).double()
    exact = GELU_TANH.df_safe(x.double())
    assert (from_exact_inverse - exact).abs().max() > 1.2 * limit


def _assert_at_the_formulas_limit(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> float:
    """|g - f'(x)| <= the formula's limit at x (+ g's rounding) at every x; returns the largest bound."""
    x, y, g = x.cpu(), y.cpu(), g.cpu()
    exact = GELU_TANH.df_safe(x.double())
    slot = ((x.float() >= GELU_TANH.x_star).long() << 16) | (y.view(torch.int16).long() & 0xFFFF)
    lo = torch.full((2**17,), torch.inf, dtype=torch.float64).scatter_reduce(0, slot, exact, "amin")
    hi = torch.full((2**17,), -torch.inf, dtype=torch.float64).scatter_reduce(0, slot, exact, "amax")
    limit = ((hi - lo) / 2)[slot]
    ulp = torch.finfo(x.dtype).eps * (exact.abs() + limit)  # g rounded to the dtype
    error = (g.double() - exact).abs()
    assert (error <= limit + ulp).all()
    return float((limit + ulp).max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_triton_kernels_read_the_formulas_tables(dtype):
    pytest.importorskip("triton")
    from actpatch.kernels import triton as tk

    formula = NewGELUActivation()
    key = functional.formula_key(formula)
    forward = lookup.table_of(formula, key, dtype, torch.device("cpu"))
    backward = lookup.backward_table_of(formula, key, GELU_TANH, dtype, torch.device("cpu"))
    x = (torch.randn(3, 1001) * 4).to(dtype)
    y, bits = tk.forward(x, GELU_TANH, forward)
    yr, bits_r = reference.forward(x, GELU_TANH, forward)
    assert torch.equal(y, yr) and torch.equal(bits, bits_r) and torch.equal(y, formula(x))
    dy = torch.randn_like(x)
    assert torch.equal(
        tk.backward(dy, y, bits, GELU_TANH, g_table=backward),
        reference.backward(dy, y, bits, GELU_TANH, backward),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_patched_gpt2_logits_and_loss_are_bitwise_unpatched(dtype):
    model = tiny_model("gpt2").to(dtype)
    _, kwargs = input_spec(model).make(2, 12)
    reference_model = copy.deepcopy(model)
    actpatch.patch_model(model, batch_size=2, seq_len=12)
    act = model.transformer.h[0].mlp.act
    assert type(act).__name__ == "InvertedGELU" and isinstance(act.formula, NewGELUActivation)
    for mode in (False, True):
        model.train(mode)
        reference_model.train(mode)
        torch.manual_seed(0)
        expected = reference_model(**kwargs)
        torch.manual_seed(0)
        got = model(**kwargs)
        assert torch.equal(got.logits, expected.logits) and torch.equal(got.loss, expected.loss)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gpu_patched_gpt2_is_bitwise_unpatched_and_its_formula_kernels_match_the_reference(dtype):
    model = tiny_model("gpt2").to("cuda", dtype)
    _, kwargs = input_spec(model).make(2, 12)
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    reference_model = copy.deepcopy(model)
    actpatch.patch_model(model, batch_size=2, seq_len=12)
    torch.manual_seed(0)
    expected = reference_model(**kwargs)
    torch.manual_seed(0)
    got = model(**kwargs)
    assert torch.equal(got.logits, expected.logits) and torch.equal(got.loss, expected.loss)
    if dtype == torch.float32:
        return
    x = all_finite_values(dtype).cuda()
    x = x[x.abs() < 30]
    y, g = _inverted(NewGELUActivation(), x)
    with torch.no_grad():
        assert _same(y, NewGELUActivation()(x))
    _assert_at_the_formulas_limit(x, y, g)


def test_compiled_gpt2_keeps_its_graphs_and_loss():
    """Under torch.compile the formula's y and bits are traced (the compiler fuses them): no graph break
    beyond the unpatched model's, the same loss, close gradients."""
    model = tiny_model("gpt2")
    _, kwargs = input_spec(model).make(2, 12)
    reference_model = copy.deepcopy(model)
    actpatch.patch_model(model, batch_size=2, seq_len=12)
    breaks, losses, grads = [], [], []
    for m in (reference_model, model):
        torch._dynamo.reset()
        breaks.append(torch._dynamo.explain(m)(**kwargs).graph_break_count)
        torch._dynamo.reset()
        torch.manual_seed(0)
        loss = torch.compile(m, backend="aot_eager")(**kwargs).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert breaks[1] == breaks[0] and torch.equal(losses[1], losses[0])
    for name, g in grads[0].items():
        assert (grads[1][name] - g).norm() <= 2e-3 * g.norm() + 1e-6, name
