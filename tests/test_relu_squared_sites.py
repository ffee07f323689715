"""Squared ReLU as a site (transformers' ReLUSquaredActivation: Nemotron), and ReLU / tanh / sigmoid reported
as keeping only their output already."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from torch import nn
from transformers.activations import ACT2FN

import actpatch
from actpatch.analysis.inputs import input_spec
from actpatch.measure import saved_bytes


def _nemotron() -> nn.Module:
    config = tf.NemotronConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=100)  # fmt: skip
    torch.manual_seed(0)
    return tf.NemotronForCausalLM(config).train()


def test_nemotron_relu2_keeps_only_its_output_with_eager_gradients():
    """relu² keeps y (the down projection's input) alone: relu's output r is freed, no branch bit is added,
    and the gradients are eager's bitwise (√y rounds back to r)."""
    model = _nemotron()
    ref = copy.deepcopy(model)
    _, kwargs = input_spec(model).make(2, 16)
    before, _ = saved_bytes(ref, kwargs)
    report = actpatch.patch_model(model, batch_size=2, seq_len=16)
    sites = [s for s in report.sites if s.activation == "relu2"]
    assert len(sites) == 2 and all(s.patched for s in sites)
    assert {s.saved_bytes_per_token for s in sites} == {128 * 4}  # r, float32, nothing added
    after, _ = saved_bytes(model, kwargs)
    assert report.projection.saved_bytes == pytest.approx(before - after, rel=0.02)
    losses = [m(**kwargs).loss for m in (model, ref)]
    assert torch.equal(losses[0], losses[1])
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


class _Mlp(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(8, 16), act, nn.Linear(16, 8)

    def forward(self, x):
        return self.down(self.act(self.up(x))).sum()


@pytest.mark.parametrize("act", [nn.ReLU(), nn.Tanh(), nn.Sigmoid()], ids=lambda m: type(m).__name__)
def test_activations_keeping_their_output_already_say_so(act):
    report = actpatch.analyze(_Mlp(act), example_inputs=torch.randn(2, 3, 8))
    (site,) = report.sites
    assert not site.patched and site.reason == f"{site.activation} already keeps only its output"


class _OwnRelu2(nn.Module):
    def forward(self, x):
        return torch.where(x > 0, x, 0.0).float().pow(2).to(x.dtype) * 1.0000001


def test_relu2_with_its_own_rounding_is_left_alone():
    report = actpatch.analyze(_Mlp(_OwnRelu2()), example_inputs=torch.randn(2, 3, 8))
    (site,) = report.sites
    assert site.activation == "relu2" and not site.patched and "own rounding" in site.reason


def test_hf_relu2_is_recognised():
    report = actpatch.analyze(_Mlp(ACT2FN["relu2"]), example_inputs=torch.randn(2, 3, 8))
    assert [(s.activation, s.patched) for s in report.sites] == [("relu2", True)]
