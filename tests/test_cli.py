"""The ``actpatch`` command line: the installed console script end to end, CliRunner for the rest."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import TINY_LLAMA
from typer.testing import CliRunner

from actpatch.cli import app

BIN = Path(sys.executable).with_name("actpatch")
SCRIPT = str(BIN) if BIN.exists() else shutil.which("actpatch")
ROOT = Path(__file__).resolve().parents[1]

SITE_KEYS = {"path", "activation", "consumer", "patched", "reason", "saved_bytes_per_token", "kind"}
PROJECTION_KEYS = {
    "batch_size",
    "seq_len",
    "dtype",
    "activation_bytes_before",
    "activation_bytes_after",
    "saved_bytes",
    "saved_fraction",
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache: nothing to find offline
    monkeypatch.setenv("COLUMNS", "200")


def script_env() -> dict[str, str]:
    """os.environ, with this checkout first on the path: the console script may belong to another one."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def actpatch_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert SCRIPT, "the actpatch console script is not installed"
    return subprocess.run(
        [SCRIPT, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=script_env()
    )


def _config_dir(tmp_path: Path, config: dict | str, name: str = "model") -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return d


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("actpatch: error: ") and fragment in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


# --- the console script, end to end ------------------------------------------------------------


def test_models_lists_the_builtins():
    proc = actpatch_cli("models", "--json")
    assert proc.returncode == 0, proc.stderr
    ids = {row["id"] for row in json.loads(proc.stdout)}
    assert {"gpt2", "meta-llama/Llama-3.1-8B", "mistralai/Mixtral-8x7B-v0.1", "EleutherAI/pythia-1b"} <= ids


@pytest.mark.parametrize("default", [True, False], ids=["default", "activations-only"])
def test_llama_8b_dry_run_figure(default):
    """Offline, bf16, seq 4096.  By default each layer's gated MLP is fused (gate and act(gate) freed, two
    bit masks added) and its two RMSNorms (and the final one) keep their output, saved by the next Linear
    anyway, and 1/rms (the float32 copy and the bf16 product freed; 1/rms kept as eager keeps it); with
    --no-gated --no-norms, the SiLU alone: one [tokens x 14336] tensor less its bit mask."""
    args = ("convert", "meta-llama/Llama-3.1-8B", "--dry-run", "--batch-size", "1", "--seq-len", "4096")
    start = time.perf_counter()
    proc = actpatch_cli(
        *args, "--dtype", "bfloat16", "--json", *(() if default else ("--no-gated", "--no-norms"))
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)  # nothing but JSON on stdout
    assert report["model"] == "meta-llama/Llama-3.1-8B" and report["dry_run"] is True
    assert all(set(s) >= SITE_KEYS for s in report["sites"])
    patched = [s for s in report["sites"] if s["patched"]]
    tokens, width, hidden = 4096, 14336, 4096
    silu = tokens * width * 2 - tokens * width // 8
    if default:
        layer = ["mlp", "input_layernorm", "post_attention_layernorm"]
        expected = [f"model.layers.{i}.{p}" for i in range(32) for p in layer] + ["model.norm"]
        saved = 32 * 2 * silu + 65 * tokens * hidden * 6
    else:
        expected, saved = [f"model.layers.{i}.mlp.act_fn" for i in range(32)], 32 * silu
    assert [s["path"] for s in patched] == expected
    p = report["projection"]
    assert set(p) >= PROJECTION_KEYS
    assert (p["batch_size"], p["seq_len"], p["dtype"]) == (1, 4096, "bfloat16")
    assert p["saved_bytes"] == saved == p["activation_bytes_before"] - p["activation_bytes_after"]
    assert p["saved_fraction"] == pytest.approx(p["saved_bytes"] / p["activation_bytes_before"])
    assert elapsed < 60
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 2 * 1024 * 1024  # KiB


def test_human_output_has_table_and_summary():
    proc = actpatch_cli("convert", "gpt2", "--dry-run", "--seq-len", "1024")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "transformer.h.{0..11}.mlp.act" in out and "module path" in out and "B/token" in out
    assert (
        "37 of 37 sites patched" in out and "activations  12 sites" in out and "norms        25 sites" in out
    )
    assert "transformer.h.{0..11}.ln_1     layer_norm (y)" in out and "(y) keeps its output" in out
    assert "activation memory:" in out and "->" in out and "%" in out and "batch 1 × seq 1024, float32" in out


def test_verify_and_output_on_a_tiny_local_model(tmp_path):
    model_dir = _config_dir(tmp_path, TINY_LLAMA)
    out = tmp_path / "patched"
    proc = actpatch_cli(
        "convert", str(model_dir), "--verify", "--output", str(out), "--random-init", "--json"
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    check = report["verify"]
    assert check["ok"] and check["output_max_abs_diff"] == 0.0
    assert 0 < check["grad_rel"] < 1e-3  # the backward is approximated, not skipped
    assert report["output"] == str(out)
    recorded = json.loads((out / "actpatch_manifest.json").read_text())
    assert [s["path"] for s in recorded["sites"]] == [s["path"] for s in report["sites"] if s["patched"]]
    assert (out / "model.safetensors").is_file()
    ours = [line for line in proc.stderr.splitlines() if line.startswith(("note:", "error:", "Traceback"))]
    assert ours == [f"note: {model_dir}: no weights found; randomly initialised from its config"]

    import actpatch

    loaded = actpatch.load_patched(out)
    assert {"activation", "gated", "norm"} >= {s["kind"] for s in recorded["sites"]} >= {"gated", "norm"}
    assert set(actpatch.patching.patched_modules(loaded)) == {s["path"] for s in recorded["sites"]}


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["convert", "./no/such/model", "--dry-run"], 2, "no such file or directory"),
        (["convert", "nobody/not-a-model-id", "--dry-run"], 2, "unknown model"),
        (["convert", "gpt2", "--dtype", "int8"], 2, "--dtype"),
        (["convert", "gpt2", "--dry-run", "--output", "x"], 2, "--dry-run"),
    ],
)
def test_usage_errors(args, code, fragment):
    _assert_one_line_error(actpatch_cli(*args), code, fragment)


def test_unreachable_hub_is_one_line(tmp_path):
    """HF_HUB_OFFLINE unset, a Hub that refuses connections at once: huggingface_hub's retries and
    warnings stay quiet; the error is the one line."""
    env = {k: v for k, v in script_env().items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    proc = subprocess.run(
        [SCRIPT, "convert", "nobody/not-a-builtin-model", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    _assert_one_line_error(proc, 2, "nobody/not-a-builtin-model")


def test_invalid_json_config_fails_with_one_line(tmp_path):
    d = _config_dir(tmp_path, '{"model_type": "llama",')
    _assert_one_line_error(actpatch_cli("convert", str(d), "--dry-run"), 1, "not valid JSON")


def test_debug_shows_the_traceback(tmp_path):
    d = _config_dir(tmp_path, '{"model_type": "llama",')
    proc = actpatch_cli("convert", str(d), "--dry-run", "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("actpatch: error: ")


# Runs the CLI with a save_pretrained that writes a file, then waits to be signalled.
_SLOW_SAVE = """
import sys, time
from pathlib import Path
from transformers import PreTrainedModel
from actpatch.cli import main

def slow_save(self, directory, **kwargs):
    (Path(directory) / "model.safetensors").write_bytes(b"half")
    time.sleep(120)

PreTrainedModel.save_pretrained = slow_save
main(sys.argv[1:])
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_terminated_while_saving_leaves_nothing(tmp_path, signum):
    model_dir = _config_dir(tmp_path, TINY_LLAMA)
    out = tmp_path / "out"
    args = ["convert", str(model_dir), "--output", str(out), "--random-init"]
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_SAVE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=script_env(),
    )
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".out.actpatch-partial-*/model.safetensors")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, stderr
    assert stderr.strip().splitlines()[-1] == f"actpatch: error: terminated ({signal.Signals(signum).name})"
    assert {p.name for p in tmp_path.iterdir()} - {"hf-home"} == {"model"}  # no partial directory left


def test_signal_handlers_are_restored_after_a_command():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}
    assert invoke("models", "--json").exit_code == 0
    assert {s: signal.getsignal(s) for s in before} == before


def test_unwritable_output_leaves_nothing(tmp_path):
    model_dir = _config_dir(tmp_path, TINY_LLAMA)
    (tmp_path / "file").write_text("")
    proc = actpatch_cli("convert", str(model_dir), "--output", str(tmp_path / "file" / "out"))
    _assert_one_line_error(proc, 1, "not a directory")
    assert {p.name for p in tmp_path.iterdir()} - {"hf-home"} == {"file", "model"}
    assert (tmp_path / "file").read_text() == ""


# --- CliRunner -----------------------------------------------------------------------------------

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_include_and_exclude_patterns():
    all_sites = _json(invoke("convert", "gpt2", "--dry-run", "--json"))
    assert sum(s["patched"] for s in all_sites["sites"]) == 12 * 3 + 1  # GELU, ln_1, ln_2; ln_f
    only = _json(invoke("convert", "gpt2", "--dry-run", "--json", "--include", "transformer.h.1.*"))
    block = {f"transformer.h.1.{name}" for name in ("mlp.act", "ln_1", "ln_2")}
    assert {s["path"] for s in only["sites"] if s["patched"]} == block
    some = _json(
        invoke("convert", "gpt2", "--dry-run", "--json", "--exclude", "transformer.h.1*,transformer.h.2.*")
    )
    patched = {s["path"] for s in some["sites"] if s["patched"]}
    assert len(patched) == 37 - 4 * 3 and "transformer.h.10.mlp.act" not in patched
    skipped = [s for s in some["sites"] if not s["patched"]]
    assert skipped and all(s["reason"] for s in skipped)
    assert some["projection"]["saved_bytes"] < all_sites["projection"]["saved_bytes"]


def test_dropouts_flag_adds_the_dropout_sites():
    """``--dropouts``: GPT-2's 25 dropouts (embeddings, two per block) keep their masks as bits, each
    freeing 7/8 of a 1-byte mask per element (768 x 7/8 = 672 bytes per token)."""
    plain = _json(invoke("convert", "gpt2", "--dry-run", "--json", "--dtype", "bfloat16"))
    both = _json(invoke("convert", "gpt2", "--dry-run", "--json", "--dtype", "bfloat16", "--dropouts"))
    dropout_sites = [s for s in both["sites"] if s["kind"] == "dropout"]
    assert not any(s["kind"] == "dropout" for s in plain["sites"])
    assert len(dropout_sites) == 25 and {s["saved_bytes_per_token"] for s in dropout_sites} == {672}
    assert both["projection"]["activation_bytes_before"] == plain["projection"]["activation_bytes_before"]
    extra = both["projection"]["saved_bytes"] - plain["projection"]["saved_bytes"]
    assert extra == pytest.approx(25 * 672 * 512, rel=1e-3)


def test_projection_scales_with_the_shape():
    small = _json(invoke("convert", "gpt2", "--dry-run", "--json", "--seq-len", "128"))["projection"]
    big = _json(invoke("convert", "gpt2", "--dry-run", "--json", "--seq-len", "256", "--batch-size", "2"))[
        "projection"
    ]
    half = _json(invoke("convert", "gpt2", "--dry-run", "--json", "--seq-len", "128", "--dtype", "bfloat16"))
    assert big["saved_bytes"] == 4 * small["saved_bytes"]
    assert (
        half["projection"]["dtype"] == "bfloat16" and half["projection"]["saved_bytes"] < small["saved_bytes"]
    )


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({**TINY_LLAMA, "hidden_size": "big"}, "hidden_size"),
        ({"model_type": "not-a-transformers-type"}, "not known to transformers"),
    ],
)
def test_bad_configs_exit_1(tmp_path, config, fragment):
    result = invoke("convert", str(_config_dir(tmp_path, config)), "--dry-run")
    assert result.exit_code == 1
    assert result.stderr.startswith("actpatch: error: ") and fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_existing_output_is_a_usage_error(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("")
    result = invoke("convert", str(_config_dir(tmp_path, TINY_LLAMA)), "--output", str(tmp_path / "out"))
    assert result.exit_code == 2 and "not an empty directory" in result.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep"]


def _weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def test_config_file_path_loads_the_weights_beside_it(tmp_path):
    """MODEL as DIR/config.json stands for DIR: its weights are loaded and saved, not random ones."""
    from actpatch.loading import load_model

    model_dir = _config_dir(tmp_path, TINY_LLAMA)
    load_model(str(model_dir)).model.save_pretrained(model_dir)
    out = tmp_path / "out"
    result = invoke("convert", str(model_dir / "config.json"), "--output", str(out), "--json")
    assert _json(result)["output"] == str(out) and "no weights found" not in result.stderr
    original, saved = _weights(model_dir), _weights(out)
    assert original.keys() == saved.keys() and all(original[k].equal(saved[k]) for k in original)


def test_output_without_weights_needs_random_init(tmp_path):
    model_dir = _config_dir(tmp_path, TINY_LLAMA)
    out = tmp_path / "out"
    refused = invoke("convert", str(model_dir / "config.json"), "--output", str(out))
    assert refused.exit_code == 2 and refused.stdout == "" and not out.exists()
    assert refused.stderr.startswith("actpatch: error: ") and "--random-init" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert invoke("convert", str(model_dir), "--dry-run").exit_code == 0  # dry runs need no weights
    assert invoke("convert", str(model_dir), "--output", str(out), "--random-init").exit_code == 0
    assert (out / "model.safetensors").is_file()


def test_output_to_a_mount_point_is_refused_before_loading(tmp_path, monkeypatch):
    mount = tmp_path / "mnt"
    mount.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == mount)
    result = invoke("convert", str(tmp_path / "nothing-here"), "--output", str(mount))
    assert result.exit_code == 2 and "mount point" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_failing_save_leaves_no_directory(tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def failing_save(self, directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", failing_save)
    model_dir = _config_dir(tmp_path, TINY_LLAMA)
    result = invoke("convert", str(model_dir), "--output", str(tmp_path / "new" / "out"), "--random-init")
    assert result.exit_code == 1 and "No space left on device" in result.stderr
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.rglob("*") if "actpatch-partial" in p.name]


def test_verify_failure_exits_1_and_saves_nothing(tmp_path, monkeypatch):
    from actpatch.cli import verify as verify_mod

    real = verify_mod.verify

    def pessimist(model, patch, **kw):
        result, patched = real(model, patch, **kw)
        result.grad_rel = float("nan")
        return result, patched

    monkeypatch.setattr(verify_mod, "verify", pessimist)
    model_dir = _config_dir(tmp_path, TINY_LLAMA)
    result = invoke("convert", str(model_dir), "--verify", "--output", str(tmp_path / "out"), "--random-init")
    assert result.exit_code == 1 and "beyond tolerance" in result.stderr and "FAILED" in result.stdout
    assert not (tmp_path / "out").exists()


def test_default_t5_config_converts_and_verifies(tmp_path):
    """A T5 config.json without decoder_start_token_id (T5Config's default has none): the probe's and
    --verify's batches carry their own decoder ids."""
    config = {"model_type": "t5", "num_layers": 1, "num_heads": 2, "d_model": 16, "d_kv": 8, "d_ff": 32}
    result = invoke("convert", str(_config_dir(tmp_path, config)), "--verify", "--seq-len", "16", "--json")
    report = _json(result)
    assert report["verify"]["ok"] and any(s["patched"] for s in report["sites"])


def test_models_table():
    result = invoke("models")
    assert result.exit_code == 0 and "meta-llama/Llama-3.1-70B" in result.stdout and "28672" in result.stdout


def test_render_of_a_hand_built_report():
    from types import SimpleNamespace as NS

    from rich.console import Console

    from actpatch.cli import render

    report = NS(
        model="m",
        dry_run=True,
        sites=[
            NS(
                path="a.act",
                activation="silu",
                consumer="mul",
                patched=True,
                reason="",
                saved_bytes_per_token=26880,
                kind="activation",
                keeps="",
            ),
            NS(
                path="b.act",
                activation="gelu",
                consumer="dropout",
                patched=False,
                reason="dropout",
                saved_bytes_per_token=0,
                kind="activation",
                keeps="",
            ),
        ],
        projection=NS(
            batch_size=1,
            seq_len=8,
            dtype="bfloat16",
            activation_bytes_before=2048,
            activation_bytes_after=1024,
            saved_bytes=1024,
            saved_fraction=0.5,
        ),
    )
    console = Console(record=True, width=200)
    render.render_report(console, report)
    text = console.export_text()
    assert "1 × 26,880" in text and "b.act: dropout" in text and "1 of 2 sites patched" in text
    assert "2.00 KiB -> 1.00 KiB" in text and "50.0%" in text
    assert render.format_bytes(3 * 1024**3) == "3.00 GiB" and render.format_bytes(12) == "12 B"


def test_all_sites_prints_every_site():
    grouped = invoke("convert", "gpt2", "--dry-run", "--seq-len", "16")
    every = invoke("convert", "gpt2", "--dry-run", "--seq-len", "16", "--all-sites")
    assert grouped.exit_code == every.exit_code == 0
    assert (
        "transformer.h.{0..11}.mlp.act" in grouped.stdout and "transformer.h.3.mlp.act" not in grouped.stdout
    )
    assert all(f"transformer.h.{i}.mlp.act " in every.stdout for i in range(12))


@pytest.mark.parametrize(
    ("model", "dtype"),
    [("Qwen/Qwen2.5-7B", "bfloat16"), ("meta-llama/Llama-3.1-8B", "bfloat16"), ("gpt2", "float32")],
)
def test_dtype_defaults_to_the_configs(model, dtype):
    """Without --dtype, the dry run projects the dtype transformers 5 loads the checkpoint in."""
    report = _json(invoke("convert", model, "--dry-run", "--seq-len", "16", "--json"))
    assert report["projection"]["dtype"] == dtype
    shown = invoke("convert", model, "--dry-run", "--seq-len", "16")
    assert f"batch 1 × seq 16, {dtype}" in shown.stdout
    forced = _json(invoke("convert", model, "--dry-run", "--seq-len", "16", "--json", "--dtype", "float16"))
    assert forced["projection"]["dtype"] == "float16"


def test_config_dtype():
    from actpatch import loading

    assert loading.config_dtype(loading.load_config("Qwen/Qwen2.5-7B")) == torch.bfloat16
    assert loading.config_dtype(loading.load_config("gpt2")) == torch.float32
    assert loading.config_dtype(SimpleNamespace(torch_dtype="float16")) == torch.float16  # transformers 4
    assert loading.config_dtype(SimpleNamespace(dtype="auto")) == torch.float32


class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    ("json_output", "tty", "shown"), [(False, True, True), (True, True, False), (False, False, False)]
)
def test_spinner_only_on_a_terminal_without_json(json_output, tty, shown):
    from actpatch.cli.app import show_progress

    assert show_progress(json_output, _Stream(tty)) is shown


@pytest.mark.parametrize("json_output", [False, True])
def test_spinner_on_a_real_terminal(json_output):
    """stderr a pty: the spinner's "Loading ..." is drawn there, unless --json."""
    import pty

    leader, follower = pty.openpty()
    args = [SCRIPT, "convert", "gpt2", "--dry-run", "--seq-len", "16", *(["--json"] if json_output else [])]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=follower, env=script_env())
    os.close(follower)
    drawn = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        drawn += chunk
    proc.communicate(timeout=120)
    os.close(leader)
    assert proc.returncode == 0
    assert (b"Loading config" in drawn) is not json_output


def test_models_ids_are_whole_at_80_columns():
    from actpatch import configs

    result = runner.invoke(app, ["models"], env={"COLUMNS": "80"})
    assert result.exit_code == 0 and "…" not in result.stdout
    assert all(len(line) <= 80 for line in result.stdout.splitlines())
    ids = [line.split()[0] for line in result.stdout.splitlines() if line.split()]
    assert {configs.describe(n)["id"] for n in configs.available()} <= set(ids)
