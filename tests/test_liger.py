"""actpatch with Liger-Kernel, in either order: Liger's SwiGLU MLPs and RMSNorms are taken over where
actpatch keeps less, the rest stays Liger's and is named in the report.

Liger's RMSNorm and SwiGLU kernels do not run on a CPU (nor under TRITON_INTERPRET=1: their scalar
arguments are Python floats there); its RoPE and fused linear cross entropy run under the interpreter.  CPU
tests therefore train models where actpatch takes over every Liger norm and MLP, and the GPU tests (marker
``gpu``) the mixed ones."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from test_integrations import (
    TokenData,
    _llama_grads,
    assert_grads_close,
    batch,
    losses,
    tiny_llama,
    trainer_for,
)

import actpatch
from actpatch.integrations import ActPatchCallback, liger_fused_modules, liger_owned
from actpatch.integrations.liger import FUSED, NORM_KEPT

liger = pytest.importorskip("liger_kernel.transformers")
LAYERS = range(2)
MLPS = {f"model.layers.{i}.mlp" for i in LAYERS}
NORMS = {f"model.layers.{i}.{n}" for i in LAYERS for n in ("input_layernorm", "post_attention_layernorm")}
NORMS |= {"model.norm"}


@contextlib.contextmanager
def llama_module_kept():
    """transformers' Llama classes and functions as they are now, put back after the block (Liger's
    ``apply_liger_kernel_to_llama`` replaces them even in its instance form)."""
    from transformers.models.llama import modeling_llama as ml

    names = ("LlamaMLP", "LlamaRMSNorm", "apply_rotary_pos_emb")
    saved = {k: getattr(ml, k) for k in names}
    forward = ml.LlamaForCausalLM.forward
    try:
        yield
    finally:
        ml.LlamaForCausalLM.forward = forward
        for k, v in saved.items():
            setattr(ml, k, v)


@contextlib.contextmanager
def liger_patched_llama_classes(model=None, **options):
    """apply_liger_kernel_to_llama (``model=``: the instance form) for the duration of the block, then
    transformers' classes and functions back.  Default: RMSNorm and SwiGLU only."""
    with llama_module_kept():
        liger.apply_liger_kernel_to_llama(
            model=model, **(dict(rope=False, fused_linear_cross_entropy=False) | options)
        )
        yield


def liger_llama(form: str, **options):
    """A tiny Llama after Liger's class swaps ("class") or its instance patch ("instance")."""
    if form == "class":
        with liger_patched_llama_classes(**options):
            return tiny_llama()
    model = tiny_llama()
    with liger_patched_llama_classes(model, **options):
        return model


@pytest.mark.parametrize("form", ["class", "instance"])
def test_liger_mlps_and_norms_are_taken_over_and_given_back(form):
    """float32: every norm's output is saved by the Linear after it, so each LigerRMSNorm keeps its output
    under actpatch, and each LigerSwiGLUMLP the product and the gate: all taken over.  The gradients are
    eager's (no Liger kernel runs on the CPU, which is what lets this train here); patching twice changes
    nothing; unpatch_model gives the modules back to Liger."""
    x = batch()
    ref = _llama_grads(tiny_llama(), x)
    model = liger_llama(form)
    assert set(liger_fused_modules(model)) == MLPS | NORMS
    report = actpatch.patch_model(model, batch_size=4, seq_len=16)
    by_path = {s.path: s for s in report.sites}
    assert {p for p, s in by_path.items() if s.patched} == MLPS | NORMS
    assert all(by_path[p].kind == "gated" for p in MLPS) and all(by_path[p].keeps == "output" for p in NORMS)
    act = "model.layers.0.mlp" + (":LigerSwiGLUMLP" if form == "class" else ".act_fn")
    assert by_path[act].reason == "fused into the gated product at model.layers.0.mlp"
    assert liger_fused_modules(model) == {} and not [s for s in report.sites if s.kind == "liger"]
    assert all("forward" not in model.get_submodule(p).__dict__ for p in MLPS | NORMS)  # Liger's set aside
    assert_grads_close(ref, _llama_grads(model, x))
    again = actpatch.patch_model(model, batch_size=4, seq_len=16)
    assert [s.__dict__ for s in again.sites] == [s.__dict__ for s in report.sites]
    assert set(actpatch.unpatch_model(model)) == MLPS | NORMS
    assert liger_fused_modules(model) == dict.fromkeys(sorted(MLPS), "LigerSwiGLUMLP") | dict.fromkeys(
        sorted(NORMS), "LigerRMSNorm"
    )


def test_liger_norms_keeping_their_input_stay_liger_and_the_report_names_them():
    """Under bfloat16 autocast with float32 weights a norm's float32 output is not what the Linear saves
    (it saves its own bfloat16 cast): actpatch's norm would keep x and 1/rms, as LigerRMSNorm does, so the
    norms stay Liger's; the MLPs are still taken over (2 intermediate-sized tensors to Liger's 3)."""
    model = liger_llama("instance")
    with torch.autocast("cpu", torch.bfloat16):
        report = actpatch.patch_model(model, batch_size=4, seq_len=16)
    by_path = {s.path: s for s in report.sites}
    assert {p for p, s in by_path.items() if s.patched and s.kind != "cast"} == MLPS
    # the projections reading one float32 tensor share its bf16 cast, inside Liger's MLPs too
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
    shared = {f"model.layers.{i}.{p}" for i in range(2) for p in projections}
    assert {p for p, s in by_path.items() if s.patched and s.kind == "cast"} == shared
    assert {by_path[p].reason for p in NORMS} == {NORM_KEPT.format("LigerRMSNorm")}
    assert all(by_path[p].saved_bytes_per_token == 0 for p in NORMS)
    assert set(liger_fused_modules(model)) == NORMS
    # patched sites add up to the projection (the norms' bytes were given back)
    freed = sum(s.saved_bytes_per_token for s in report.patched_sites) * 4 * 16
    assert abs(report.projection.saved_bytes - freed) <= len(MLPS) * 64
    assert "norm" not in report.projector.freed_by_kind(4, 16)  # and so do the fit planner's
    assert report.projector(4, 16)[1] == pytest.approx(report.projection.saved_bytes, abs=len(MLPS) * 64)


def test_without_the_gated_kind_the_liger_mlps_stay_liger():
    model = liger_llama("class")
    report = actpatch.patch_model(model, batch_size=4, seq_len=16, gated=False)
    by_path = {s.path: s for s in report.sites}
    assert by_path["model.layers.0.mlp:LigerSwiGLUMLP"].reason == FUSED.format("LigerSwiGLUMLP")
    assert not by_path["model.layers.0.mlp:LigerSwiGLUMLP"].patched
    assert set(liger_fused_modules(model)) == MLPS


def test_liger_owned_names_rope_and_the_fused_linear_cross_entropy():
    """Nothing runs here: what Liger replaced is read from the model and the modules it was patched in."""
    with liger_patched_llama_classes(rope=True, fused_linear_cross_entropy=True):
        model = tiny_llama()
        owned = liger_owned(model)
    assert owned["transformers.models.llama.modeling_llama.apply_rotary_pos_emb"] == "liger_rotary_pos_emb"
    assert owned["LlamaForCausalLM:forward"] == "lce_forward"
    assert owned["model.layers.0.mlp"] == "LigerSwiGLUMLP" and owned["model.norm"] == "LigerRMSNorm"
    instance = tiny_llama()
    with liger_patched_llama_classes(instance, fused_linear_cross_entropy=True):
        assert liger_owned(instance)["LlamaForCausalLM:forward"] == "lce_forward"


def test_actpatch_then_liger_classes_leaves_the_patched_model_alone():
    """Liger's class-level patch changes transformers' classes, not the modules of a model built before."""
    x = batch()
    ref = _llama_grads(tiny_llama(), x)
    model = tiny_llama()
    actpatch.patch_model(model, batch_size=4, seq_len=16)
    patched = actpatch.patching.patched_modules(model)
    with liger_patched_llama_classes():
        assert actpatch.patching.patched_modules(model) == patched
        assert_grads_close(ref, _llama_grads(model, x))


def test_actpatch_then_liger_instance_patch_then_patch_model_again():
    """Liger's instance patch binds its forward on the patched modules (Liger runs there again, kept
    safely); patch_model once more sets those aside and takes the sites back, and unpatch gives them back."""
    x = batch()
    ref = _llama_grads(tiny_llama(), x)
    model = tiny_llama()
    actpatch.patch_model(model, batch_size=4, seq_len=16)
    with liger_patched_llama_classes(model):
        pass
    assert set(liger_fused_modules(model)) == MLPS | NORMS  # Liger's forward shadows actpatch's plan
    report = actpatch.patch_model(model, batch_size=4, seq_len=16)
    assert {s.path for s in report.patched_sites} == MLPS | NORMS and liger_fused_modules(model) == {}
    assert_grads_close(ref, _llama_grads(model, x))
    actpatch.unpatch_model(model)
    assert set(liger_fused_modules(model)) == MLPS | NORMS


def test_liger_rope_stays_and_trains_under_the_triton_interpreter(tmp_path):
    """Liger's full patch but the loss: RoPE stays Liger's (its Triton kernel, interpreted on the CPU), the
    norms and MLPs are actpatch's; the loss is eager's and the gradients within float32 rounding."""
    script = tmp_path / "rope.py"
    script.write_text(
        "import actpatch\n"
        "from transformers.models.llama import modeling_llama as ml\n"
        "from test_liger import liger_patched_llama_classes, tiny_llama, batch, _llama_grads\n"
        "from test_liger import assert_grads_close\n"
        "x = batch(); ref = _llama_grads(tiny_llama(), x); model = tiny_llama()\n"
        "with liger_patched_llama_classes(model, rope=True):\n"
        "    assert ml.apply_rotary_pos_emb.__module__.startswith('liger_kernel')\n"
        "    report = actpatch.patch_model(model, batch_size=4, seq_len=16)\n"
        "    assert any(s.kind == 'liger' and 'rotary' in s.activation for s in report.sites)\n"
        "    assert_grads_close(ref, _llama_grads(model, x), rel=1e-3)\n"
    )
    tests = str(Path(__file__).parent)
    path = os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


# -- Trainer and TRL ---------------------------------------------------------------------------------

RMS_AND_SWIGLU = {"rope": False, "fused_linear_cross_entropy": False}  # the Liger kernels of a CPU test


def test_callback_with_trainer_use_liger_kernel(tmp_path):
    """``TrainingArguments(use_liger_kernel=True)``: the Trainer applies Liger's instance patch in train(),
    the callback patches at train start and takes Liger's norms and MLPs over; the losses are eager's."""
    eager = trainer_for(tiny_llama(), tmp_path / "eager")
    eager.train()
    with llama_module_kept():
        model = tiny_llama()
        trainer = trainer_for(model, tmp_path / "liger", callbacks=[callback := ActPatchCallback()])
        trainer.args.use_liger_kernel, trainer.args.liger_kernel_config = True, RMS_AND_SWIGLU
        trainer.train()  # applies Liger's instance patch, then the callback patches
    assert {s.path for s in callback.report.patched_sites} == MLPS | NORMS
    liger_set_aside = [
        model.get_submodule(p).__dict__.get("_actpatch_instance_forward") for p in MLPS | NORMS
    ]
    assert all(f is not None and f.__module__.startswith("liger_kernel") for f in liger_set_aside)
    assert losses(trainer) == pytest.approx(losses(eager), rel=1e-4)
    assert losses(trainer) == pytest.approx(losses(eager), rel=1e-4)


def _tokenizer() -> tf.PreTrainedTokenizerFast:
    """A word-level tokenizer of the tiny vocabulary, built offline."""
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(96)} | {"<pad>": 0}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t1"))
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="t2")


@pytest.mark.parametrize("use_liger", [False, True])
def test_callback_with_trl_sft_trainer(tmp_path, use_liger):
    """TRL's SFTTrainer (pre-tokenized rows) with the callback, with and without its Liger option.  TRL turns
    activation checkpointing on by default, where nothing inside a block is worth patching: off here."""
    trl = pytest.importorskip("trl")
    import datasets

    rows = datasets.Dataset.from_dict({"input_ids": TokenData(n=16).x.tolist()})

    def sft(callbacks, liger_on):
        config = trl.SFTConfig(
            output_dir=str(tmp_path / str(liger_on)), max_steps=3, per_device_train_batch_size=4,
            learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, bf16=False, save_strategy="no",
            use_liger_kernel=liger_on, liger_kernel_config=RMS_AND_SWIGLU if liger_on else None,
            dataloader_num_workers=0, seed=0, max_length=16, gradient_checkpointing=False,
        )  # fmt: skip
        trainer = trl.SFTTrainer(
            model=tiny_llama(),
            args=config,
            train_dataset=rows,
            processing_class=_tokenizer(),
            callbacks=callbacks,
        )
        trainer.train()
        return trainer

    eager = sft(None, False)
    with llama_module_kept():
        trainer = sft([callback := ActPatchCallback()], use_liger)
    assert {s.path for s in callback.report.patched_sites} >= MLPS
    assert losses(trainer) == pytest.approx(losses(eager), rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's RMSNorm and SwiGLU kernels need CUDA")
@pytest.mark.parametrize("form", ["class", "instance"])
def test_liger_full_then_actpatch_on_gpu(form):
    """Liger's full patch (RoPE, RMSNorm, SwiGLU, fused linear cross entropy) on a GPU, bf16 autocast over
    float32 weights: the MLPs are taken over, the norms stay Liger's, the loss is Liger's within bf16
    rounding and the model trains."""
    x = batch().cuda()
    model = tiny_llama() if form == "instance" else None
    with liger_patched_llama_classes(model, rope=True, fused_linear_cross_entropy=True):
        model = (model or tiny_llama()).cuda()
        with torch.autocast("cuda", torch.bfloat16):
            before = model(input_ids=x, labels=x).loss.item()
            report = actpatch.patch_model(model, batch_size=4, seq_len=16)
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        assert {s.path for s in report.patched_sites if s.kind != "cast"} == MLPS
        assert sum(s.kind == "cast" for s in report.patched_sites) == 10  # q, k, v, gate, up of 2 layers
        assert set(liger_fused_modules(model)) >= NORMS
        assert abs(loss.item() - before) <= 1e-2 * abs(before)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
