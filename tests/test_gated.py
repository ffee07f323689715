"""Gated products silu_mul / gelu_mul: torch's forward bitwise, two saved tensors, eager's gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import actpatch.functional as AF
from actpatch.kernels import gated
from actpatch.kernels.bits import packed_size

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PRODUCTS = {
    "silu": (AF.silu_mul, lambda a, b: F.silu(a) * b),
    "gelu": (AF.gelu_mul, lambda a, b: F.gelu(a) * b),
    "gelu_tanh": (
        lambda a, b: AF.gelu_mul(a, b, approximate="tanh"),
        lambda a, b: F.gelu(a, approximate="tanh") * b,
    ),
}


def edge_gates(dtype: torch.dtype) -> list[float]:
    info = torch.finfo(dtype)
    tiny = float(info.smallest_normal) * (2.0**-3 if dtype != torch.float32 else 2.0**-20)
    return [0.0, -0.0, tiny, -tiny, -1.0, -1.2784645, 1.0, 30.0, -30.0, -1e4, -float(info.max), 1e-3]


def grads(fn, a: torch.Tensor, b: torch.Tensor, dm: torch.Tensor):
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    m = fn(a, b)
    da, db = torch.autograd.grad(m, (a, b), dm)
    return m, da, db


def assert_close_at_scale(got: torch.Tensor, ref: torch.Tensor) -> None:
    """fp32: within 1e-5 of the gradient's scale (its largest magnitude); bf16/fp16: within one unit in the
    last place at that scale (what rounding the gradient to the dtype allows)."""
    assert torch.isfinite(got[torch.isfinite(ref)]).all()
    finite = torch.isfinite(ref)
    scale = ref[finite].float().abs().max()
    if ref.dtype == torch.float32:
        tol = 1e-5 * scale
    else:
        top = scale.to(ref.dtype)
        tol = (torch.nextafter(top, torch.tensor(math.inf, dtype=ref.dtype, device=ref.device)) - top).float()
    err = (got[finite].float() - ref[finite].float()).abs().max()
    assert err <= tol, f"max error {err.item():.3e} > {tol.item():.3e} (scale {scale.item():.3e})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(PRODUCTS))
def test_forward_bitwise_and_gradients_of_eager(name, dtype):
    ours, eager = PRODUCTS[name]
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(300, 257, generator=g) * 3).to(dtype)
    b = torch.randn(300, 257, generator=g).to(dtype)
    a.view(-1)[: len(edge_gates(dtype))] = torch.tensor(edge_gates(dtype)).to(dtype)
    b.view(-1)[-3:] = 0.0  # up = 0
    dm = torch.randn(a.shape, generator=g).to(dtype)
    m, da, db = grads(ours, a, b, dm)
    mr, dar, dbr = grads(eager, a, b, dm)
    assert torch.equal(m, mr)
    # db = dm · act(a), act(a) recomputed bitwise from the kept gate, wherever |act(a)| >= 2^-13
    kept_gate = gated.act_forward(name, a).abs() >= 2**-13
    assert torch.equal(db[kept_gate], dbr[kept_gate])
    assert_close_at_scale(db, dbr)
    assert_close_at_scale(da, dar)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(PRODUCTS))
def test_edge_gates_elementwise(name, dtype):
    """gate = ±0 and tiny (act(gate) nearly 0: up is kept, slope 1/2), very negative (act(gate) and its
    slope nearly 0), up = 0: each gradient element against eager's, to the dtype's rounding (at least
    at magnitude 1)."""
    ours, eager = PRODUCTS[name]
    gates = torch.tensor(edge_gates(dtype)).to(dtype)
    a = gates.repeat_interleave(3)
    b = torch.tensor([1.5, -2.0, 0.0]).repeat(len(gates)).to(dtype)
    dm = torch.ones_like(a)
    m, da, db = grads(ours, a, b, dm)
    mr, dar, dbr = grads(eager, a, b, dm)
    assert torch.equal(m, mr)
    tol = 1e-5 if dtype == torch.float32 else 2.0 ** -(7 if dtype == torch.bfloat16 else 10)
    for got, ref in ((da, dar), (db, dbr)):
        bad = (got.float() - ref.float()).abs() > tol * ref.float().abs().clamp_min(1.0)
        assert not bad.any(), (a[bad].tolist(), b[bad].tolist(), got[bad].tolist(), ref[bad].tolist())


def overflow_case(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(a, b, dm) whose first two products overflow the dtype (|act(a) · b| > max), as in fp16's
    gate = up = 300 (silu(300) · 300 = 90000 > 65504); then a finite product, and one with up = max / 8."""
    gate, up = (300.0, 300.0) if dtype == torch.float16 else (2.0**40, 2.0**100)  # gelu_tanh': gate³ finite
    top = float(torch.finfo(dtype).max)
    a = torch.tensor([gate, gate, -gate, 2.0], dtype=dtype)
    b = torch.tensor([up, -up, 1.0, top / 8], dtype=dtype)
    dm = torch.tensor([1.0, 0.5, 1.0, 1.0], dtype=dtype)
    return a, b, dm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(PRODUCTS))
def test_overflowed_product_keeps_eager_db_and_a_finite_da(name, dtype):
    """|act(gate) · up| > the dtype's max: the product is ±inf, as eager's; up cannot be recovered from it,
    so d_up = dm · act(gate) stays eager's, bitwise, while d_gate takes |up| as the dtype's max (finite,
    eager's sign; eager's own value needs the lost up, docs/accuracy.md).  Elsewhere both are eager's."""
    ours, eager = PRODUCTS[name]
    a, b, dm = overflow_case(dtype)
    m, da, db = grads(ours, a, b, dm)
    mr, dar, dbr = grads(eager, a, b, dm)
    assert torch.equal(m, mr) and torch.isinf(m[:2]).all()
    assert torch.equal(db, dbr)
    top = float(torch.finfo(dtype).max)
    assert torch.equal(da[:2], (dm[:2].float() * b[:2].sign().float() * top).to(dtype))
    assert torch.isfinite(dar[:2]).all() and torch.equal(da[:2].sign(), dar[:2].sign())
    assert torch.equal(da[2:], dar[2:])


@pytest.mark.parametrize("name", sorted(PRODUCTS))
def test_saves_the_product_the_gate_and_two_bit_masks(name):
    ours, _ = PRODUCTS[name]
    n = 1000 * 37 + 5
    a = torch.randn(n, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(n, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        m = ours(a * 1, b * 1)  # non-leaf inputs, as in a model
    ptrs = {t.untyped_storage().data_ptr(): t for t in saved}
    assert m.untyped_storage().data_ptr() in ptrs  # the product itself: down_proj shares it
    others = [t for p, t in ptrs.items() if p != m.untyped_storage().data_ptr()]
    assert sorted(t.untyped_storage().nbytes() for t in others) == sorted([2 * packed_size(n), n * 2])


def test_falls_back_to_the_plain_product():
    a, b = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    with torch.no_grad():
        assert torch.equal(AF.silu_mul(a, b), F.silu(a) * b)
    wide = torch.randn(1, 6, requires_grad=True)  # broadcasting: not one shape
    assert "actpatch" not in str(AF.silu_mul(a, wide).grad_fn).lower()
    assert "actpatch" not in str(AF.silu_mul(a.double(), b.double()).grad_fn).lower()
    with pytest.raises(ValueError, match="approximate"):
        AF.gelu_mul(a, b, approximate="erf")


def test_double_backward_is_a_clear_error():
    a, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    (da,) = torch.autograd.grad(AF.silu_mul(a, b).sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        da.sum().backward()


def test_compiles_without_graph_breaks():
    class GatedMLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate, self.up = torch.nn.Linear(16, 48), torch.nn.Linear(16, 48)
            self.down = torch.nn.Linear(48, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(AF.silu_mul(self.gate(x), self.up(x)))

    torch.manual_seed(0)
    assert_compiles_with_eager_gradients(GatedMLP())


def assert_compiles_with_eager_gradients(model: torch.nn.Module) -> None:
    """``torch.compile(model, fullgraph=True)`` (aot_eager; no graph break) gives the eager gradients of
    model(x)² summed, x of shape [4, 16]."""
    x = torch.randn(4, 16)
    model(x).square().sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend="aot_eager")(x).square().sum().backward()
    for r, p in zip(ref, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-6)


def test_fused_llama_compiles_without_graph_breaks_and_keeps_its_gradients():
    import transformers as tf
    from tiny_models import TINY_LLAMA

    import actpatch

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**TINY_LLAMA)).train()
    x = torch.randint(0, 100, (2, 16))
    model(input_ids=x, labels=x).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    report = actpatch.patch_model(model, batch_size=2, seq_len=16)  # gated MLPs and RMSNorms
    assert {s.kind for s in report.patched_sites} == {"gated", "norm"}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.compile(model, backend="aot_eager")(input_ids=x, labels=x).loss.backward()
    assert not torch._dynamo.utils.counters["graph_break"]
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6)
