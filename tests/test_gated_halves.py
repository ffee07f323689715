"""Gated products of the two halves of one gate_up tensor (silu_mul_halves, gelu_mul_halves): the two-tensor
products' results bitwise, without contiguous copies of the halves or a concatenation of their gradients."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from test_gated import assert_compiles_with_eager_gradients, edge_gates
from test_patching import _step
from test_triton_gated import run_interpreted
from tiny_models import tiny_model

import actpatch
import actpatch.functional as AF
from actpatch import in_place
from actpatch.analysis.inputs import input_spec
from actpatch.kernels import gated, ops
from actpatch.kernels.bits import packed_size
from actpatch.kinds.gated import _PRODUCTS, FusedGated

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PRODUCTS = {  # name: (the halves product, the two-tensor product)
    "silu": (AF.silu_mul_halves, AF.silu_mul),
    "gelu": (AF.gelu_mul_halves, AF.gelu_mul),
    "gelu_tanh": (
        lambda gu, gate_first: AF.gelu_mul_halves(gu, "tanh", gate_first),
        lambda a, b: AF.gelu_mul(a, b, "tanh"),
    ),
}


def gate_up_inputs(shape: tuple[int, ...], dtype: torch.dtype, gate_first: bool, seed: int = 0):
    """(gate_up [.., 2I], dm [.., I]): random, the gate half starting with ``edge_gates`` and the up half
    ending with zeros."""
    g = torch.Generator().manual_seed(seed)
    half = (*shape[:-1], shape[-1] // 2)
    gate, up, dm = (
        torch.randn(half, generator=g) * 3,
        torch.randn(half, generator=g),
        torch.randn(half, generator=g),
    )
    edges = torch.tensor(edge_gates(dtype))[: gate.numel()]
    gate.view(-1)[: len(edges)] = edges
    up[..., -1:] = 0.0
    gu = torch.cat((gate, up) if gate_first else (up, gate), dim=-1)
    return gu.to(dtype), dm.to(dtype)


def halves_grads(name: str, gu: torch.Tensor, dm: torch.Tensor, gate_first: bool):
    gu = gu.detach().requires_grad_()
    m = PRODUCTS[name][0](gu, gate_first=gate_first)
    (d,) = torch.autograd.grad(m, gu, dm)
    return m, d


def chunk_grads(name: str, gu: torch.Tensor, dm: torch.Tensor, gate_first: bool):
    """Today's path: chunk, then the two-tensor product on the views; chunk's backward joins (da, db)."""
    gu = gu.detach().requires_grad_()
    m = PRODUCTS[name][1](*gated.halves(gu, gate_first))
    (d,) = torch.autograd.grad(m, gu, dm)
    return m, d


SHAPES = [(3, 5, 2 * 13), (4, 2 * 16), (2 * 24,), (2, 0, 2 * 8)]


@pytest.mark.parametrize("gate_first", [True, False], ids=["gate_first", "up_first"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(PRODUCTS))
def test_halves_are_the_chunked_products_bitwise(name, dtype, gate_first):
    """m and d(gate_up) equal chunk + silu_mul / gelu_mul's bitwise (the product eager's), at odd and
    multiple-of-8 widths, 1-D to 3-D, empty."""
    for shape in SHAPES:
        gu, dm = gate_up_inputs(shape, dtype, gate_first)
        m, d = halves_grads(name, gu, dm, gate_first)
        mr, dr = chunk_grads(name, gu, dm, gate_first)
        assert m.shape == mr.shape and d.shape == gu.shape
        assert torch.equal(m, mr) and torch.equal(d, dr), (name, dtype, shape)
        a, b = gated.halves(gu, gate_first)
        assert torch.equal(m, gated.act_forward(name, a) * b)


def test_saves_the_product_the_gate_and_two_bit_masks_not_gate_up():
    n, width = 37, 2 * 40
    gu = torch.randn(n, 2 * width, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        m = AF.silu_mul_halves(gu * 1)  # a non-leaf gate_up, as a projection's output
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    assert m.untyped_storage().data_ptr() in storages
    del storages[m.untyped_storage().data_ptr()]
    assert sorted(storages.values()) == sorted([2 * packed_size(n * width), n * width * 2])


def test_falls_back_to_the_plain_ops():
    """No grad, float64, an odd last dimension (chunk's halves of unequal size, broadcast as chunk gives
    them): the plain ops, as eager computes them."""
    odd = torch.randn(4, 3, requires_grad=True)
    a, b = odd.chunk(2, dim=-1)
    out = AF.silu_mul_halves(odd)
    assert "actpatch" not in str(out.grad_fn).lower() and torch.equal(out, F.silu(a) * b)
    assert "actpatch" not in str(AF.silu_mul_halves(torch.randn(4, 6, dtype=torch.float64)).grad_fn).lower()
    gu = torch.randn(4, 6, requires_grad=True)
    with torch.no_grad():
        assert torch.equal(AF.gelu_mul_halves(gu, gate_first=False), F.gelu(gu[:, 3:]) * gu[:, :3])
    with pytest.raises(ValueError, match="approximate"):
        AF.gelu_mul_halves(gu, approximate="erf")


def test_double_backward_is_a_clear_error():
    gu = torch.randn(8, requires_grad=True)
    (d,) = torch.autograd.grad(AF.silu_mul_halves(gu).sum(), gu, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        d.sum().backward()


@pytest.mark.parametrize("gate_first", [True, False], ids=["gate_first", "up_first"])
def test_torch_func_grad_vmap_and_jvp(gate_first):
    """Per-sample gradients (vmap of grad) and forward-mode tangents are torch's of the chunked product."""

    def plain(gu):
        a, b = gated.halves(gu, gate_first)
        return F.silu(a) * b

    def ours(gu):
        return AF.silu_mul_halves(gu, gate_first)

    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 5, 16, generator=g), torch.randn(4, 5, 16, generator=g)
    weights = torch.arange(8.0)
    loss = lambda f: lambda gu: (f(gu) * weights).sum()  # noqa: E731
    got = torch.func.vmap(torch.func.grad(loss(ours)))(x)
    torch.testing.assert_close(got, torch.func.vmap(torch.func.grad(loss(plain)))(x), rtol=1e-5, atol=1e-6)
    want = torch.func.jvp(plain, (x,), (t,))[1]
    torch.testing.assert_close(torch.func.jvp(ours, (x,), (t,))[1], want)
    with fwAD.dual_level():
        out = ours(fwAD.make_dual(x.clone().requires_grad_(), t))
        assert "GatedHalves" in type(out.grad_fn).__name__
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, want)


def test_custom_ops_pass_opcheck():
    """The compile ops' schemas, fake (meta) implementations and autograd registrations, as torch checks
    them."""
    gu = torch.randn(3, 5, 2 * 12, requires_grad=True)
    for gate_first in (True, False):
        torch.library.opcheck(torch.ops.actpatch.silu_mul_halves, (gu, gate_first))
        m, k, bits = torch.ops.actpatch.gelu_tanh_mul_halves(gu.detach(), gate_first)
        args = (torch.randn_like(m), m, k, bits, gate_first)
        torch.library.opcheck(torch.ops.actpatch.gelu_tanh_mul_halves_backward, args)


def test_meta_tensors_give_shapes():
    gu = torch.empty(2, 7, 2 * 10, device="meta", requires_grad=True)
    m = AF.silu_mul_halves(gu, gate_first=False)
    assert m.shape == (2, 7, 10) and m.device.type == "meta"
    (d,) = torch.autograd.grad(m, gu, torch.empty_like(m))
    assert d.shape == gu.shape


def test_compiles_without_graph_breaks():
    class Phi3LikeMLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_up, self.down = torch.nn.Linear(16, 2 * 24), torch.nn.Linear(24, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.down(AF.silu_mul_halves(self.gate_up(x), gate_first=False))

    torch.manual_seed(0)
    assert_compiles_with_eager_gradients(Phi3LikeMLP())


def test_interpreted_kernels_are_the_two_tensor_kernels_bitwise():
    """Under Triton's interpreter: the halves kernels give the two-tensor kernels' m, k, bits on chunk's
    views, and d(gate_up) their (da, db) side by side, bitwise (both orders; widths 8, 24: read in place;
    13 and 1, not multiples of 8: copied, as before; a non-contiguous gate_up, copied first); against the
    reference as ``test_triton_gated.check``."""
    run_interpreted(
        "import test_gated_halves as h\n"
        "from actpatch.kernels import gated\n"
        "for name in t.NAMES:\n"
        "    for dt in (torch.float32, torch.float16, torch.bfloat16):\n"
        "        for shape in ((2, 3, 2 * 8), (3, 2 * 24), (5, 2 * 13), (3, 2 * 1)):\n"
        "            for gf in (True, False):\n"
        "                gu, dm = h.gate_up_inputs(shape, dt, gf)\n"
        "                if shape[-1] == 26:\n"
        "                    gu = gu.mT.contiguous().mT\n"
        "                m, kk, bits = k.halves_forward(gu, name, gf)\n"
        "                m2, k2, bits2 = k.forward(*gated.halves(gu, gf), name)\n"
        "                assert torch.equal(m, m2) and torch.equal(kk, k2) and torch.equal(bits, bits2)\n"
        "                d = k.halves_backward(dm, m, kk, bits, name, gf)\n"
        "                da, db = k.backward(dm, m2, k2, bits2, name)\n"
        "                joined = torch.cat((da, db) if gf else (db, da), -1)\n"
        "                assert torch.equal(d, joined), (name, dt, shape)\n"
        "                if dt == torch.bfloat16:\n"
        "                    continue  # truncated by the interpreter\n"
        "                mr, kr, bitsr = gated.halves_forward(gu, name, gf)\n"
        "                assert torch.equal(kk, kr) and torch.equal(bits, bitsr)\n"
        "                rel = 1e-5 if dt == torch.float32 else float(torch.finfo(dt).eps)\n"
        "                dr = gated.halves_backward(dm, mr, kr, bitsr, name, gf)\n"
        "                assert t.close_at_scale(m, mr, rel) and t.close_at_scale(d, dr, rel)\n"
    )


def test_interpreted_fwd_bwd_allocates_no_copies_of_the_halves():
    """One forward + backward through ``silu_mul_halves`` with the Triton kernels (interpreted, on CPU
    tensors): the only storages created are m, k, the bits and d(gate_up), and the kernels read gate_up's
    halves and write d(gate_up)'s where they lie.  Today's path (chunk, silu_mul on the views) creates two
    contiguous copies of the halves, da and db, and chunk's backward their concatenation: 4 I elements a
    row more.  (The interpreter's own copies, inside each launch, are not counted.)"""
    run_interpreted(
        "import test_gated_halves as h\n"
        "from actpatch.kernels import ops\n"
        "ops._on_gpu = lambda x: not torch._C._functorch.is_functorch_wrapped_tensor(x)\n"
        "rows, width = 6, 40\n"
        "gu = torch.randn(rows, 2 * width, dtype=torch.bfloat16, requires_grad=True)\n"
        "dm = torch.randn(rows, width, dtype=torch.bfloat16)\n"
        "new, pointers = h.created_storages(gu, dm, lambda g: h.AF.silu_mul_halves(g, gate_first=False))\n"
        "elements, bits = rows * width * 2, 2 * h.packed_size(rows * width)\n"
        "assert sorted(new) == sorted([elements, elements, bits, 2 * elements]), new\n"
        "assert pointers[0][:2] == [gu.data_ptr() + width * 2, gu.data_ptr()]  # the gate, up: in place\n"
        "assert pointers[1][5] - pointers[1][6] == width * 2  # d(gate), d(up): halves of one d(gate_up)\n"
        "old, _ = h.created_storages(gu, dm, lambda g: h.AF.silu_mul(*g.chunk(2, dim=-1)[::-1]))\n"
        "assert sum(old) - sum(new) == 4 * elements, (old, new)\n"
    )


def created_storages(gu: torch.Tensor, dm: torch.Tensor, product) -> tuple[list[int], list[list[int]]]:
    """(the byte sizes of the storages the aten ops of ``product(gu)``'s forward and its backward from dm
    create, outside the kernels' launches; the data pointers of each launch's tensor arguments)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from actpatch.kernels.launch import Launcher

    class Storages(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen = {gu.untyped_storage().data_ptr(), dm.untyped_storage().data_ptr()}
            self.created, self.launching = [], False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else [out]:
                if isinstance(t, torch.Tensor) and not self.launching:
                    storage = t.untyped_storage()
                    if storage.nbytes() and storage.data_ptr() not in self.seen:
                        self.seen.add(storage.data_ptr())
                        self.created.append(storage.nbytes())
            return out

    launch, pointers = Launcher.__call__, []

    def launch_unseen(self, programs, args):
        pointers.append([a.data_ptr() for a in args if isinstance(a, torch.Tensor)])
        mode.launching = True
        launch(self, programs, args)
        mode.launching = False

    Launcher.__call__ = launch_unseen
    try:
        with Storages() as mode:
            m = product(gu)
            torch.autograd.grad(m, gu, dm)
    finally:
        Launcher.__call__ = launch
    return mode.created, pointers


def _halves_product_on_chunks(self, gate_up):
    """``FusedGated._halves_product`` as it was: chunk, then the two-tensor product on the views."""
    return _PRODUCTS[self.activation](*gated.halves(gate_up, self.split == "gate_first"))


@pytest.mark.parametrize("family", ["phi3", "qwen3_moe", "mixtral"])
def test_models_with_halves_keep_their_gradients_and_bytes(family, monkeypatch):
    """Phi-3 (``gate_up_proj(x).chunk(2, -1)``) and MoE experts (``_apply_gate``): patched, each fused MLP's
    product runs as the halves op, the gradients are the unpatched model's (float32: within 1e-5) and,
    bitwise, those of the chunked two-tensor product it replaces, which keeps the same bytes."""
    model = tiny_model(family)
    _, kwargs = input_spec(model).make(2, 12)
    _, ref_loss, ref = _step(model, kwargs)
    report = actpatch.patch_model(model, batch_size=2, seq_len=12, norms=False)
    fused = [s for s in report.patched_sites if s.kind == "gated"]
    assert len(fused) == 2 and all(in_place.plan_of(model.get_submodule(s.path)).split for s in fused)
    calls = []
    forward = ops.gated_halves_forward
    monkeypatch.setattr(ops, "gated_halves_forward", lambda *args: calls.append(args[0]) or forward(*args))
    nbytes, loss, grads = _step(model, kwargs)
    assert calls == ["silu", "silu"] and torch.equal(loss, ref_loss)
    for name, g in ref.items():
        assert (grads[name] - g).norm() <= 1e-5 * g.norm() + 1e-7, name
    monkeypatch.setattr(FusedGated, "_halves_product", _halves_product_on_chunks)
    chunked_bytes, _, chunked = _step(model, kwargs)
    assert nbytes == chunked_bytes and len(calls) == 2
    for name, g in chunked.items():
        assert torch.equal(grads[name], g), name
