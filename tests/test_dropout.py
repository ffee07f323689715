"""Dropout keeping its mask as bits: torch's outputs and gradients bitwise, the bits kept, the sites found.

Every comparison is exact (``torch.equal``): the replacement draws the same random numbers as torch's
dropout and differentiates as torch does, so nothing may move by even an ulp.  Tests marked ``gpu`` run the
CUDA path (``native_dropout``, the Triton pack and backward) through the device tool.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from test_patching import _step
from tiny_models import FAMILIES, tiny_model
from torch import nn

import actpatch
import actpatch.functional as AF
from actpatch.analysis import dropouts
from actpatch.analysis.inputs import input_spec
from actpatch.kernels.bits import pack_bits, packed_size
from actpatch.nn import PackedDropout

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
PS = [0.1, 0.3, 0.5, 0.77]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def both(x: torch.Tensor, p: float, seed: int = 1):
    """(y, dx) of F.dropout and of actpatch's dropout, each from the same seed and the same dy."""
    out = []
    for f in (F.dropout, AF.dropout):
        leaf = x.detach().requires_grad_()
        torch.manual_seed(seed)
        y = f(leaf, p, True)
        y.backward(torch.linspace(-3, 3, y.numel(), device=y.device).to(y.dtype).view(y.shape))
        out.append((y.detach(), leaf.grad))
    return out


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (7,), (37, 19), (2, 3, 64)], ids=str)
def test_outputs_and_gradients_are_torchs_bitwise(shape, dtype, p):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    (y, dx), (y2, dx2) = both(x, p)
    assert torch.equal(y2, y) and torch.equal(dx2, dx)


def test_non_contiguous_input_and_what_autograd_keeps():
    x = torch.randn(40, 30, dtype=torch.bfloat16).t()  # non-contiguous
    (y, dx), (y2, dx2) = both(x, 0.2)
    assert torch.equal(y2, y) and torch.equal(dx2, dx) and dx2.stride() == dx.stride()
    kept = []
    leaf = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        AF.dropout(leaf, 0.2)
    assert [(t.dtype, t.numel()) for t in kept] == [(torch.uint8, packed_size(x.numel()))]


def test_plain_paths_and_bad_probabilities():
    x = torch.randn(50, requires_grad=True)
    for p, training in ((0.0, True), (1.0, True), (0.3, False)):
        torch.manual_seed(0)
        assert torch.equal(AF.dropout(x, p, training), F.dropout(x, p, training))
    with torch.no_grad():
        torch.manual_seed(0)
        a = AF.dropout(x, 0.3)
        torch.manual_seed(0)
        assert torch.equal(a, F.dropout(x, 0.3)) and a.grad_fn is None
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            AF.dropout(x, p)


def test_double_backward_is_torchs():
    """dx is linear in dy: differentiating it again (create_graph) works, as torch's dropout does."""
    x = torch.randn(20, requires_grad=True)
    results = []
    for f in (F.dropout, AF.dropout):
        torch.manual_seed(2)
        dy = torch.linspace(-1, 1, 20, requires_grad=True)
        (g,) = torch.autograd.grad(f(x, 0.5, True), x, dy, create_graph=True)
        (gg,) = torch.autograd.grad((g * g).sum(), dy)
        results.append((g.detach(), gg))
    assert torch.equal(results[1][0], results[0][0]) and torch.equal(results[1][1], results[0][1])


def test_module_is_a_dropout_and_follows_its_p_and_mode():
    m = PackedDropout(0.25)
    assert isinstance(m, nn.Dropout) and "p=0.25" in repr(m)
    x = torch.randn(64, requires_grad=True)
    m.p = 0.5
    torch.manual_seed(3)
    y = m(x)
    torch.manual_seed(3)
    assert torch.equal(y, F.dropout(x, 0.5, True))
    assert torch.equal(m.eval()(x), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1001, 128 * 8 * 3 + 5])
def test_triton_pack_and_backward_under_the_interpreter(n, dtype):
    """The Triton kernels on CPU tensors (Triton's interpreter): the bits are pack_bits', dx is
    (m · dy) · s in float32 rounded once, as native_dropout_backward's CUDA kernel computes it."""
    td = pytest.importorskip("actpatch.kernels.triton_dropout")
    gen = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=gen) > 0.3
    bits = td.pack(mask)
    assert torch.equal(bits, pack_bits(mask))
    dy = (torch.randn(n, generator=gen) * 300).to(dtype)
    dy[0] = float("inf")
    for p in (0.1, 0.3, 0.7):
        s = torch.tensor(1 / (1 - p), dtype=torch.float32)
        expected = ((mask.float() * dy.float()) * s).to(dtype)
        dx = td.backward(dy, bits, p)
        assert torch.equal(dx.isnan(), expected.isnan())
        assert torch.equal(dx.nan_to_num(), expected.nan_to_num())
    strided = torch.randn(2 * n, generator=gen).to(dtype)[::2]
    assert torch.equal(td.backward(strided, bits, 0.5), ((mask.float() * strided.float()) * 2.0).to(dtype))


def test_candidates_are_dropouts_that_drop():
    model = nn.Sequential(
        nn.Dropout(0.1), nn.Dropout(0.0), nn.Dropout1d(0.1), nn.Dropout(1.0), nn.Linear(2, 2)
    )
    assert dropouts.candidates(model) == {id(model[0]): "0"}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_dropouts_alone_bitwise_and_save_what_they_project(family):
    """Only the dropouts patched: loss and every gradient bitwise eager's (the same draws, the same
    gradient); the bytes freed are the projection's; unpatching puts the very same modules back."""
    model = tiny_model(family)
    _, kwargs = input_spec(model).make(2, 12)
    report = actpatch.analyze(model, batch_size=2, seq_len=12, dropouts=True)
    found = [s.path for s in report.sites if s.kind == "dropout" and s.patched]
    if not found:
        assert not dropouts.candidates(model) or all(s.reason for s in report.sites if s.kind == "dropout")
        return
    originals = {p: model.get_submodule(p) for p in found}
    before, loss, grads = _step(model, kwargs)
    report = actpatch.patch_model(
        model, batch_size=2, seq_len=12, include=found, gated=False, norms=False, dropouts=True
    )
    assert [s.path for s in report.patched_sites] == found
    assert all(type(model.get_submodule(p)) is PackedDropout for p in found)
    after, loss2, grads2 = _step(model, kwargs)
    assert torch.equal(loss2, loss)
    assert grads2.keys() == grads.keys() and all(torch.equal(grads2[k], g) for k, g in grads.items())
    assert report.projection.saved_bytes == pytest.approx(before - after, rel=0.02)
    assert sorted(actpatch.unpatch_model(model)) == sorted(found)
    assert all(model.get_submodule(p) is m for p, m in originals.items())


class _Dropouts(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.first, self.lin, self.proj = nn.Dropout(0.2), nn.Linear(8, 8), nn.Linear(8, 8)
        self.drop = nn.Dropout(0.2, inplace=inplace)

    def forward(self, x):  # x needs no gradient: neither does first's output
        return self.proj(self.drop(self.lin(self.first(x))))


def test_inplace_and_gradient_free_dropouts_are_not_patched():
    report = actpatch.patch_model(_Dropouts(inplace=True), example_inputs=torch.randn(4, 8), dropouts=True)
    reasons = {s.path: s.reason for s in report.sites if s.kind == "dropout"}
    assert reasons["drop"].startswith("in-place dropout")
    assert reasons["first"].startswith("no gradient flows")
    report = actpatch.analyze(_Dropouts(inplace=False), example_inputs=torch.randn(4, 8), dropouts=True)
    assert {s.path for s in report.patched_sites} == {"drop"}
    assert actpatch.analyze(_Dropouts(inplace=False), example_inputs=torch.randn(4, 8)).patched_sites == []


def test_gpt2_dry_run_counts_one_byte_masks_as_a_gpu_keeps_them():
    """On meta the probe takes dropout through native_dropout, as a GPU run does: each dropout keeps a
    1-byte mask per element, of which the bits keep an eighth."""
    config = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100)
    with torch.device("meta"):
        model = tf.GPT2LMHeadModel(config)
    report = actpatch.analyze(model, batch_size=2, seq_len=64, dtype=torch.bfloat16, dropouts=True)
    found = [s for s in report.sites if s.kind == "dropout"]
    assert len(found) == 5 and all(s.patched for s in found)  # embeddings + 2 per block
    assert {s.saved_bytes_per_token for s in found} == {64 - 64 // 8}


def test_manifest_records_and_reapplies_dropouts(tmp_path):
    model = tiny_model("gpt2")
    report = actpatch.patch_model(model, seq_len=12, dropouts=True)
    actpatch.save_patched(model, tmp_path / "out", report)
    loaded = actpatch.load_patched(tmp_path / "out")
    kinds = {p: type(m) for p, m in actpatch.patching.patched_modules(loaded).items()}
    assert {p for p, k in kinds.items() if k is PackedDropout} == {
        s.path for s in report.patched_sites if s.kind == "dropout"
    }


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1,), (1001,), (3, 4096, 1024 + 3)], ids=str)
def test_gpu_outputs_and_gradients_are_torchs_bitwise(shape, dtype):
    """CUDA: native_dropout's draws, the Triton pack, and the Triton backward equal to
    native_dropout_backward's, for every p tried; non-contiguous too."""
    x = torch.randn(shape, device="cuda").to(dtype)
    for p in PS:
        (y, dx), (y2, dx2) = both(x, p, seed=7)
        assert torch.equal(y2, y) and torch.equal(dx2, dx)
    (y, dx), (y2, dx2) = both(x.transpose(0, -1), 0.1)
    assert torch.equal(y2, y) and torch.equal(dx2, dx)


def eager_and_compiled(model: nn.Module, x: torch.Tensor, **compile_kwargs) -> list:
    """[(output, parameter gradients)] of ``model`` and of ``torch.compile(model, fullgraph=True)``, each
    from the same seed."""
    runs = []
    for m in (model, torch.compile(model, fullgraph=True, **compile_kwargs)):
        torch.manual_seed(11)
        out = m(x)
        out.square().sum().backward()
        runs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    return runs


def test_compile_fullgraph_keeps_the_eager_draws_and_gradients():
    """torch.compile(fullgraph=True, backend="aot_eager"): one opaque op, no graph break, the same draws."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), PackedDropout(0.3), nn.Linear(32, 4))
    (o1, g1), (o2, g2) = eager_and_compiled(model, torch.randn(5, 8), backend="aot_eager")
    assert torch.equal(o2, o1) and all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))


@pytest.mark.gpu
@needs_cuda
def test_gpu_compiled_fullgraph_keeps_the_eager_draws():
    """torch.compile(fullgraph=True) of a block with a PackedDropout: no graph break, and the opaque op
    draws what eager draws (the compiler may not recompute or reorder it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), PackedDropout(0.1), nn.GELU(), nn.Linear(256, 64)).cuda()
    (o1, g1), (o2, g2) = eager_and_compiled(model, torch.randn(32, 64, device="cuda"))
    torch.testing.assert_close(o2, o1)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(b, a)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_gpu_patched_dropouts_train_bitwise_in_bf16(family):
    """A tiny model in bf16 on CUDA with only its dropouts patched: loss and gradients bitwise eager's,
    and the measured bytes freed are the projection's."""
    model = tiny_model(family).to("cuda", torch.bfloat16)
    _, kwargs = input_spec(model).make(2, 12)
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    before, loss, grads = _step(model, kwargs)
    report = actpatch.patch_model(model, batch_size=2, seq_len=12, include=["*drop*"], dropouts=True)
    assert len(report.patched_sites) == 5  # embeddings, two per block (attention: a functional dropout)
    assert all(s.kind == "dropout" for s in report.patched_sites)
    after, loss2, grads2 = _step(model, kwargs)
    assert torch.equal(loss2, loss) and all(torch.equal(grads2[k], g) for k, g in grads.items())
    assert report.projection.saved_bytes == pytest.approx(before - after, rel=0.02)
