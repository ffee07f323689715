"""Patched models under torch.compile: one graph, and no more saved bytes than the patched model in eager
mode (tiny versions of the models of ``benchmarks/train_step.py``); norms keeping their output check their
weight outside the graph, again after every optimizer step."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from tiny_models import tiny_model
from torch import nn

import actpatch
from actpatch import in_place, measure
from actpatch.kinds import norm as norm_kind

LOSSES = {"llama": "ForCausalLM", "gpt2": "ForCausalLM", "bert": "ForMaskedLM"}


def _batch() -> dict:
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def _saved(run: nn.Module, model: nn.Module, inputs: dict) -> int:
    torch.manual_seed(1)
    nbytes, out = measure.saved_bytes(run, inputs)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return nbytes


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_compiled_patched_keeps_at_most_the_eager_patched_bytes(family):
    """torch.compile(fullgraph=True) of the model patched with the defaults: no graph break, and at most the
    bytes the same patched model keeps in eager mode (the compiler's partition chooses around the opaque
    ops; a norm keeping its input under compile kept one hidden-sized tensor more per norm)."""
    model = tiny_model(family, attn="sdpa").train()
    model.loss_type = LOSSES[family]  # named: transformers' warning of an unnamed one breaks the graph
    inputs = _batch()
    actpatch.patch_model(model, example_inputs=inputs)
    eager = _saved(model, model, inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(**inputs).loss.backward()  # compiles
    assert _saved(compiled, model, inputs) <= eager


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.proj = nn.LayerNorm(16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x)).square().sum()


def test_compiled_norm_keeps_its_input_once_an_optimizer_step_makes_its_weight_unsafe():
    """A weight with a zero (from an optimizer step) cannot give x̂ back from y: after the step the compiled
    graph is rebuilt keeping the input, so its gradients stay eager's (keeping y they would be NaN)."""
    model = _Block()
    ref = copy.deepcopy(model)
    report = actpatch.patch_model(model, example_inputs=torch.randn(2, 5, 16))
    assert [s.keeps for s in report.sites if s.kind == "norm"] == ["output"]
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    compiled(x).backward()
    plan = in_place.plan_of(model.norm)
    assert plan.safe[torch.float32]  # the graph keeps y
    for m in (model, ref):
        with torch.no_grad():
            m.norm.weight[3] = 0.0
        m.zero_grad(set_to_none=True)
    x.grad = None
    torch.optim.SGD(model.parameters(), lr=0.0).step()  # no gradients: changes nothing, checks the weights
    assert not plan.safe[torch.float32]
    compiled(x).backward()
    got = [x.grad, *(p.grad for p in model.parameters())]
    x.grad = None
    ref(x).backward()
    want = [x.grad, *(p.grad for p in ref.parameters())]
    for g, w in zip(got, want, strict=True):
        assert torch.isfinite(g).all() and torch.allclose(g, w, rtol=1e-4, atol=1e-6)


def test_norms_are_checked_after_optimizer_steps_until_collected():
    """Each norm keeping its output is checked after every optimizer step while it lives, in patching
    order (the same on every rank)."""
    model = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 16))
    actpatch.patch_model(model, example_inputs=torch.randn(2, 5, 16))
    keys = [id(model[0]), id(model[2])]
    assert [k for k in norm_kind._CHECKED if k in keys] == keys
    del model
    gc.collect()
    assert not set(keys) & set(norm_kind._CHECKED)


def test_compiled_decisions_leave_out_a_silu_the_compiler_recomputes():
    """A Llama MLP's SiLU inverted alone (gated=False): compiled, the partition keeps gate and up and
    recomputes the SiLU, so inverting it only adds its bits; with compiled=True it is left out, with the
    measured bytes, and the projection frees nothing for it."""
    model = tiny_model("llama", attn="sdpa").train()
    model.loss_type = LOSSES["llama"]
    options = dict(example_inputs=_batch(), gated=False, norms=False)
    eager = actpatch.analyze(model, **options)
    assert [s.path for s in eager.patched_sites] == ["model.layers.0.mlp.act_fn", "model.layers.1.mlp.act_fn"]
    report = actpatch.patch_model(model, compiled=True, **options)
    assert not report.patched_sites and report.projection.saved_bytes == 0
    assert report.projector(3, 40)[1] == 0 and not report.projector.freed_by_kind(3, 40)  # fit plans alike
    reasons = {s.reason for s in report.sites if s.path.endswith("act_fn")}
    assert len(reasons) == 1 and reasons.pop().startswith(
        "under torch.compile the compiled graph keeps no less"
    )
    assert not actpatch.patching.patched_modules(model)


def test_a_compiled_model_is_patched_in_its_module_with_dropouts_left_to_the_compiler():
    model = tiny_model("gpt2", attn="sdpa").train()
    model.loss_type = LOSSES["gpt2"]
    compiled = torch.compile(model, backend="aot_eager")
    report = actpatch.patch_model(compiled, example_inputs=_batch(), dropouts=True)  # compiled: detected
    dropouts = [s for s in report.sites if s.kind == "dropout"]
    assert dropouts and all(not s.patched and "left to the compiler" in s.reason for s in dropouts)
    assert {s.kind for s in report.patched_sites} == {"activation", "norm"}
    p = report.projection
    assert set(report.projector.freed_by_kind(3, 40)) == {"activation", "norm"}
    assert report.projector(p.batch_size, p.seq_len)[1] == pytest.approx(p.saved_bytes, abs=p.seq_len * 8)
    patched = actpatch.patching.patched_modules(model)
    assert sorted(patched) == sorted(s.path for s in report.patched_sites)
    torch._dynamo.reset()
    compiled(**_batch()).loss.backward()
    assert sorted(actpatch.unpatch_model(compiled)) == sorted(patched)


def test_blocks_compiled_in_place_are_probed_eagerly_and_decided_for_compile():
    """torchtitan's way, each block compiled in place (``block.compile()``): the probe runs the blocks
    eagerly (Dynamo compiles none of its frames), the decisions are the compiled ones (the SiLU the compiler
    recomputes left out), and the compiled blocks then train patched with eager's loss."""
    model = tiny_model("llama", attn="sdpa").train()
    model.loss_type = LOSSES["llama"]
    inputs = _batch()
    loss = model(**inputs).loss
    torch._dynamo.reset()
    for block in model.model.layers:
        block.compile(backend="aot_eager")
    torch._dynamo.utils.counters.clear()
    actpatch.analyze(model, example_inputs=inputs, compiled=False)
    assert not torch._dynamo.utils.counters["frames"]  # the probe compiled nothing: it ran eagerly
    report = actpatch.patch_model(model, example_inputs=inputs, gated=False, norms=False)
    assert not report.patched_sites
    assert all(s.reason.startswith("under torch.compile") for s in report.sites if s.path.endswith("act_fn"))
    report = actpatch.patch_model(model, example_inputs=inputs)
    assert {s.kind for s in report.patched_sites} >= {"gated", "norm"}
    torch.testing.assert_close(model(**inputs).loss, loss)
