"""A module object reached through several parents (torchtune's ``FeedForward(activation=nn.SiLU())``: one
default SiLU shared by every layer) is a site in each parent that calls it: each is patched, gated MLPs
around it fuse, and the projection counts only what is patched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import actpatch
from actpatch.measure import saved_bytes

SHARED = nn.SiLU()


class _FeedForward(nn.Module):
    def __init__(self, activation: nn.Module = SHARED) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Linear(16, 32, bias=False), nn.Linear(32, 16, bias=False)
        self.w3 = nn.Linear(16, 32, bias=False)
        self.activation = activation

    def forward(self, x):
        return self.w2(self.activation(self.w1(x)) * self.w3(x))


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.mlp = nn.RMSNorm(16), _FeedForward()

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.layers = nn.Linear(16, 16), nn.ModuleList(_Layer() for _ in range(3))

    def forward(self, x):
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return x.square().sum()


@pytest.mark.parametrize("gated", [True, False])
def test_a_shared_activation_is_a_site_in_every_parent(gated):
    torch.manual_seed(0)
    model = _Model()
    assert all(layer.mlp.activation is SHARED for layer in model.layers)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 8, 16)
    before, _ = saved_bytes(ref, {"x": x})
    report = actpatch.patch_model(model, example_inputs=x, batch_size=2, seq_len=8, gated=gated)
    patched = [(s.path, s.kind) for s in report.sites if s.patched and s.kind != "norm"]
    expected = [(f"layers.{i}.mlp", "gated") if gated else (f"layers.{i}.mlp.activation", "activation")
                for i in range(3)]  # fmt: skip
    assert patched == expected
    after, _ = saved_bytes(model, {"x": x})
    assert report.projection.saved_bytes == pytest.approx(before - after, rel=0.02)
    model(x).backward()
    ref(x).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * q.grad.abs().max(), name
    actpatch.unpatch_model(model)
    assert all(layer.mlp.activation is SHARED for layer in model.layers)


class _Block(nn.Module):
    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.inp, self.mlp = nn.Linear(16, 16), mlp

    def forward(self, x):
        return self.mlp(self.inp(x))


class _TwoParents(nn.Module):
    """One gated MLP object held by two blocks: patched in place once, restored exactly."""

    def __init__(self) -> None:
        super().__init__()
        mlp = _FeedForward(nn.SiLU())
        self.a, self.b = _Block(mlp), _Block(mlp)

    def forward(self, x):
        return self.b(self.a(x)).square().sum()


def test_a_module_patched_in_place_through_two_parents_is_patched_once():
    torch.manual_seed(0)
    model = _TwoParents()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 8, 16)
    report = actpatch.patch_model(model, example_inputs=x)
    assert [s.path for s in report.sites if s.patched] == ["a.mlp", "b.mlp"]
    model(x).backward()
    ref(x).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * q.grad.abs().max(), name
    actpatch.unpatch_model(model)
    assert type(model.a.mlp) is _FeedForward and model.a.mlp is model.b.mlp
