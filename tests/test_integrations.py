"""Real training workflows on tiny random models: Trainer, the callback, PEFT LoRA, gradient
checkpointing, torch.compile, a 2-process accelerate (DDP, gloo) launch, accelerate's device_map hooks,
(Liger-Kernel: test_liger.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from tiny_models import LLAMA_BLOCKS
from torch import nn

import actpatch
from actpatch.integrations import ActPatchCallback

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 96


def tiny_bert(dropout: float = 0.1) -> tf.BertForMaskedLM:
    torch.manual_seed(0)
    cfg = tf.BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )  # fmt: skip
    return tf.BertForMaskedLM(cfg)


def tiny_llama() -> tf.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return tf.LlamaForCausalLM(cfg)


def patched_paths(model: nn.Module) -> list[str]:
    """Paths actpatch patched: swapped activations, fused gated MLPs, RMSNorms."""
    return list(actpatch.patching.patched_modules(model))


class TokenData(torch.utils.data.Dataset):
    """Fixed random token rows; labels = inputs (the model shifts for causal LM, MLM learns identity)."""

    def __init__(self, n: int = 32, seq: int = 16) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randint(4, VOCAB, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "attention_mask": torch.ones_like(self.x[i]), "labels": self.x[i]}


def trainer_for(model: nn.Module, out: Path, callbacks=None, steps: int = 4) -> tf.Trainer:
    args = tf.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=1, save_steps=steps, save_strategy="steps", report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )  # fmt: skip
    return tf.Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=callbacks)


def losses(trainer: tf.Trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a: dict, b: dict, rel: float = 1e-4, *, inverted_ran: bool = True) -> None:
    """Each gradient within ``rel`` of its own norm (measured: ~3e-7 in fp32 on these models), and not all
    bitwise equal: the inverted backward, not torch's, produced ``b``."""
    assert a.keys() == b.keys() and a
    for name in a:
        err = (a[name] - b[name]).norm().item()
        assert err <= rel * a[name].norm().item() + 1e-8, (name, err, a[name].norm().item())
    if inverted_ran:
        assert any(not torch.equal(a[n], b[n]) for n in a), (
            "gradients bitwise equal: was the inverted op used?"
        )


def checkpointing(model: nn.Module, on: bool, **kw) -> None:
    """Non-reentrant activation checkpointing on/off (transformers 5.2x renamed gradient_ -> activation_)."""
    if not hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
    elif on:
        model.activation_checkpointing_enable({"use_reentrant": False}, **kw)
    else:
        model.activation_checkpointing_disable()


def batch(seq: int = 16, n: int = 4) -> torch.Tensor:
    return torch.randint(4, VOCAB, (n, seq), generator=torch.Generator().manual_seed(2))


# -- Trainer ------------------------------------------------------------------------------------------


def test_patch_before_trainer_trains_saves_and_reloads_as_ordinary_model(tmp_path):
    base = tiny_bert()
    base_trainer = trainer_for(base, tmp_path / "base")
    base_trainer.train()

    model = tiny_bert()
    report = actpatch.patch_model(model, batch_size=4, seq_len=16)
    assert len(report.patched_sites) >= 2 and patched_paths(model)
    trainer = trainer_for(model, tmp_path / "patched")
    trainer.train()
    assert patched_paths(trainer.model), "the Trainer must train the patched modules"
    # Same seed, data order and dropout masks: the loss curves agree to the backward's accuracy.
    lb, lp = losses(base_trainer), losses(trainer)
    assert len(lb) == len(lp) == 4
    for b, p in zip(lb, lp, strict=True):
        assert abs(p - b) <= 1e-3 * abs(b), (lb, lp)

    out = tmp_path / "saved"
    trainer.save_model(str(out))
    reloaded = tf.AutoModelForMaskedLM.from_pretrained(out)
    assert not patched_paths(reloaded), "a reloaded checkpoint is an ordinary model"
    sd, rd = model.state_dict(), reloaded.state_dict()
    assert sd.keys() == rd.keys()
    assert all(torch.equal(sd[k], rd[k]) for k in sd)
    assert json.loads((out / "config.json").read_text())["hidden_act"] == "gelu"

    again = actpatch.patch_model(reloaded, batch_size=4, seq_len=16)
    assert [s.path for s in again.patched_sites] == [s.path for s in report.patched_sites]
    model.eval(), reloaded.eval()
    x = batch()
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(x).logits)


def test_callback_patches_at_train_begin_keeps_rng_and_writes_manifest(tmp_path):
    base_trainer = trainer_for(tiny_bert(), tmp_path / "base")
    base_trainer.train()

    callback = ActPatchCallback()
    model = tiny_bert()
    trainer = trainer_for(model, tmp_path / "cb", callbacks=[callback])
    assert not patched_paths(model)
    trainer.train()
    assert callback.report is not None and callback.report.patched_sites
    assert sorted(patched_paths(model)) == sorted(s.path for s in callback.report.patched_sites)
    assert callback.report.projection.batch_size == 4
    # The probe forward ran with dropout on; the RNG was restored, so the dropout masks match the baseline.
    lb, lp = losses(base_trainer), losses(trainer)
    for b, p in zip(lb, lp, strict=True):
        assert abs(p - b) <= 1e-3 * abs(b), (lb, lp)

    ckpt = tmp_path / "cb" / "checkpoint-4"
    manifest = json.loads((ckpt / "actpatch_manifest.json").read_text())
    assert sorted(s["path"] for s in manifest["sites"]) == sorted(patched_paths(model))
    from actpatch.manifest import load_patched

    loaded = load_patched(ckpt)
    assert sorted(patched_paths(loaded)) == sorted(patched_paths(model))


def test_trainer_with_dropout_masks_as_bits_trains_bitwise_as_without(tmp_path):
    """Only the dropouts patched (dropout 0.1, through the callback): the Trainer's losses and the trained
    weights are the baseline's bitwise (the same draws, the same gradients), four steps in."""
    base = tiny_bert(dropout=0.1)
    base_trainer = trainer_for(base, tmp_path / "base")
    base_trainer.train()

    callback = ActPatchCallback(dropouts=True, include=["*dropout"])
    model = tiny_bert(dropout=0.1)
    trainer = trainer_for(model, tmp_path / "bits", callbacks=[callback])
    trainer.train()
    kinds = {s.kind for s in callback.report.patched_sites}
    assert kinds == {"dropout"} and len(callback.report.patched_sites) == 5
    assert losses(trainer) == losses(base_trainer)
    base_state = base.state_dict()
    assert all(torch.equal(v, base_state[k]) for k, v in model.state_dict().items())


# -- PEFT LoRA ----------------------------------------------------------------------------------------


def _lora_grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=x, labels=x).loss.backward()
    return grads(model)


def test_peft_lora_gradients_unchanged_and_frozen_consumers_reported():
    peft = pytest.importorskip("peft")
    x = batch()

    # LoRA on the MLP's output projection: that Linear's LoRA branch saves the activation output.
    model = peft.get_peft_model(
        tiny_bert(0.0),
        peft.LoraConfig(r=4, init_lora_weights=False, target_modules=["query", "value", "output.dense"]),
    )
    ref = _lora_grads(model, x)
    assert all("lora_" in n for n in ref)
    report = actpatch.patch_model(model, batch_size=4, seq_len=16)
    mlp = [s for s in report.sites if ".intermediate." in s.path]
    assert mlp and all(s.patched for s in mlp), [(s.path, s.reason) for s in mlp]
    assert_grads_close(ref, _lora_grads(model, x))

    # LoRA on attention only: the MLP's output Linear is frozen and saves no input; inverting would only
    # add the branch bits, so those sites are left alone and the report says why.
    model = peft.get_peft_model(
        tiny_bert(0.0), peft.LoraConfig(r=4, init_lora_weights=False, target_modules=["query", "value"])
    )
    ref = _lora_grads(model, x)
    report = actpatch.patch_model(model, batch_size=4, seq_len=16)
    mlp = [s for s in report.sites if ".intermediate." in s.path]
    assert mlp and not any(s.patched for s in mlp), [(s.path, s.reason) for s in mlp]
    assert all(s.reason for s in mlp)
    assert_grads_close(ref, _lora_grads(model, x))


def test_peft_lora_on_a_gated_mlp_is_fused_and_gradients_unchanged():
    """LoRA on gate/up/down: the wrapped projections are still what the MLP's forward calls, so the MLP
    is fused; the product op keeps what the LoRA branches need (their inputs are x and the product)."""
    peft = pytest.importorskip("peft")
    x = batch()
    model = peft.get_peft_model(
        tiny_llama(),
        peft.LoraConfig(r=4, init_lora_weights=False, target_modules=["gate_proj", "up_proj", "down_proj"]),
    )
    ref = _lora_grads(model, x)
    report = actpatch.patch_model(model, batch_size=4, seq_len=16, gated=True)
    fused = [s.path for s in report.patched_sites if s.kind == "gated"]
    assert fused == [f"base_model.model.model.layers.{i}.mlp" for i in range(2)], report
    assert_grads_close(ref, _lora_grads(model, x))


# -- gradient checkpointing and torch.compile --------------------------------------------------------


def _llama_grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=x, labels=x).loss.backward()
    return grads(model)


def test_gradient_checkpointing_gradients_match_and_projection_accounts_for_it():
    x = batch()
    model = tiny_llama()
    model.train()
    ref = _llama_grads(model, x)
    plain = actpatch.analyze(model, batch_size=4, seq_len=16)
    assert plain.projection.saved_bytes > 0

    checkpointing(model, True)
    ckpt = actpatch.analyze(model, batch_size=4, seq_len=16)
    layer_sites = [s for s in ckpt.sites if ".layers." in s.path]
    assert layer_sites and not any(s.patched for s in layer_sites)
    assert ckpt.projection.saved_bytes < plain.projection.saved_bytes
    if hasattr(model, "activation_checkpointing_enable"):  # every other layer checkpointed
        checkpointing(model, False)
        checkpointing(model, True, every_n_layers=2)
        half = actpatch.analyze(model, batch_size=4, seq_len=16)
        layer1 = {f"model.layers.1.{p}" for p in ("mlp", "input_layernorm", "post_attention_layernorm")}
        assert {s.path for s in half.sites if s.patched} == layer1 | {"model.norm"}, str(half)
        assert ckpt.projection.saved_bytes < half.projection.saved_bytes < plain.projection.saved_bytes

    # Patched first, then checkpointed: the recomputation runs the inverted op again; gradients agree.
    checkpointing(model, False)
    actpatch.patch_model(model, batch_size=4, seq_len=16)
    checkpointing(model, True)
    assert patched_paths(model)
    assert_grads_close(ref, _llama_grads(model, x))


def test_torch_compile_patched_model_gradients_match():
    """Inductor (the default backend; ~40 s of compiling on 2 CPU cores): the custom ops stay one op each."""
    x = batch()
    model = tiny_llama()
    model.train()
    ref = _llama_grads(model, x)
    actpatch.patch_model(model, batch_size=4, seq_len=16)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    got = _llama_grads(compiled, x)
    assert_grads_close(ref, {k.removeprefix("_orig_mod."): v for k, v in got.items()})


# -- accelerate: 2 processes, DDP over gloo -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_process_ddp_smoke(tmp_path):
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
        str(ROOT / "examples" / "ddp_accelerate.py"),
        "--steps", "3", "--tiny", "--json", str(tmp_path / "r.json"),
    ]  # fmt: skip
    # Loopback only: gloo then needs no hostname resolution or network interface.
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "GLOO_SOCKET_IFNAME": "lo",
        "TOKENIZERS_PARALLELISM": "false",
    }
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired as e:
        parts = (
            x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr)
        )
        out = "".join(parts)
        pytest.fail(f"accelerate launch did not finish in 240 s:\n{out[-6000:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["world_size"] == 2
    assert result["distributed_type"] == "MULTI_CPU"
    assert result["wrapped"] == "DistributedDataParallel"
    assert result["patched_sites"] > 0
    assert result["params_equal_across_ranks"] is True
    assert result["ranks_saw_different_data"] is True
    assert len(result["losses"]) == 3 and all(map(lambda v: v == v, result["losses"]))


# -- accelerate's device_map hooks ---------------------------------------------------------------------


def _dispatched(model: nn.Module) -> nn.Module:
    """``model`` under accelerate's hooks as ``from_pretrained(device_map=...)`` leaves it, one block per
    entry (forced on one CPU here; tests/test_patching.py spreads it over two GPUs)."""
    from accelerate import dispatch_model

    return dispatch_model(model, device_map=dict.fromkeys(LLAMA_BLOCKS, "cpu"), force_hooks=True)


def test_accelerate_device_map_hooks_keep_working_and_come_back():
    """Patched behind accelerate's hooks: each hooked MLP and norm keeps its hook (the instance
    ``forward``) and gets the fused product in the ``_old_forward`` it calls; unpatch_model puts the
    hooked originals back.  Hooks added after patching are left working by unpatch_model too."""
    x = batch()
    ref = _llama_grads(tiny_llama(), x)
    model = _dispatched(tiny_llama())
    hooked = [model.model.layers[0].mlp, model.model.layers[1].post_attention_layernorm, model.model.norm]
    before = [(m.__dict__["forward"], m._old_forward) for m in hooked]
    report = actpatch.patch_model(model, batch_size=4, seq_len=16)
    assert {"model.layers.0.mlp", "model.layers.1.mlp", "model.norm"} <= {
        s.path for s in report.patched_sites
    }
    for m, (hook, original) in zip(hooked, before, strict=True):
        assert m.__dict__["forward"] is hook and m._old_forward != original
    assert_grads_close(ref, _llama_grads(model, x))
    actpatch.unpatch_model(model)
    assert [(m.__dict__["forward"], m._old_forward) for m in hooked] == before
    assert_grads_close(ref, _llama_grads(model, x), inverted_ran=False)

    later = tiny_llama()
    actpatch.patch_model(later, batch_size=4, seq_len=16)
    later = _dispatched(later)
    assert_grads_close(ref, _llama_grads(later, x))
    actpatch.unpatch_model(later)
    assert later.model.norm._old_forward.__func__ is type(later.model.norm).forward
    assert_grads_close(ref, _llama_grads(later, x), inverted_ran=False)


# -- FSDP2 (torch fully_shard), one CPU process over gloo --------------------------------------------


def test_fsdp2_fully_shard_then_patch_gradients_match():
    """The sharded model (FSDPLlamaForCausalLM, DTensor parameters) is patched after sharding, as
    ActPatchCallback does inside a Trainer; gradients match the unsharded, unpatched model.  (accelerate
    does not shard on CPU; benchmarks/fsdp2_gpu.py runs accelerate's FSDP2 on a GPU.)"""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    x = batch()
    ref = _llama_grads(tiny_llama(), x)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = tiny_llama()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        assert type(model).__name__ == "FSDPLlamaForCausalLM"
        report = actpatch.patch_model(model, batch_size=4, seq_len=16)
        parts = ("mlp", "input_layernorm", "post_attention_layernorm")
        expected = {f"model.layers.{i}.{p}" for i in range(2) for p in parts} | {"model.norm"}
        assert {s.path for s in report.patched_sites} == expected
        # The probe's forward has no backward: every parameter is sharded again (a DTensor) after it.
        assert all(isinstance(p, DTensor) for p in model.parameters())
        model.zero_grad(set_to_none=True)
        model(input_ids=x, labels=x).loss.backward()
        got = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    finally:
        dist.destroy_process_group()
    assert_grads_close(ref, got)
