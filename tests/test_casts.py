"""Linears under autocast reading one float32 tensor share one cast of it (site kind "cast"): the same
outputs and gradients bitwise, one copy kept instead of one per Linear, found by evidence (CPU autocast)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from tiny_models import saved_bytes

import actpatch
from actpatch.functional import autocast_input
from actpatch.manifest import build_manifest, reapply

AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


def tiny_llama() -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
    )  # fmt: skip
    return tf.LlamaForCausalLM(cfg).train()


IDS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))


def step(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss, every parameter's gradient and the bytes autograd saved, under CPU bf16 autocast."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(**AUTOCAST):
        nbytes, loss = saved_bytes(model, {"input_ids": IDS, "labels": IDS})
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, nbytes


def cast_sites(report) -> dict[str, object]:
    return {s.path: s for s in report.sites if s.kind == "cast"}


def test_shared_casts_change_nothing_and_keep_one_copy_per_input():
    model = tiny_llama()
    loss, grads, before = step(model)
    with torch.autocast(**AUTOCAST):  # only the casts: the other kinds' sites left out
        report = actpatch.patch_model(
            model, include="*_proj", gated=False, norms=False, batch_size=2, seq_len=32
        )
    sites = cast_sites(report)
    patched = {p for p, s in sites.items() if s.patched}
    per_layer = {f"self_attn.{n}_proj" for n in "qkv"} | {"mlp.gate_proj", "mlp.up_proj"}
    assert patched == {f"model.layers.{i}.{n}" for i in range(2) for n in per_layer}
    assert sites["model.layers.0.self_attn.q_proj"].consumer == "its cast shared with k_proj, v_proj"
    assert sites["model.layers.1.mlp.up_proj"].consumer == "shares gate_proj's cast"
    assert sites["model.layers.0.self_attn.k_proj"].saved_bytes_per_token == 64 * 2  # hidden 64, bf16
    assert sites["model.layers.0.self_attn.q_proj"].saved_bytes_per_token == 0  # keeps the one cast

    loss2, grads2, after = step(model)
    assert torch.equal(loss, loss2)
    assert all(torch.equal(grads[n], grads2[n]) for n in grads), [
        n for n in grads if not torch.equal(grads[n], grads2[n])
    ]
    freed = 2 * 3 * 64 * 64 * 2  # 2 layers x (k, v, up) x 64 tokens x hidden 64 x bf16
    assert before - after == freed == report.projection.saved_bytes

    actpatch.unpatch_model(model)
    assert type(model.model.layers[0].self_attn.k_proj) is torch.nn.Linear
    assert step(model)[2] == before


def test_without_autocast_no_linear_casts_so_no_sites():
    report = actpatch.analyze(tiny_llama(), batch_size=2, seq_len=32)
    assert not cast_sites(report)


def test_autocast_input_casts_once_per_tensor_until_it_changes():
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    h = x * 2
    with torch.autocast(**AUTOCAST):
        a, b = autocast_input(h), autocast_input(h)
        assert a.dtype == torch.bfloat16 and a is not b
        assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        assert torch.equal(a, h.detach().to(torch.bfloat16))
        y = F.linear(a, lin.weight, lin.bias) + F.linear(b, lin.weight, lin.bias)
        with torch.no_grad():
            h.mul_(3)  # a later in-place change: a new cast
        c = autocast_input(h)
        assert c.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
        assert torch.equal(c, h.detach().to(torch.bfloat16))
        assert autocast_input(h.detach().to(torch.bfloat16)).dtype == torch.bfloat16  # nothing to cast
        with torch.no_grad():
            assert autocast_input(h) is h  # no gradient: nothing kept, the op casts as usual
    y.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    assert autocast_input(h) is h  # outside autocast


def test_manifest_leaves_contextual_cast_sites_out_and_reapplies_outside_autocast():
    model = tiny_llama()
    with torch.autocast(**AUTOCAST):
        report = actpatch.patch_model(model, batch_size=2, seq_len=32)
    assert any(s.patched for s in cast_sites(report).values())
    manifest = build_manifest(model, report)
    assert manifest.sites and all(s.kind != "cast" for s in manifest.sites)
    fresh = tiny_llama()
    reapplied = reapply(fresh, manifest)  # strict: the recorded sites exactly, outside autocast
    assert not any(s.patched for s in cast_sites(reapplied).values())


def test_compiled_patched_model_runs_without_graph_breaks_and_matches():
    model = tiny_llama()
    with torch.autocast(**AUTOCAST):
        actpatch.patch_model(model, include="*_proj", gated=False, norms=False, batch_size=2, seq_len=32)
        expected = model(input_ids=IDS, labels=IDS).loss
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        assert torch.equal(compiled(input_ids=IDS, labels=IDS).loss, expected)


@pytest.mark.parametrize("bf16", [True, False])
def test_trainer_mixed_precision_probes_under_its_autocast(tmp_path, bf16):
    """With float32 weights and bf16=True the Trainer's forward runs under autocast: the callback's probe
    sees the casts and shares them; without mixed precision there is no cast to share."""
    from actpatch.integrations import ActPatchCallback

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"input_ids": IDS[0], "labels": IDS[0]}

    callback = ActPatchCallback(save_manifest=False)
    args = tf.TrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, bf16=bf16, use_cpu=True,
        report_to=[], save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    tf.Trainer(model=tiny_llama(), args=args, train_dataset=Tokens(), callbacks=[callback]).train()
    shared = [s for s in cast_sites(callback.report).values() if s.patched]
    assert len(shared) == (10 if bf16 else 0)
    assert callback.report.projection.dtype == "float32"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast")
def test_shared_casts_on_gpu_change_nothing_and_free_their_copies():
    model = tiny_llama().cuda()
    ids = IDS.cuda()

    def cuda_step():
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        with torch.autocast("cuda", torch.bfloat16):
            nbytes, loss = saved_bytes(model, {"input_ids": ids, "labels": ids})
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, nbytes

    loss, grads, before = cuda_step()
    with torch.autocast("cuda", torch.bfloat16):
        report = actpatch.patch_model(
            model, include="*_proj", gated=False, norms=False, batch_size=2, seq_len=32
        )
    assert sum(s.patched for s in cast_sites(report).values()) == 10
    loss2, grads2, after = cuda_step()
    assert torch.equal(loss, loss2) and all(torch.equal(grads[n], grads2[n]) for n in grads)
    assert before - after == 2 * 3 * 64 * 64 * 2 == report.projection.saved_bytes


def test_trainer_compiling_its_model_gets_compiled_decisions(tmp_path):
    """TrainingArguments(torch_compile=True): the callback decides for the compiled graph, where a SiLU
    inverted alone (gated=False) frees nothing and is left out."""
    from actpatch.integrations import ActPatchCallback

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"input_ids": IDS[0], "labels": IDS[0]}

    callback = ActPatchCallback(save_manifest=False, gated=False, norms=False)
    args = tf.TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, use_cpu=True, report_to=[],
        save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, torch_compile=True,
        torch_compile_backend="aot_eager",
    )  # fmt: skip
    model = tiny_llama()
    model.loss_type = "ForCausalLM"
    tf.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback]).train()
    silu = [s for s in callback.report.sites if s.path.endswith("mlp.act_fn")]
    assert len(silu) == 2 and all(not s.patched and "under torch.compile" in s.reason for s in silu)
