"""With example_inputs, the projection is for their own shape unless batch_size/seq_len say otherwise."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import saved_bytes, tiny_model

import actpatch
from actpatch.analysis.inputs import input_spec


def _inputs(model, batch, seq=16):
    torch.manual_seed(1)
    return input_spec(model).make(batch, seq)[1]


def _measured(model, kwargs):
    """(bytes saved for backward by ``model(**kwargs)``, the bytes patching frees)."""
    patched = copy.deepcopy(model)
    actpatch.patch_model(patched)
    before, after = saved_bytes(model, kwargs)[0], saved_bytes(patched, kwargs)[0]
    return before, before - after


@pytest.mark.parametrize(("family", "shape"), [("llama", (2, 16)), ("vit", (2, 1))])
def test_projection_is_for_the_example_itself(family, shape):
    """Token ids [2, 16] project 2 x 16; pixels [2, 3, H, W], with no sequence dimension, 2 x 1."""
    model = tiny_model(family)
    example = _inputs(model, 2)
    p = actpatch.analyze(model, example_inputs=example).projection
    assert (p.batch_size, p.seq_len) == shape
    before, freed = _measured(model, example)
    assert p.activation_bytes_before == pytest.approx(before, rel=0.02)
    assert p.saved_bytes == pytest.approx(freed, rel=0.02)


def test_explicit_batch_size_and_seq_len_are_honoured():
    """Each given one replaces the example's own; the other stays the example's."""
    model = tiny_model("llama")
    example = _inputs(model, 2)
    own = actpatch.analyze(model, example_inputs=example).projection
    for given, shape in [
        ({"batch_size": 4}, (4, 16)),
        ({"seq_len": 32}, (2, 32)),
        ({"batch_size": 3, "seq_len": 40}, (3, 40)),
    ]:
        p = actpatch.analyze(model, example_inputs=example, **given).projection
        assert (p.batch_size, p.seq_len) == shape
        scale = shape[0] * shape[1] / (2 * 16)  # the example's bytes, per token
        assert p.activation_bytes_before == pytest.approx(own.activation_bytes_before * scale, rel=1e-4)


def test_images_scale_with_an_explicit_batch_size():
    model = tiny_model("vit")
    p = actpatch.analyze(model, example_inputs=_inputs(model, 2), batch_size=4).projection
    assert (p.batch_size, p.seq_len) == (4, 1)
    before, freed = _measured(model, _inputs(model, 4))
    assert p.activation_bytes_before == pytest.approx(before, rel=0.02)
    assert p.saved_bytes == pytest.approx(freed, rel=0.02)


def test_seq_len_for_an_example_without_a_sequence_dimension_is_an_error():
    model = tiny_model("vit")
    with pytest.raises(ValueError, match="seq_len does not apply: example_inputs have no sequence dimension"):
        actpatch.analyze(model, example_inputs=_inputs(model, 2), seq_len=16)
