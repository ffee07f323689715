"""The walker's evidence rules: what is found, what is patched, and why not."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref
from pathlib import Path

import accelerate
import pytest
import torch
import transformers as tf
from tiny_models import tiny_config, tiny_model
from torch import nn

import actpatch

EXPECTED = {  # family: (activation, patched, start of the reason) of every site, in order
    "gpt2": [("gelu_tanh", True, None)] * 2,
    "bloom": [("gelu_tanh", True, None)] * 2,
    "mpt": [("gelu", True, None)] * 2,
    "opt": [("relu", False, "relu already keeps only its output")] * 2,
    "phi3": [("silu", False, "input kept alive")] * 2,
    "mixtral": [("silu", False, "input kept alive")] * 2,
    "roberta": [("gelu", True, None)] * 3,  # the third: the head's module-level gelu object, rebound
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_sites_and_reasons(family):
    report = actpatch.analyze(tiny_model(family), gated=False, norms=False)
    got = [
        (s.activation, s.patched, s.reason and s.reason[: len(e[2] or "")])
        for s, e in zip(report.sites, EXPECTED[family], strict=False)
    ]
    assert got == EXPECTED[family]
    assert len(report.sites) == len(EXPECTED[family])


def test_functional_calls_are_sites_of_the_module_calling_them():
    report = actpatch.analyze(tiny_model("whisper"))
    functional = [s for s in report.sites if ":" in s.path]
    assert [s.path for s in functional] == ["model.encoder:gelu"]  # both of its calls: one rebinding
    assert functional[0].reason.startswith("output not saved by a later op (used by model.encoder (permute))")
    assert len([s for s in report.patched_sites if s.kind != "norm"]) == 4


def test_dropout_between_activation_and_linear_blocks_the_patch():
    config = tiny_config("t5")
    config.feed_forward_proj, config.dense_act_fn, config.is_gated_act, config.dropout_rate = (
        "gelu",
        "gelu",
        False,
        0.1,
    )
    model = tf.AutoModelForSeq2SeqLM.from_config(config).train()
    report = actpatch.analyze(model, norms=False)
    assert report.sites and not report.patched_sites
    assert all(s.reason.startswith("output not saved by a later op (used by") for s in report.sites)
    assert "dropout" in report.sites[0].reason


def test_gradient_checkpointing_is_reported():
    model = tiny_model("llama")
    model.gradient_checkpointing_enable()
    report = actpatch.analyze(model)
    inside = [s for s in report.sites if s.path.startswith("model.layers.")]
    assert {s.kind for s in inside} == {"activation", "norm"}
    assert all(s.reason.startswith("inside a checkpointed block") for s in inside)
    assert [s.path for s in report.patched_sites] == ["model.norm"]  # the final norm runs outside


class _Wobble(nn.Module):  # a name nobody listed; x * sigmoid(x) written out
    def forward(self, x):
        return x * torch.sigmoid(x)


class _Scaled(nn.Module):
    def __init__(self, act: nn.Module, inplace: bool) -> None:
        super().__init__()
        self.up, self.act, self.down, self.inplace = nn.Linear(8, 16), act, nn.Linear(16, 8), inplace

    def forward(self, x):
        h = self.act(self.up(x))
        if self.inplace:
            h.mul_(2.0)
        return self.down(h)


def test_activation_found_by_its_values_not_its_name():
    model = _Scaled(_Wobble(), inplace=False)
    report = actpatch.patch_model(model, example_inputs=torch.randn(2, 4, 8))
    assert [(s.path, s.activation, s.patched) for s in report.sites] == [("act", "silu", True)]
    assert type(model.act).__name__ == "InvertedSiLU"


def test_output_modified_in_place_is_not_patched():
    report = actpatch.patch_model(_Scaled(nn.GELU(), inplace=True), example_inputs=torch.randn(2, 4, 8))
    assert [(s.patched, s.reason) for s in report.sites] == [(False, "output modified in place (mul)")]


def test_frozen_consumer_keeps_nothing():
    model = _Scaled(nn.SiLU(), inplace=False)
    model.down.requires_grad_(False)
    report = actpatch.analyze(model, example_inputs=torch.randn(2, 4, 8))
    assert report.sites[0].reason.startswith("output not saved")


def test_analysis_keeps_nothing_alive():
    """The probe's graph dies with it: once a wrapper (FSDP, .to()) replaces the parameters, the old ones
    are freed (a graph kept alive by a saved-tensor cycle once held every parameter and activation)."""
    model = tiny_model("llama")
    old = [weakref.ref(p) for p in model.parameters()]
    actpatch.patch_model(model, batch_size=2, seq_len=16)
    for m in model.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = nn.Parameter(p.detach().clone())
    del m, p
    gc.collect()
    assert sum(r() is not None for r in old) == 0


def test_model_without_activations_gives_empty_report():
    report = actpatch.patch_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    assert report.sites == [] and report.projection.saved_bytes == 0


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got str"):
        actpatch.analyze("gpt2")


def test_to_dict_has_the_contract_keys_and_is_json():
    d = actpatch.analyze(tiny_model("gpt2"), batch_size=2, seq_len=16, dtype=torch.bfloat16).to_dict()
    json.dumps(d)
    assert set(d) == {"model", "dry_run", "sites", "projection"}
    assert set(d["sites"][0]) == {
        "path",
        "activation",
        "consumer",
        "patched",
        "reason",
        "saved_bytes_per_token",
        "kind",
        "keeps",
    }
    assert set(d["projection"]) == {
        "batch_size",
        "seq_len",
        "dtype",
        "activation_bytes_before",
        "activation_bytes_after",
        "saved_bytes",
        "saved_fraction",
    }
    assert d["projection"]["dtype"] == "bfloat16" and d["model"] == "GPT2LMHeadModel"


def test_meta_model_gives_the_same_report_as_the_real_one():
    config = tiny_config("llama")
    config._attn_implementation = "eager"
    real = tf.AutoModelForCausalLM.from_config(config)
    with accelerate.init_empty_weights():
        meta = tf.AutoModelForCausalLM.from_config(config)
    a, b = actpatch.analyze(real, batch_size=4, seq_len=64), actpatch.analyze(meta, batch_size=4, seq_len=64)
    assert b.dry_run and not a.dry_run
    assert [(s.path, s.patched, s.saved_bytes_per_token) for s in a.sites] == [
        (s.path, s.patched, s.saved_bytes_per_token) for s in b.sites
    ]
    assert a.projection == b.projection
    actpatch.patch_model(meta, gated=False)
    assert type(meta.model.layers[0].mlp.act_fn).__name__ == "InvertedSiLU"
    actpatch.unpatch_model(meta)
    assert {s.path for s in actpatch.patch_model(meta).patched_sites} == {s.path for s in b.patched_sites}


_DRY_RUN_70B = """
import json, resource, time, torch, accelerate, transformers, actpatch
d = json.load(open({config!r}))
with accelerate.init_empty_weights():
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**d))
t = time.perf_counter()
r = actpatch.analyze(model, batch_size=1, seq_len=4096, dtype=torch.bfloat16)
KINDS = ("gated", "norm")
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
per_token = {{k: sorted({{s.saved_bytes_per_token for s in r.patched_sites if s.kind == k}}) for k in KINDS}}
count = {{k: sum(s.kind == k for s in r.patched_sites) for k in KINDS}}
print(json.dumps(dict(seconds=time.perf_counter() - t, rss=rss, sites=len(r.sites), count=count,
    per_token=per_token, dry_run=r.dry_run)))
"""


def test_llama_70b_dry_run_is_fast_and_small():
    config = Path(actpatch.__file__).parent / "configs" / "meta-llama--Llama-3.1-70B.json"
    out = subprocess.run(
        [sys.executable, "-c", _DRY_RUN_70B.format(config=str(config))],
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert (
        r["dry_run"] and r["sites"] == 4 * 80 + 1
    )  # per layer: MLP, its act_fn (fused), 2 norms; final norm
    assert r["count"] == {"gated": 80, "norm": 2 * 80 + 1}
    assert r["per_token"]["gated"] == [
        2 * (28672 * 2 - 28672 // 8)
    ]  # gate, act(gate) freed; 2 bit masks added
    assert r["per_token"]["norm"] == [
        8192 * 4 + 8192 * 2
    ]  # float32 copy, bf16 product freed; the output kept (saved by q/k/v, gate/up, lm_head anyway)
    assert r["seconds"] < 30
    assert r["rss"] < 2 * 2**30
