"""``actpatch convert --dry-run --gpu-memory``: the fit table, the JSON ``fit`` object, the plot and the bad
inputs (exit 2, one line, no traceback, nothing written)."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_LLAMA

from actpatch.cli import main
from actpatch.fit import ASSUMPTIONS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("tiny") / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY_LLAMA))
    return str(d)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(["convert", *args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_json_fit_object_keeps_its_contract(capsys, model_dir) -> None:
    code, out, _ = run(capsys, model_dir, "--dry-run", "--gpu-memory", "1.2", "--seq-len", "32", "--json")
    assert code == 0
    f = json.loads(out)["fit"]
    assert f["gpu_memory_bytes"] == round(1.2 * (1 << 30)) and f["optimizer"] == "adamw"
    for side in ("before", "after"):
        best, per = f[f"max_batch_size_{side}"], f[f"activation_bytes_per_sample_{side}"]
        assert best > 0 and f["static_bytes"] + best * per <= f["gpu_memory_bytes"]
        assert f["static_bytes"] + (best + 1) * per > f["gpu_memory_bytes"]
    assert f["max_batch_size_after"] >= f["max_batch_size_before"] and f["assumptions"] == ASSUMPTIONS


def test_table_verdict_and_assumptions_line(capsys, model_dir) -> None:
    code, out, _ = run(capsys, model_dir, "--dry-run", "--gpu-memory", "1.2", "--optimizer", "sgd")
    assert code == 0
    assert "Training memory on a 1.20 GiB GPU (SGD (momentum), float32, seq 512)" in out
    assert "largest batch at seq 512" in out and "fits: largest batch" in out
    assert "assumes: weights, gradients and optimizer states" in out


def test_longest_sequence_with_a_batch_and_no_seq_len(capsys, model_dir) -> None:
    code, out, _ = run(capsys, model_dir, "--dry-run", "--gpu-memory", "1.2", "--batch-size", "2", "--json")
    f = json.loads(out)["fit"]
    assert code == 0 and f["mode"] == "seq" and f["batch_size"] == 2 and f["max_seq_len_after"] > 0


def test_lora_counts_adapters_as_the_trainable_part(capsys, model_dir) -> None:
    code, out, _ = run(capsys, model_dir, "--dry-run", "--gpu-memory", "2", "--lora-rank", "4", "--json")
    data = json.loads(out)
    f = data["fit"]
    assert code == 0 and f["lora_rank"] == 4 and 0 < f["trainable_parameters"] < f["parameters"]
    assert f["gradient_bytes"] == 4 * f["trainable_parameters"]
    assert any("base_model" in s["path"] for s in data["sites"])  # the probe saw the LoRA model


def test_does_not_fit_even_at_batch_1_says_by_how_much(capsys, model_dir) -> None:
    code, out, err = run(capsys, model_dir, "--dry-run", "--gpu-memory", "0.5")
    assert code == 0 and not err.strip()
    line = next(line for line in out.splitlines() if line.startswith("does not fit"))
    assert "does not fit even at batch 1, patched: needs 1." in line
    assert "more than the 512.00 MiB GPU" in line


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot_is_written(capsys, model_dir, tmp_path: Path, suffix: str) -> None:
    target = tmp_path / f"fit{suffix}"
    code, _, _ = run(capsys, model_dir, "--dry-run", "--gpu-memory", "1.2", "--plot", str(target))
    assert code == 0 and target.stat().st_size > 1000 and list(tmp_path.iterdir()) == [target]


def test_missing_matplotlib_names_the_extra(capsys, model_dir, tmp_path: Path, monkeypatch) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    target = tmp_path / "fit.png"
    code, out, err = run(capsys, model_dir, "--dry-run", "--gpu-memory", "8", "--plot", str(target))
    assert code == 2 and not out and err.count("\n") == 1 and "pip install 'actpatch[plot]'" in err
    assert not target.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpu-memory", "0"], "--gpu-memory must be a positive number of GiB"),
        (["--gpu-memory", "-3"], "--gpu-memory must be a positive number of GiB"),
        (["--gpu-memory", "nan"], "--gpu-memory must be a positive number of GiB"),
        (["--gpu-memory", "lots"], "Invalid value for '--gpu-memory'"),
        (["--gpu-memory", "8", "--lora-rank", "0"], "--lora-rank"),
        (["--gpu-memory", "8", "--optimizer", "adam"], "Invalid value for '--optimizer'"),
        (["--gpu-memory", "8", "--plot", "{tmp}/fit.jpg"], "unknown extension '.jpg'; use .png or .svg"),
        (["--gpu-memory", "8", "--plot", "{tmp}/no/such/dir/fit.png"], "cannot write there"),
        (["--lora-rank", "4"], "need --gpu-memory"),
        (["--mixed-precision"], "--mixed-precision and --loss need --gpu-memory"),
        (["--loss", "fused"], "--mixed-precision and --loss need --gpu-memory"),
        (["--gpu-memory", "8", "--loss", "chunked"], "Invalid value for '--loss'"),
        (["--gpu-memory", "8", "--mixed-precision", "--dtype", "bfloat16"], "keeps float32 weights"),
    ],
)
def test_bad_input_exits_2_in_one_line(capsys, model_dir, tmp_path: Path, args: list, message: str) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, out, err = run(capsys, model_dir, "--dry-run", *args)
    assert code == 2 and not out and err.count("\n") == 1 and "Traceback" not in err
    assert message in err and err.startswith("actpatch: error: ")
    assert list(tmp_path.iterdir()) == []


def test_gpu_memory_needs_dry_run(capsys, model_dir) -> None:
    code, _, err = run(capsys, model_dir, "--gpu-memory", "8")
    assert code == 2 and "use it with --dry-run" in err and err.count("\n") == 1


def test_mixed_precision_counts_float32_weights_and_probes_under_autocast(capsys, tmp_path: Path) -> None:
    """A bf16 config: 2 bytes a parameter without --mixed-precision, 4 with it (the master weights), and
    the probe sees autocast's casts (the bf16 copies of the weights, the float32 residual stream)."""
    d = tmp_path / "bf16"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**TINY_LLAMA, "torch_dtype": "bfloat16"}))
    common = [str(d), "--dry-run", "--gpu-memory", "2", "--seq-len", "32", "--json"]
    code, out, _ = run(capsys, *common, "--optimizer", "adamw-fused")
    plain = json.loads(out)["fit"]
    code_mixed, out, _ = run(capsys, *common, "--mixed-precision", "--optimizer", "adamw-fused")
    mixed = json.loads(out)["fit"]
    assert code == code_mixed == 0 and (plain["precision"], mixed["precision"]) == ("model", "mixed")
    n = mixed["parameters"]
    assert plain["gradient_bytes"] == 2 * n and mixed["gradient_bytes"] == 4 * n
    assert mixed["optimizer_bytes"] == 8 * n and mixed["optimizer_step_bytes"] == 0
    assert mixed["activation_bytes_per_sample_before"] > plain["activation_bytes_per_sample_before"]
    assert "under bf16 autocast" in mixed["assumptions"]


def test_fused_loss_keeps_no_logits(capsys, model_dir) -> None:
    common = [model_dir, "--dry-run", "--gpu-memory", "2", "--seq-len", "32", "--mixed-precision", "--json"]
    code, out, _ = run(capsys, *common)
    eager = json.loads(out)["fit"]
    code_fused, out, _ = run(capsys, *common, "--loss", "fused")
    fused = json.loads(out)["fit"]
    assert code == code_fused == 0 and (eager["loss"], fused["loss"]) == ("eager", "fused")
    assert eager["loss_bytes_per_sample"] == 8 * 32 * TINY_LLAMA["vocab_size"]
    # its float32 input, and chunks of pow2(⌈b·32 / ⌈128/32⌉⌉) rows of bf16 logits: 16 at batch 2, 32 at 3
    assert fused["loss_bytes_per_sample"] == 32 * TINY_LLAMA["hidden_size"] * 4 + (32 - 16) * 128 * 2
    logits = 4 * 32 * TINY_LLAMA["vocab_size"]  # the float32 log-probabilities, no longer saved
    assert fused["activation_bytes_per_sample_before"] < eager["activation_bytes_per_sample_before"] - logits


def test_fused_loss_needs_a_language_modelling_head() -> None:
    from actpatch.cli.fit_command import TrainingRequest

    request = TrainingRequest.checked(8.0, "adamw", None, None, True, RuntimeError, loss="fused")
    with pytest.raises(RuntimeError, match="--loss fused needs a model with a language-modelling head"):
        request.probing(torch.nn.Linear(2, 2))
