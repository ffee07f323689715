"""The norms of libraries other than transformers, through the norm kind: torch's own modules, litgpt's
RMSNorm (float32, cast after the weight multiply), torchtitan's ``nn.RMSNorm``, torchtune's RMSNorm (its
weight named ``scale``), in the tiny models of tests/library_models.py, float32 and bfloat16, on the CPU.
Every norm the probe saw is in the report, patched or with its reason; the loss is eager's bitwise, the
gradients within the bars the Hugging Face families meet, the bytes saved the projection's."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from library_models import BATCH, BUILDERS, SEQ, VOCAB, build, step
from test_gated import assert_close_at_scale
from test_norms import DTYPES, rows
from torch import nn

import actpatch
import actpatch.functional as AF
from actpatch import measure
from actpatch.analysis import norms


class _TorchBlock(nn.Module):
    """A pre-norm block of torch's own norms: ``nn.RMSNorm`` with eps None and given, ``nn.LayerNorm``, and
    ``F.layer_norm`` called in the forward (a functional norm, no module)."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.norm_none, self.norm_eps, self.ln = nn.RMSNorm(dim), nn.RMSNorm(dim, eps=1e-6), nn.LayerNorm(dim)
        self.fc1, self.fc2, self.fc3 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim), nn.Linear(dim, dim)
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.fc2(F.gelu(self.fc1(self.norm_none(x))))
        x = x + self.fc3(self.norm_eps(x))
        return F.layer_norm(self.ln(x), x.shape[-1:], self.scale)


class _TorchDecoder(nn.Module):
    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.embed, self.blocks = nn.Embedding(VOCAB, dim), nn.Sequential(_TorchBlock(dim), _TorchBlock(dim))
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(tokens)))


# model -> what the report says of each norm module, by path suffix (the first that matches): "output"
# (patched, keeping it) or the start of its reason
EXPECTED = {
    "litgpt-llama": {"norm_1": "output", "norm_2": "output", "ln_f": "output"},
    "litgpt-pythia": {"norm_1": "output", "norm_2": "output", "ln_f": "output"},  # parallel: x freed together
    "torchtitan-llama3": {"attention_norm": "output", "ffn_norm": "output", "norm": "output"},
    "torchtune-llama3": {"sa_norm": "output", "mlp_norm": "output", "norm": "output"},
    "torch": {"norm_none": "output", "norm_eps": "output", "ln": "output"},
    # batch-first attention projects a transposed copy of its input: the norm before it is saved by nobody;
    # the last post-norm's output leaves the model (what the loss does with it is outside the probed forward)
    "torch-encoder-post-norm": {"norm1": "output", "norm2": "output not saved by a later op"},
    "torch-encoder-pre-norm": {"norm1": "output not saved by a later op", "norm2": "output"},
}
FORMS = {"litgpt-llama": "litgpt", "torchtitan-llama3": "torch", "torchtune-llama3": "tune", "torch": "torch"}


def _build(name: str, dtype: torch.dtype) -> tuple[nn.Module, dict]:
    if name in BUILDERS:
        return build(name, dtype)
    torch.manual_seed(0)
    model = _TorchDecoder().to(dtype).train()
    return model, {
        "tokens": torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    }


def _expected(name: str, path: str) -> str:
    return next(
        what for suffix, what in EXPECTED[name].items() if path.endswith(f".{suffix}") or path == suffix
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_library_norms_are_reported_patched_exact_and_save_what_they_project(name, dtype):
    eager, kwargs = _build(name, dtype)
    model = copy.deepcopy(eager)
    report = actpatch.analyze(model, example_inputs=kwargs)
    sites = {s.path: s for s in report.sites if s.kind == "norm"}
    modules = [p for p, m in model.named_modules() if type(m).__name__ in ("RMSNorm", "LayerNorm")]
    assert modules and set(modules) <= set(sites)  # every norm module is a site, patched or with its reason
    for path in modules:
        site, expected = sites[path], _expected(name, path)
        assert (site.keeps == "output") if expected == "output" else site.reason.startswith(expected), site
        if site.patched and site.activation == "rms_norm":
            assert report.parts[path].form == FORMS[name]

    patched = [p for p in modules if sites[p].patched]
    report = actpatch.patch_model(model, example_inputs=kwargs, include=patched, gated=False)
    assert sorted(s.path for s in report.patched_sites) == sorted(patched)
    before, loss, grads = step(eager, kwargs)
    after, loss2, grads2 = step(model, kwargs)
    assert torch.equal(loss2, loss)
    if dtype == torch.float32:
        for param, g in grads.items():
            assert (grads2[param] - g).abs().max() <= 2e-3 * g.abs().max() + 1e-7, param
    else:  # each gradient no further from the float32 model's than twice eager bfloat16's
        reference, _ = _build(name, torch.float32)
        _, _, exact = step(
            reference, {k: v.float() if v.is_floating_point() else v for k, v in kwargs.items()}
        )
        scale = max(g.abs().max() for g in exact.values())
        for param, g in exact.items():
            ours, theirs = (grads2[param].float() - g).norm(), (grads[param].float() - g).norm()
            assert ours <= 2 * theirs + 1e-6 * scale * g.numel() ** 0.5, param
    assert report.projection.saved_bytes == pytest.approx(before - after, rel=0.02)


def test_a_functional_norm_is_reported_with_its_reason():
    """``F.layer_norm`` called in a block's forward is no module to replace: a site, left alone, named by
    the block and the call."""
    report = actpatch.analyze(_TorchDecoder(), example_inputs=torch.randint(0, VOCAB, (BATCH, SEQ)))
    found = [s for s in report.sites if s.kind == "norm" and ":" in s.path]
    assert [s.path for s in found] == [f"blocks.{i}:layer_norm" for i in range(2)]
    assert all(not s.patched and s.reason.startswith("functional call") for s in found)


@pytest.mark.parametrize("library", ["litgpt", "torchtune"])
def test_library_rms_norms_keep_their_input_where_nothing_saves_their_output(library):
    """Where the op after the norm saves nothing (a dropout before it, here a shift), litgpt's and
    torchtune's RMSNorms keep x and 1/rms instead of their float32 copies (bf16): eager's values and
    gradients, fewer bytes."""
    torch.manual_seed(0)
    norm = _library_norm(library)

    class Shifted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.norm, self.out = nn.Linear(16, 64), copy.deepcopy(norm), nn.Linear(64, 16)

        def forward(self, x):
            return self.out(self.norm(self.inp(x)) + 1.0).square().sum()

    eager = Shifted().to(torch.bfloat16)
    model = copy.deepcopy(eager)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    report = actpatch.patch_model(model, example_inputs=x)
    (site,) = [s for s in report.sites if s.kind == "norm"]
    assert site.patched and site.keeps == "input"
    (before, y), (after, y2) = measure.saved_bytes(eager, {"x": x}), measure.saved_bytes(model, {"x": x})
    assert torch.equal(y2, y) and after < before
    assert report.projection.saved_bytes == pytest.approx(before - after, rel=0.02)
    y.backward()
    y2.backward()
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        assert (p.grad.float() - q.grad.float()).abs().max() <= 2e-2 * q.grad.float().abs().max(), name


def _library_norm(name: str) -> nn.Module:
    if name == "litgpt":
        return pytest.importorskip("litgpt.model").RMSNorm(64)
    if name == "litgpt-unit-offset":  # litgpt's Gemma norm: 1 + w rounded to w's dtype first
        return pytest.importorskip("litgpt.model").RMSNorm(64, add_unit_offset=True)
    return pytest.importorskip("torchtune.modules").RMSNorm(64)


@pytest.mark.parametrize(
    ("name", "form"),
    [("torch-eps-none", "torch"), ("torch-eps", "torch"), ("litgpt", "litgpt"), ("torchtune", "tune"),
     ("litgpt-unit-offset", None)],
)  # fmt: skip
def test_library_norm_modules_are_recognised_by_what_they_compute(name, form):
    """On the CPU torch's op, litgpt's arithmetic and torchtune's upcast round alike; what the forward calls
    tells them apart (on CUDA they differ)."""
    module = {"torch-eps-none": nn.RMSNorm(64), "torch-eps": nn.RMSNorm(64, eps=1e-6)}.get(name)
    module = module if module is not None else _library_norm(name)
    ((_, eps_attr),) = norms.candidates(module).values()
    assert norms.variant_of(module, eps_attr) == form


def test_a_norm_no_form_reproduces_is_reported_with_its_reason():
    model = nn.Sequential(nn.Linear(16, 64), _library_norm("litgpt-unit-offset"), nn.Linear(64, 16))
    report = actpatch.analyze(model, example_inputs=torch.randn(2, 16))
    (site,) = [s for s in report.sites if s.kind == "norm"]
    assert site.path == "1" and not site.patched and site.reason.startswith("computes no norm")


def test_a_lone_parameter_is_a_weight_only_where_normalized_shape_says_its_size():
    """torchtune's ``scale`` (``normalized_shape`` (64,)) is a weight; a module with one vector parameter and
    an eps but no ``normalized_shape`` (a layer scale) is no norm candidate."""
    scaled = nn.Module()
    scaled.gamma, scaled.eps = nn.Parameter(torch.ones(64)), 1e-6
    assert norms.candidates(scaled) == {}
    assert norms.weight_name(_library_norm("torchtune")) == "scale"


@pytest.mark.parametrize(("x_dtype", "w_dtype"), DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(("name", "variant"), [("litgpt", "litgpt"), ("torchtune", "tune")])
def test_library_rms_norms_keeping_their_input_forward_bitwise_and_grads_within_rounding(
    name, variant, x_dtype, w_dtype
):
    """``actpatch.functional.rms_norm`` of litgpt's and torchtune's variants against the modules themselves:
    the output and the weight's gradient bitwise, the input's within rounding (the edge rows too)."""
    module = _library_norm(name)
    weight = next(module.parameters())
    with torch.no_grad():
        weight.normal_(0.5, 0.3, generator=torch.Generator().manual_seed(1))
    module.to(w_dtype)
    x = rows(x_dtype, 64)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(x_dtype)
    out = []
    for fn in (module, lambda t: AF.rms_norm(t, weight, 1e-6, variant)):
        xi = x.detach().clone().requires_grad_()
        weight.grad = None
        y = fn(xi)
        y.backward(dy)
        out.append((y.detach(), xi.grad, weight.grad.clone()))
    (y, dx, dw), (y2, dx2, dw2) = out
    assert y2.dtype == y.dtype and torch.equal(y2, y)
    assert torch.equal(dw2, dw)
    finite = torch.isfinite(dx).all(-1)
    assert finite[3:].all() and torch.isfinite(dx2).all()
    assert_close_at_scale(dx2[finite], dx[finite])
