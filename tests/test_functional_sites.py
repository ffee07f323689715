"""Activations called by name in a module's forward (``F.gelu``, ``torch.nn.functional.silu``, a module-level
activation object, an attribute holding the function) are sites of that module: its methods are rebound to
actpatch's op, with the guarantees of a module swap."""

from __future__ import annotations

import copy
import functools
import pickle

import pytest
import torch
import torch.nn.functional as F
from tiny_models import saved_bytes, tiny_model
from torch import nn
from transformers.activations import ACT2FN

import actpatch
from actpatch import in_place, manifest, rebind

D, H = 16, 32
_SINGLETON = nn.GELU(approximate="tanh")  # a module-level activation object, as RoBERTa's head has


def _helper(x):
    return F.gelu(x)


def _decorated(forward):
    @functools.wraps(forward)
    def wrapper(*args, **kwargs):
        return forward(*args, **kwargs)

    return wrapper


class GptMlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.proj = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x):
        return self.proj(torch.nn.functional.gelu(self.fc(x), approximate="tanh"))


class Decorated(GptMlp):
    @_decorated
    def forward(self, x):
        return self.proj(F.silu(self.fc(x)))


class ByHelper(GptMlp):
    def forward(self, x):
        return self.proj(_helper(self.fc(x)))


class NewEachCall(GptMlp):
    def forward(self, x):
        return self.proj(ACT2FN["gelu"](self.fc(x)))


class Singleton(GptMlp):
    def forward(self, x):
        return self.proj(_SINGLETON(self.fc(x)))


class SwiGlu(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(D, H, bias=False), nn.Linear(H, D, bias=False), nn.Linear(D, H)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Net(nn.Module):
    def __init__(self, mlp: type[nn.Module]):
        super().__init__()
        self.mlps = nn.ModuleList([mlp() for _ in range(2)])

    def forward(self, x):
        for mlp in self.mlps:
            x = x + mlp(x)
        return x


def _net(mlp):
    torch.manual_seed(0)
    return Net(mlp).train(), {"x": torch.randn(2, 8, D)}


@pytest.mark.parametrize(
    ("mlp", "kind", "activation"),
    [
        (GptMlp, "activation", "gelu_tanh"),
        (Decorated, "activation", "silu"),
        (Singleton, "activation", "gelu_tanh"),
        (SwiGlu, "gated", "silu"),
    ],
)
def test_calls_by_name_are_patched_and_keep_the_computation(mlp, kind, activation):
    model, kwargs = _net(mlp)
    before, y = saved_bytes(model, kwargs)
    (dx,) = torch.autograd.grad(
        y.square().sum(), model.mlps[0].fc.weight if mlp is not SwiGlu else model.mlps[0].w1.weight
    )
    report = actpatch.patch_model(model, example_inputs=kwargs)
    patched = report.patched_sites
    assert [(s.kind, s.activation) for s in patched] == [(kind, activation)] * 2
    after, y2 = saved_bytes(model, kwargs)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    (dx2,) = torch.autograd.grad(
        y2.square().sum(), model.mlps[0].fc.weight if mlp is not SwiGlu else model.mlps[0].w1.weight
    )
    assert (dx2 - dx).norm() <= 2e-3 * dx.norm()
    assert report.projection.saved_bytes == pytest.approx(before - after, rel=0.02)
    assert after < before
    assert [type(m).__name__ for m in model.mlps] == [mlp.__name__] * 2


@pytest.mark.parametrize(
    ("mlp", "reason"),
    [
        (ByHelper, "called outside the module's own methods"),
        (NewEachCall, "not bound to a global name"),
    ],
)
def test_calls_that_cannot_be_rebound_are_reported(mlp, reason):
    model, kwargs = _net(mlp)
    report = actpatch.patch_model(model, example_inputs=kwargs)
    assert [s.reason[: len(reason)] for s in report.sites if s.kind == "activation"] == [reason] * 2
    assert not report.patched_sites
    assert all(not in_place.is_patched(m) for m in model.modules())


def test_a_name_also_read_as_an_attribute_is_not_renamed():
    class Clash(GptMlp):
        def forward(self, x):
            return self.proj(F.gelu(self.fc(x)) + 0 * getattr(x, "F", 0))

    class AttributeF(GptMlp):
        def forward(self, x):
            self.F = 0  # a STORE_ATTR of the name F: renaming the global F would rename this too
            return self.proj(F.gelu(self.fc(x)))

    assert rebind.reason(Clash(), F.gelu) is None
    assert "cannot be rebound" in rebind.reason(AttributeF(), F.gelu)


def test_patching_twice_changes_nothing_and_unpatching_restores_the_class():
    model, kwargs = _net(GptMlp)
    first = actpatch.patch_model(model, example_inputs=kwargs)
    classes = [type(m) for m in model.modules()]
    second = actpatch.patch_model(model, example_inputs=kwargs)
    assert [type(m) for m in model.modules()] == classes
    assert [(s.path, s.patched) for s in second.sites] == [(s.path, s.patched) for s in first.sites]
    assert sorted(actpatch.unpatch_model(model)) == ["mlps.0", "mlps.1"]
    assert all(type(m) is GptMlp for m in model.mlps)
    assert actpatch.analyze(model, example_inputs=kwargs).sites[0].path == "mlps.0:gelu"


def test_copies_and_pickles_of_a_rebound_module_run_their_own_weights():
    model, kwargs = _net(GptMlp)
    actpatch.patch_model(model, example_inputs=kwargs)
    expected = model(**kwargs)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert isinstance(in_place.plan_of(other.mlps[0]), rebind.Rebinding)
        torch.testing.assert_close(other(**kwargs), expected, rtol=0, atol=0)
        with torch.no_grad():
            other.mlps[0].proj.bias.add_(1.0)
        assert not torch.equal(other(**kwargs), expected)


def test_a_rebound_module_compiles_without_graph_breaks():
    model, kwargs = _net(GptMlp)
    actpatch.patch_model(model, example_inputs=kwargs)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**kwargs)
    assert explained.graph_break_count == 0, explained.break_reasons
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("actpatch" in op for op in ops), ops


def test_hugging_face_singletons_and_decorated_forwards_are_sites():
    roberta = actpatch.analyze(tiny_model("roberta"))
    head = next(s for s in roberta.sites if s.path.startswith("lm_head:"))
    assert (head.path, head.patched) == ("lm_head:GELUActivation", True)
    whisper = actpatch.analyze(tiny_model("whisper"))  # @decorated forward; its second gelu is not saved
    encoder = next(s for s in whisper.sites if s.path == "model.encoder:gelu")
    assert encoder.reason.startswith("output not saved by a later op")


@pytest.mark.parametrize(
    "square", [lambda r: r.square(), lambda r: r**2, lambda r: r.pow(2)], ids=["square", "**", "pow"]
)
def test_squared_relu_written_inline_is_reported(square):
    class Inline(GptMlp):
        def forward(self, x):
            return self.proj(square(F.relu(self.fc(x))))

    report = actpatch.analyze(Inline(), example_inputs=torch.randn(2, D))
    assert [(s.path, s.reason) for s in report.sites] == [
        (":relu", "squared ReLU written inline (relu, then square): only a module computing it is swapped")
    ]


def test_a_rebound_site_is_saved_in_the_manifest_and_reapplied(tmp_path):
    model = tiny_model("roberta")
    report = actpatch.patch_model(model)
    manifest.save_patched(model, tmp_path / "out", report)
    recorded = manifest.read_manifest(tmp_path / "out").paths
    assert "lm_head:GELUActivation" in recorded
    loaded = manifest.load_patched(tmp_path / "out")
    assert isinstance(in_place.plan_of(loaded.lm_head), rebind.Rebinding)


def test_a_relu_gating_a_product_is_not_taken_for_a_square():
    class ReGlu(GptMlp):
        def forward(self, x):
            return self.proj(F.relu(self.fc(x)) * self.fc(x))

    report = actpatch.analyze(ReGlu(), example_inputs=torch.randn(2, D))
    assert [(s.path, s.reason) for s in report.sites] == [(":relu", "relu already keeps only its output")]
