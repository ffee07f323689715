"""actpatch.fit: the training-memory model, the largest batch / longest sequence, and the GPU benchmark's
CPU mode (tiny configs through the same code path, checked against the real tensors)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

import actpatch
from actpatch import fit, measure

ROOT = Path(__file__).resolve().parents[1]
SEQ = 16


def _memory(model: torch.nn.Module, optimizer: str = "adamw") -> fit.TrainingMemory:
    return fit.training_memory(model, actpatch.analyze(model, batch_size=2, seq_len=SEQ), optimizer)


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def memory(llama: torch.nn.Module) -> fit.TrainingMemory:
    return _memory(llama)


def test_projector_gives_the_projection_and_other_shapes(llama: torch.nn.Module) -> None:
    report = actpatch.analyze(llama, batch_size=2, seq_len=SEQ)
    before, freed = report.projector(2, SEQ)
    assert round(before) == report.projection.activation_bytes_before
    assert round(before) - round(freed) == report.projection.activation_bytes_after
    at_3 = actpatch.analyze(llama, batch_size=3, seq_len=2 * SEQ).projection
    assert round(report.projector(3, 2 * SEQ)[0]) == pytest.approx(at_3.activation_bytes_before, rel=1e-6)
    assert sum(report.projector.freed_by_kind(2, SEQ).values()) == pytest.approx(freed)


def test_weights_gradients_and_optimizer_states_are_counted_per_parameter(llama, memory) -> None:
    n = sum(p.numel() for p in llama.parameters())
    assert memory.parameters == memory.trainable == n
    assert memory.gradients == 4 * n  # float32
    assert memory.optimizer == 2 * 4 * n and memory.step == 4 * n
    assert memory.weights == 4 * n + sum(b.numel() * b.element_size() for b in llama.buffers())
    assert memory.vocab == llama.config.vocab_size
    assert _memory(llama, "sgd").optimizer == 4 * n and _memory(llama, "none").optimizer == 0
    eight = _memory(llama, "adamw-8bit").optimizer
    big = [p.numel() for p in llama.parameters() if p.numel() >= 4096]
    small = n - sum(big)
    assert eight == sum(2 * b + 8 * -(-b // 256) for b in big) + 8 * small


def test_unknown_optimizer_is_refused(llama) -> None:
    with pytest.raises(fit.FitError, match="unknown optimizer"):
        _memory(llama, "adam")


def test_lora_on_a_meta_model_trains_only_the_adapters() -> None:
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = tiny_model("llama")
    model = fit.with_lora(model, 4)
    memory = _memory(model)
    adapters = [p for n, p in model.named_parameters() if "lora_" in n]
    assert adapters and all(p.is_meta for p in adapters)
    assert memory.trainable == sum(p.numel() for p in adapters) < memory.parameters
    assert memory.gradients == 4 * memory.trainable and memory.optimizer == 8 * memory.trainable
    with pytest.raises(fit.FitError, match="rank"):
        fit.with_lora(model, 0)


def test_largest_batch_is_the_largest_under_static_plus_batch_times_per_sample(memory) -> None:
    gpu = (1 << 30) + (64 << 20)
    plan = fit.plan(memory, gpu, seq_len=SEQ)
    assert plan.mode == "batch" and plan.max_batch_size_after >= plan.max_batch_size_before > 0
    for best, per in (
        (plan.max_batch_size_before, plan.activation_bytes_per_sample_before),
        (plan.max_batch_size_after, plan.activation_bytes_per_sample_after),
    ):
        assert plan.static_bytes + best * per <= gpu < plan.static_bytes + (best + 1) * per
    assert plan.loss_bytes_per_sample == 8 * SEQ * memory.vocab
    assert plan.reserved_bytes == (1 << 30) + round(0.05 * gpu + 0.5)


def test_peak_is_the_larger_phase(memory) -> None:
    static = memory.weights + memory.optimizer
    assert memory.peak(1, 1, True) >= static + memory.gradients + memory.step
    big = memory.activations(512, SEQ, False) + memory.loss(512, SEQ)
    assert memory.peak(512, SEQ, False) == pytest.approx(static + big)


def test_nothing_fits_says_by_how_much(memory) -> None:
    plan = fit.plan(memory, 1 << 30, seq_len=SEQ)  # the reserve alone is 1 GiB + 5%
    assert plan.max_batch_size_after == plan.max_batch_size_before == 0
    need = plan.reserved_bytes + plan.peak_bytes_after
    assert plan.shortfall_bytes == pytest.approx(need - (1 << 30), abs=1)


def test_longest_sequence_at_a_batch(memory) -> None:
    gpu = round(((1 << 30) + memory.peak(2, 40, False)) / 0.95)  # room for about 40 positions before
    plan = fit.plan(memory, gpu, batch_size=2)
    assert plan.mode == "seq" and plan.max_batch_size_before is None
    for patched, best in ((False, plan.max_seq_len_before), (True, plan.max_seq_len_after)):
        need = lambda s, p=patched: fit.reserve(gpu) + memory.peak(2, s, p)
        assert 0 < best < memory.projector.max_seq and need(best) <= gpu < need(best + 1)
    assert plan.max_seq_len_after >= plan.max_seq_len_before


def test_batch_1_report_cannot_fit_batches(llama) -> None:
    memory = fit.training_memory(llama, actpatch.analyze(llama, batch_size=1, seq_len=SEQ))
    with pytest.raises(fit.FitError, match="batch_size >= 2"):
        fit.plan(memory, 2 << 30, seq_len=SEQ)


def _benchmark():
    spec = importlib.util.spec_from_file_location("fit_gpu", ROOT / "benchmarks" / "fit_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("name", "lora"), [("llama-tiny", False), ("gpt2-tiny", True)])
def test_gpu_benchmark_cpu_mode_matches_the_tensors(name: str, lora: bool) -> None:
    """benchmarks/fit_gpu.py --device cpu --tiny: a subprocess trains; weights, gradients, optimizer
    states and saved activations are what the memory model says."""
    bench = _benchmark()
    args = argparse.Namespace(device="cpu", tiny=True, quick=True, steps=1, allocator="default")
    row = bench.check(name, lora, True, args, bench.TINY_GPU_BYTES)
    assert row["trained"] and row["next_predicted_not_to_fit"]
    assert row["error"] == {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0, "activations": 0.0}
    assert "| yes | yes |" in bench.table([row])


def test_mixed_precision_counts_float32_master_weights_whatever_the_models_dtype(llama) -> None:
    half = tiny_model("llama").to(torch.bfloat16)
    report = actpatch.analyze(half, batch_size=2, seq_len=SEQ)
    n = sum(p.numel() for p in half.parameters())
    buffers = sum(b.numel() * b.element_size() for b in half.buffers())
    model = fit.training_memory(half, report)
    assert model.weights == 2 * n + buffers and model.gradients == 2 * n and model.optimizer == 4 * n
    mixed = fit.training_memory(half, report, "adamw-fused", precision="mixed")
    assert mixed.weights == 4 * n + buffers and mixed.gradients == 4 * n and mixed.optimizer == 8 * n
    assert mixed.step == 0 and fit.training_memory(half, report, precision="mixed").step == 4 * n


def test_unknown_precision_or_loss_is_refused(llama) -> None:
    report = actpatch.analyze(llama, batch_size=2, seq_len=SEQ)
    with pytest.raises(fit.FitError, match="unknown precision 'fp8': use one of model, mixed"):
        fit.training_memory(llama, report, precision="fp8")
    with pytest.raises(fit.FitError, match="unknown loss 'chunked': use one of eager, fused"):
        fit.training_memory(llama, report, loss="chunked")


def _saved_under_autocast(model: torch.nn.Module, batch: int, seq: int) -> list[torch.Tensor]:
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    saved: list[torch.Tensor] = []
    keep = lambda t: saved.append(t) or t
    with torch.autocast("cpu", torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(input_ids=ids, labels=ids)
    return saved


def test_eager_loss_under_autocast_saves_float32_log_probabilities(llama) -> None:
    """HF's loss upcasts autocast's bf16 logits to float32: the log-softmax saves a float32 [b·s, V]
    output (in A), so the backward's two logit gradients are float32 too (loss = 2·b·s·V·4)."""
    vocab = llama.config.vocab_size
    saved = _saved_under_autocast(llama, 3, SEQ)
    logits = [t for t in saved if t.shape == (3 * SEQ, vocab)]
    assert logits and {t.dtype for t in logits} == {torch.float32}
    memory = fit.training_memory(llama, actpatch.analyze(llama, batch_size=2, seq_len=SEQ), precision="mixed")
    assert memory.loss(3, SEQ) == 2 * 3 * SEQ * vocab * 4


def test_autocast_probe_holds_the_bf16_weight_copies_and_what_autograd_saves() -> None:
    """Under autocast the probe's A is what autograd saves at another shape, bf16 copies of the Linear
    weights included: before patching from analyze, after from running_activations on the patched model."""
    model = tiny_model("llama")
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    saved = {t.untyped_storage()._cdata: t for t in _saved_under_autocast(model, 2, SEQ)}
    copies = [
        t for t in saved.values() if t.dtype == torch.bfloat16 and t.dim() == 2 and t.numel() >= 32 * 32
    ]
    assert sum(t.untyped_storage().nbytes() for t in copies) >= 2 * linears  # each Linear's cast, once

    def measured(m: torch.nn.Module) -> int:
        ids = torch.randint(0, m.config.vocab_size, (4, 40))
        with torch.autocast("cpu", torch.bfloat16):
            n, out = measure.saved_bytes(m, {"input_ids": ids, "labels": ids})
        return n

    with torch.autocast("cpu", torch.bfloat16):
        before = actpatch.analyze(model, batch_size=2, seq_len=SEQ).projector(4, 40)[0]
        assert fit.running_activations(model, 2)(4, 40)[0] == pytest.approx(before)
        report = actpatch.patch_model(model, batch_size=2, seq_len=SEQ)
        running = fit.running_activations(model, 2)(4, 40)
    assert before == pytest.approx(measured(tiny_model("llama")), abs=1)
    assert running[0] == pytest.approx(measured(model), abs=1) and running[1] == 0
    assert running[0] == pytest.approx(before - report.projector(4, 40)[1], abs=1)


def test_fused_loss_head_holds_its_input_a_logit_chunk_and_two_bf16_weight_copies(llama, memory) -> None:
    """Tiny Llama: V = 96, H = 32; 2 x 16 tokens in chunks of pow2(⌈32 / ⌈96/32⌉⌉) = 16 rows."""
    v, h = llama.config.vocab_size, llama.config.hidden_size
    assert (v, h) == (96, 32)
    report = actpatch.analyze(llama, batch_size=2, seq_len=SEQ)
    mixed = fit.training_memory(llama, report, precision="mixed", loss="fused")
    assert mixed.loss(2, SEQ) == 32 * h * 4 + 16 * v * 2 + 2 * 2 * v * h
    half = fit.training_memory(llama.to(torch.bfloat16), report, loss="fused")
    llama.float()
    assert half.loss(2, SEQ) == 32 * h * 2 + 16 * v * 2  # no casts: the weights are bf16 already
    static = mixed.weights + mixed.optimizer
    big = mixed.activations(64, SEQ, True) + mixed.loss(64, SEQ)
    assert mixed.peak(64, SEQ, True) == pytest.approx(static + big)
    gpu = (1 << 30) + (64 << 20)
    plan = fit.plan(mixed, gpu, seq_len=SEQ)
    assert (
        plan.loss == "fused"
        and plan.precision == "mixed"
        and "fused linear cross entropy" in plan.assumptions
    )
    best, per = plan.max_batch_size_after, plan.activation_bytes_per_sample_after
    assert best > 0 and plan.static_bytes + best * per <= gpu < plan.static_bytes + (best + 1) * per
    assert plan.peak_bytes_after == round(mixed.peak(best, SEQ, True))


def test_whole_step_records_the_planners_peak_next_to_the_measured_one() -> None:
    """benchmarks/whole_step.py's hook, CPU and tiny: the report's and the running model's peaks agree for
    an eager model, the dry run's is there, and the ratios are to the measured peak."""
    spec = importlib.util.spec_from_file_location("whole_step", ROOT / "benchmarks" / "whole_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = bench.build("llama3.2-1b", True)
    planned = bench.planned_peaks("eager", "llama3.2-1b", model, 2, 32, "cpu", True)
    assert planned["report"] == pytest.approx(planned["running"]) and planned["dry_run"] > 0
    assert planned["loss_head"] == pytest.approx(8 * 2 * 32 * 1024 / 2**30)
    result = bench.with_prediction({"peak_gib": 2 * planned["report"]}, planned, {})
    assert result["ratio_report"] == pytest.approx(0.5) and result["predicted_gib"] is planned
