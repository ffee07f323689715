"""Models of other libraries (litgpt, torchtitan, torchtune, torch's own nn.TransformerEncoder), patched from
their real classes: the same loss, gradients within the Hugging Face families' bar, saved bytes as projected
and at least 90% of what inverting every activation and norm in them could free."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
from library_models import BUILDERS, build, inverting_everything_frees, patched_copy, step, table

import actpatch

# What each model's report must say: kind -> how many sites of it are patched
PATCHED = {
    "litgpt-llama": {"gated": 2, "norm": 5},
    "litgpt-pythia": {"activation": 2, "norm": 5},
    "torchtitan-llama3": {"gated": 2, "norm": 5},
    "torchtune-llama3": {"gated": 2, "norm": 5},
    "torch-encoder-post-norm": {"activation": 2},
    "torch-encoder-pre-norm": {"activation": 2},
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_library_model_trains_the_same_and_saves_what_it_projects(name):
    model, kwargs = build(name)
    before_bytes, before_loss, before_grads = step(model, kwargs)
    patched, report = patched_copy(model, kwargs)
    after_bytes, after_loss, after_grads = step(patched, kwargs)

    torch.testing.assert_close(after_loss, before_loss, rtol=1e-5, atol=1e-6)
    assert after_grads.keys() == before_grads.keys()
    for param, g in before_grads.items():
        assert (after_grads[param] - g).norm() <= 2e-3 * g.norm() + 1e-6, param
    freed = before_bytes - after_bytes
    assert report.projection.activation_bytes_before == pytest.approx(before_bytes, rel=0.02)
    assert report.projection.saved_bytes == pytest.approx(freed, rel=0.02, abs=64)
    assert freed >= 0.9 * inverting_everything_frees(model, kwargs)
    patched_kinds = [s.kind for s in report.patched_sites]
    for kind, count in PATCHED[name].items():
        assert patched_kinds.count(kind) >= count, (kind, patched_kinds)
    assert list(patched.state_dict()) == list(model.state_dict())
    assert [type(m).__name__ for m in patched.modules()] == [type(m).__name__ for m in model.modules()]


@pytest.mark.parametrize("name", ["litgpt-llama", "torchtitan-llama3", "torch-encoder-pre-norm"])
def test_library_model_in_bfloat16_keeps_the_loss(name):
    model, kwargs = build(name, torch.bfloat16)
    _, before_loss, _ = step(model, kwargs)
    patched, report = patched_copy(model, kwargs)
    _, after_loss, _ = step(patched, kwargs)
    assert report.patched_sites
    torch.testing.assert_close(after_loss, before_loss, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["torchtitan-llama3", "torch-encoder-pre-norm"])
def test_library_model_compiles_without_graph_breaks(name):
    model, kwargs = build(name)
    patched, _ = patched_copy(model, kwargs)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(patched)(**kwargs)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(patched, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(**kwargs), model(**kwargs), rtol=1e-5, atol=1e-6)


def test_unpatching_a_library_model_restores_every_class_and_attribute():
    model, kwargs = build("torch-encoder-pre-norm")
    classes = [type(m) for m in model.modules()]
    activations = [layer.activation for layer in model.layers]
    actpatch.patch_model(model, example_inputs=kwargs)
    assert [layer.activation for layer in model.layers] != activations
    assert [vars(layer)["activation"] for layer in model.layers] == activations  # the instance's own
    actpatch.unpatch_model(model)
    assert [type(m) for m in model.modules()] == classes
    assert [layer.activation for layer in model.layers] == activations


def test_beyond_hugging_face_examples_run():
    """Every Python block of docs/beyond-hugging-face.md runs as it is (a missing library: skipped)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "beyond-hugging-face.md").read_text()
    for block in re.findall(r"^```python\n(.*?)^```", text, re.M | re.S):
        library = re.search(r"^from (litgpt|torchtitan|torchtune)", block, re.M)
        if library and importlib.util.find_spec(library.group(1)) is None:
            continue
        torch.manual_seed(0)
        exec(compile(block, "beyond-hugging-face.md", "exec"), {})


def test_beyond_hugging_face_table_is_current():
    for library in ("litgpt", "torchtitan", "torchtune"):
        pytest.importorskip(library)
    text = (Path(__file__).resolve().parents[1] / "docs" / "beyond-hugging-face.md").read_text()
    shown = text.split("<!-- library table -->\n")[1].split("\n<!-- end library table -->")[0]
    assert shown == table()
