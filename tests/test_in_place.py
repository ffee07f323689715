"""What users do to patched modules: whole-model torch.save / pickle, copy.copy, deepcopy and
nn.DataParallel replicas.  Each keeps a working patched model whose behaviour follows the instance
called (its own children and weights)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from tiny_models import tiny_model

import actpatch
from actpatch import in_place
from actpatch.analysis.inputs import input_spec
from actpatch.patching import patched_modules

BATCH, SEQ = 2, 12


def _loss_and_grads(model, kwargs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = model(**kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _kinds(model):
    return {path: (type(m).__name__, in_place.plan_of(m)) for path, m in patched_modules(model).items()}


def _round_trip_torch_save(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _round_trip_pickle(model):
    return pickle.loads(pickle.dumps(model))


@pytest.mark.parametrize("load", [_round_trip_torch_save, _round_trip_pickle], ids=["torch.save", "pickle"])
@pytest.mark.parametrize(
    ("family", "options"),
    [("llama", {}), ("gpt2", {"dropouts": True}), ("phi3", {}), ("mixtral", {"norms": False})],
)
def test_a_pickled_patched_model_loads_patched_and_trains_the_same(family, options, load):
    model = tiny_model(family)
    _, kwargs = input_spec(model).make(BATCH, SEQ)
    report = actpatch.patch_model(model, batch_size=BATCH, seq_len=SEQ, **options)
    kinds = {s.kind for s in report.patched_sites}
    assert kinds >= ({"activation"} if family == "gpt2" else {"gated"})
    loaded = load(model)
    assert _kinds(loaded) == _kinds(model)
    assert (
        type(loaded.get_submodule(report.patched_sites[0].path)).__name__
        == type(model.get_submodule(report.patched_sites[0].path)).__name__
    )
    loss, grads = _loss_and_grads(model, kwargs)
    loaded_loss, loaded_grads = _loss_and_grads(loaded, kwargs)
    assert torch.equal(loss, loaded_loss)
    assert all(torch.equal(grads[n], loaded_grads[n]) for n in grads)
    assert actpatch.unpatch_model(loaded) and not patched_modules(loaded)
    assert not any(type(m).__reduce_ex__ is not torch.nn.Module.__reduce_ex__ for m in loaded.modules())


def test_unpickling_a_patched_module_gives_its_class_name_and_plan_back():
    model = tiny_model("llama")
    actpatch.patch_model(model, batch_size=BATCH, seq_len=SEQ)
    norm = model.model.norm
    restored = pickle.loads(pickle.dumps(norm))
    assert isinstance(restored, type(norm).__mro__[1]) and type(restored).__name__ == "LlamaRMSNorm"
    assert in_place.plan_of(restored) == in_place.plan_of(norm)
    x = torch.randn(3, 32)
    assert torch.equal(restored(x), norm(x))


def _own_children(module, **children):
    """A replica as nn.DataParallel makes one (``_replicate_for_data_parallel``: same class, a shallow
    copy of __dict__ with fresh _parameters / _modules dicts), given its own children and weights."""
    replica = module._replicate_for_data_parallel()
    for name, value in children.items():
        if isinstance(value, torch.nn.Parameter):
            replica._parameters[name] = value
        else:
            replica._modules[name] = value
    return replica


def test_replicas_and_copies_run_their_own_children_and_weights():
    model = tiny_model("llama")
    actpatch.patch_model(model, batch_size=BATCH, seq_len=SEQ)
    mlp, norm = model.model.layers[0].mlp, model.model.norm
    assert in_place.is_patched(mlp) and in_place.is_patched(norm)
    x = torch.randn(2, 5, 32, requires_grad=True)

    down = copy.deepcopy(mlp.down_proj)
    with torch.no_grad():
        down.weight.mul_(2)
    replica = _own_children(mlp, down_proj=down)
    assert torch.equal(replica(x), 2 * mlp(x)) and not torch.equal(replica(x), mlp(x))

    weight = torch.nn.Parameter(torch.full_like(norm.weight, 3.0))
    replica = _own_children(norm, weight=weight)
    expected = 3.0 * (norm(x) / norm.weight)
    torch.testing.assert_close(replica(x), expected)
    replica(x).sum().backward()
    assert weight.grad is not None and norm.weight.grad is None

    shallow = copy.copy(norm)
    shallow._parameters = {"weight": weight}
    torch.testing.assert_close(shallow(x), expected)
    assert in_place.is_patched(shallow) and type(shallow) is type(norm)

    deep = copy.deepcopy(model)
    assert _kinds(deep).keys() == _kinds(model).keys()
    with torch.no_grad():
        deep.model.norm.weight.fill_(0.5)
    _, kwargs = input_spec(model).make(BATCH, SEQ)
    assert not torch.equal(deep(**kwargs).logits, model(**kwargs).logits)


def test_a_class_made_after_patching_keeps_working_and_unpatches():
    """FSDP2's fully_shard swaps the class of a module for a subclass of it: a patched module shard after
    patching keeps its plan, and unpatching leaves the subclass running the original forward."""
    model = tiny_model("llama")
    actpatch.patch_model(model, batch_size=BATCH, seq_len=SEQ)
    norm = model.model.norm
    x = torch.randn(3, 32, requires_grad=True)
    patched_y = norm(x)
    norm.__class__ = type("FSDPLlamaRMSNorm", (type(norm),), {})
    assert torch.equal(norm(x), patched_y)
    actpatch.unpatch_model(model)
    assert type(norm).__name__ == "FSDPLlamaRMSNorm" and not in_place.is_patched(norm)
    y = norm(x)
    assert torch.equal(y, patched_y) and "Actpatch" not in y.grad_fn.name()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_data_parallel_replicas_compute_with_their_own_devices_weights():
    """nn.DataParallel over two GPUs: each replica of a patched model runs its own children (on its own
    GPU), so the loss and gradients equal the single-GPU patched model's."""
    model = tiny_model("llama").cuda()
    _, kwargs = input_spec(model).make(4, SEQ)
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    actpatch.patch_model(model, batch_size=4, seq_len=SEQ)
    single = copy.deepcopy(model)
    logits = single(input_ids=kwargs["input_ids"]).logits
    logits.float().square().mean().backward()
    parallel = torch.nn.DataParallel(model, device_ids=[0, 1])
    out = parallel(input_ids=kwargs["input_ids"]).logits
    torch.testing.assert_close(out, logits.detach(), rtol=1e-5, atol=1e-6)
    out.float().square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), single.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
