"""actpatch.manifest: atomic save of a patched model, and re-applying the patch after loading."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_LLAMA

import actpatch
from actpatch import manifest
from actpatch.loading import load_model
from actpatch.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    ManifestSite,
    OutputError,
    OutputExistsError,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tiny(tmp_path) -> torch.nn.Module:
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY_LLAMA))
    torch.manual_seed(0)
    return load_model(str(d)).model


def _patched_paths(report) -> set[str]:
    return {s.path for s in report.sites if s.patched}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if "actpatch-partial" in p.name]


def test_public_api_is_exported():
    assert actpatch.load_patched is manifest.load_patched
    assert actpatch.reapply is manifest.reapply
    assert actpatch.save_patched is manifest.save_patched


def test_manifest_round_trip(tmp_path):
    m = Manifest(
        sites=[ManifestSite("model.layers.0.mlp.act_fn", "silu", "actpatch.nn.InvertedSiLU")],
        model="x",
        include=["*.mlp.*"],
    )
    file = manifest.write_manifest(m, tmp_path)
    assert file.name == MANIFEST_NAME and "actpatch" in file.name
    data = json.loads(file.read_text())
    assert data["format"] == "actpatch-manifest" and data["version"] == 1
    back = manifest.read_manifest(tmp_path)
    assert back.paths == ["model.layers.0.mlp.act_fn"] and back.include == ["*.mlp.*"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no actpatch manifest"),
        ("{", "unreadable"),
        ('{"format": "other"}', "not an actpatch manifest"),
        ('{"format": "actpatch-manifest", "version": 99, "sites": []}', "version 99"),
        ('{"format": "actpatch-manifest", "version": 1, "sites": [{"p": 1}]}', "malformed"),
    ],
)
def test_bad_manifests(tmp_path, content, message):
    if content is not None:
        (tmp_path / MANIFEST_NAME).write_text(content)
    with pytest.raises(ManifestError, match=message):
        manifest.read_manifest(tmp_path)


def test_exact_pattern_matches_only_its_path():
    import fnmatch

    pattern = manifest._exact("a.b[0]*?")
    assert fnmatch.fnmatchcase("a.b[0]*?", pattern)
    assert not fnmatch.fnmatchcase("a.b0xy", pattern)


def test_save_and_load_patched_restores_the_same_sites(tiny, tmp_path):
    report = actpatch.patch_model(tiny, seq_len=16)
    expected = _patched_paths(report)
    assert expected  # a Llama MLP has one SiLU per layer
    out = tmp_path / "nested" / "out"
    manifest.save_patched(tiny, out, report)
    recorded = manifest.read_manifest(out)
    assert set(recorded.paths) == expected
    classes = {s.kind: s.module for s in recorded.sites}  # gated MLPs and norms keep their own class
    assert classes == {
        "gated": "transformers.models.llama.modeling_llama.LlamaMLP",
        "norm": "transformers.models.llama.modeling_llama.LlamaRMSNorm",
    }
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not _leftovers(out.parent)

    loaded = actpatch.load_patched(out)
    assert set(actpatch.patching.patched_modules(loaded)) == expected
    # same weights, same patched forward
    ids = torch.randint(0, 128, (1, 8))
    tiny.eval()
    with torch.no_grad():
        assert torch.equal(tiny(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_gated_sites_are_recorded_and_fused_again(tiny, tmp_path):
    report = actpatch.patch_model(tiny, seq_len=16, norms=False)
    fused = {s.path for s in report.patched_sites if s.kind == "gated"}
    assert fused == {f"model.layers.{i}.mlp" for i in range(TINY_LLAMA["num_hidden_layers"])}
    manifest.save_patched(tiny, tmp_path / "out", report)
    recorded = manifest.read_manifest(tmp_path / "out")
    assert {s.path for s in recorded.sites if s.kind == "gated"} == fused
    loaded = actpatch.load_patched(tmp_path / "out")
    assert {p for p, m in loaded.named_modules() if actpatch.in_place.is_patched(m)} == fused
    ids = torch.randint(0, 128, (1, 8))
    tiny.eval()
    with torch.no_grad():
        assert torch.equal(tiny(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_reapply_on_a_model_loaded_by_hand(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    report = actpatch.patch_model(tiny, seq_len=16)
    manifest.save_patched(tiny, tmp_path / "out", report)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    again = actpatch.reapply(plain, tmp_path / "out" / MANIFEST_NAME)
    assert _patched_paths(again) == _patched_paths(report)


def test_reapply_strict_mismatch_raises_and_unpatches(tiny):
    m = Manifest(
        sites=[ManifestSite("model.layers.0.mlp.act_fn", "silu"), ManifestSite("no.such.module", "silu")]
    )
    before = type(tiny.get_submodule("model.layers.0.mlp.act_fn"))
    with pytest.raises(ManifestError, match="1 of 2"):
        actpatch.reapply(tiny, m)
    assert type(tiny.get_submodule("model.layers.0.mlp.act_fn")) is before


def test_save_refuses_a_non_empty_directory(tiny, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    report = actpatch.analyze(tiny, seq_len=16)
    with pytest.raises(OutputExistsError):
        manifest.save_patched(tiny, tmp_path / "out", report)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_save_into_an_existing_empty_directory(tiny, tmp_path):
    (tmp_path / "out").mkdir()
    report = actpatch.patch_model(tiny, seq_len=16)
    manifest.save_patched(tiny, tmp_path / "out", report)
    assert (tmp_path / "out" / MANIFEST_NAME).is_file()


def test_parent_that_is_a_file(tiny, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="not a directory"):
        manifest.save_patched(tiny, tmp_path / "file" / "out", actpatch.analyze(tiny, seq_len=16))


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), RuntimeError("boom")])
def test_failing_save_leaves_nothing_behind(tiny, tmp_path, monkeypatch, error):
    def failing_save(self, directory, **kwargs):
        (Path(directory) / "model.safetensors").write_bytes(b"partial")
        raise error

    monkeypatch.setattr(type(tiny), "save_pretrained", failing_save)
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(OutputError if isinstance(error, OSError) else RuntimeError):
        manifest.save_patched(tiny, out, actpatch.patch_model(tiny, seq_len=16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no output, partial dir, nor a/b


def test_symlink_to_an_empty_directory_is_written_through(tiny, tmp_path):
    (tmp_path / "real").mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real", target_is_directory=True)
    manifest.save_patched(tiny, link, actpatch.patch_model(tiny, seq_len=16))
    assert link.is_symlink() and (tmp_path / "real" / MANIFEST_NAME).is_file()
    assert (link / "model.safetensors").is_file() and not _leftovers(tmp_path)


def test_symlink_to_a_non_empty_directory_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep.txt").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    with pytest.raises(OutputExistsError, match="not an empty directory"):
        manifest.check_output_dir(tmp_path / "link")


def test_mount_point_is_refused_up_front(tmp_path, monkeypatch):
    """An empty mount point passes the emptiness check, but the final rename cannot replace it."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == mount or real_ismount(p))
    with pytest.raises(OutputExistsError, match="mount point"):
        manifest.check_output_dir(mount)
    manifest.check_output_dir(mount / "inside")  # a new directory in it is fine
