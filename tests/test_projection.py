"""The projection against the saved-tensor accounting of a real forward at the requested shape."""

from __future__ import annotations

import copy

import accelerate
import pytest
import torch
from tiny_models import saved_bytes, tiny_model

import actpatch
from actpatch.analysis.inputs import input_spec

FAMILIES = ["gpt2", "bert", "vit", "clip", "t5", "whisper", "llama", "qwen2_moe", "modernbert"]


def _measure(model, batch, seq):
    torch.manual_seed(1)
    _, kwargs = input_spec(model).make(batch, seq)
    return saved_bytes(model, kwargs)[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_projection_matches_a_real_forward_within_2_percent(family, attn):
    model = tiny_model(family, attn=attn)
    batch, seq = 3, 40
    report = actpatch.analyze(model, batch_size=batch, seq_len=seq)
    before = _measure(model, batch, seq)
    assert report.projection.activation_bytes_before == pytest.approx(before, rel=0.02)
    actpatch.patch_model(model)
    after = _measure(model, batch, seq)
    assert report.projection.activation_bytes_after == pytest.approx(after, rel=0.02)
    if report.patched_sites:
        assert report.projection.saved_bytes == pytest.approx(before - after, rel=0.02)


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "bert"])
def test_projection_matches_a_real_forward_at_every_batch_size(family):
    """Batch 1 has its own probes (a fused qkv projection's slice is a view at batch 1, a copy above it):
    every batch size, 1 included, and every length is within 2%, before and after patching."""
    model = tiny_model(family, attn="sdpa")
    patched = copy.deepcopy(model)
    actpatch.patch_model(patched)
    for seq in (7, 64):
        for batch in (1, 2, 3, 5):
            p = actpatch.analyze(model, batch_size=batch, seq_len=seq).projection
            shape = f"batch {batch}, seq {seq}"
            assert p.activation_bytes_before == pytest.approx(_measure(model, batch, seq), rel=0.02), shape
            assert p.activation_bytes_after == pytest.approx(_measure(patched, batch, seq), rel=0.02), shape


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bfloat16_model_is_projected_in_its_own_dtype(family):
    model = tiny_model(family).to(torch.bfloat16)
    report = actpatch.analyze(model, batch_size=2, seq_len=48)
    assert report.projection.dtype == "bfloat16"
    assert report.projection.activation_bytes_before == pytest.approx(_measure(model, 2, 48), rel=0.02)


def test_dtype_argument_on_meta_probes_in_that_dtype():
    model = tiny_model("llama")
    real = _measure(copy.deepcopy(model).to(torch.bfloat16), 2, 48)
    with accelerate.init_empty_weights():
        meta = type(model)(model.config)
    report = actpatch.analyze(meta, batch_size=2, seq_len=48, dtype=torch.bfloat16)
    assert report.projection.activation_bytes_before == pytest.approx(real, rel=0.02)
    assert all(p.dtype == torch.float32 for p in meta.parameters())  # cast back


def test_dtype_argument_scales_model_dtype_tensors_of_a_real_model():
    model = tiny_model("llama")
    fp32 = actpatch.analyze(model, batch_size=2, seq_len=48, gated=False, norms=False)
    bf16 = actpatch.analyze(model, batch_size=2, seq_len=48, dtype=torch.bfloat16, gated=False, norms=False)
    # A real model is probed in its own dtype; its tensors are scaled (float32 upcasts included).
    assert bf16.projection.activation_bytes_before < fp32.projection.activation_bytes_before
    site32, site16 = fp32.sites[0], bf16.sites[0]
    assert site16.saved_bytes_per_token == 64 * 2 - 8 and site32.saved_bytes_per_token == 64 * 4 - 8


def test_site_bytes_per_token_sum_to_the_saving():
    report = actpatch.analyze(tiny_model("gpt2"), batch_size=4, seq_len=32)
    per_token = sum(s.saved_bytes_per_token for s in report.sites)
    assert per_token * 4 * 32 == pytest.approx(report.projection.saved_bytes, abs=4 * 32 * len(report.sites))


def test_a_dry_run_keeps_grouped_keys_and_values_as_given():
    """SDPA with enable_gqa on meta: the fused kernel keeps k and v with their own 2 heads, as a GPU's does,
    not repeated to q's 8 (Llama-3-8B: 12,288 bytes per token per layer)."""
    from actpatch.analysis.probe import run_probe, storage_key

    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    q = torch.randn(1, 8, 16, 4, device="meta", requires_grad=True)
    k, v = (torch.randn(1, 2, 16, 4, device="meta", requires_grad=True) for _ in range(2))
    probe = run_probe(Attention(), (q, k, v), {}, torch.float32)
    kept = {s.storage: s.nbytes for s in probe.saved}
    assert {storage_key(t) for t in (q, k, v)} <= set(kept)
    assert sorted(kept.values()).count(q.numel() * 4) == 2  # q and the output; no k or v of 8 heads
