"""RMSNorms that keep x and 1/rms: the module's forward bitwise, eager's gradients, recognised by value."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from test_gated import assert_close_at_scale
from test_patching import _step
from tiny_models import FAMILIES, tiny_model
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.t5.modeling_t5 import T5LayerNorm

import actpatch
import actpatch.functional as AF
from actpatch.analysis import norms
from actpatch.analysis.inputs import input_spec

HF_NORMS = {"llama": LlamaRMSNorm, "t5": T5LayerNorm, "gemma": GemmaRMSNorm}
DTYPES = [  # (x, weight): same dtype, and bf16 activations with float32 weights (autocast)
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
]
RMS_FAMILIES = {
    "t5",
    "phi3",
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "gemma",
    "gemma2",
    "deepseek_v3",
}


def hf_norm(variant: str, hidden: int, w_dtype: torch.dtype, device: str = "cpu") -> nn.Module:
    module = HF_NORMS[variant](hidden, eps=1e-6)
    with torch.no_grad():
        module.weight.normal_(0.5, 0.3, generator=torch.Generator().manual_seed(1))
    return module.to(device=device, dtype=w_dtype)


def rows(dtype: torch.dtype, hidden: int, device: str = "cpu") -> torch.Tensor:
    """Random rows and the edges: a zero row (rms = sqrt(eps)), a tiny one, a huge one, one spike."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, hidden, generator=g) * 3
    info = torch.finfo(dtype)
    x[0] = 0.0
    x[1] = float(info.smallest_normal)
    x[2] = float(info.max) / 2
    x[3, 5] = 1e4 if dtype != torch.float16 else 6e4
    return x.to(device=device, dtype=dtype)


def both(module: nn.Module, variant: str, x: torch.Tensor, dy: torch.Tensor):
    """(y, dx, dw) of the module itself and of actpatch.functional.rms_norm with its weight."""
    out = []
    for fn in (module, lambda t: AF.rms_norm(t, module.weight, 1e-6, variant)):
        xi = x.detach().clone().requires_grad_()
        module.weight.grad = None
        y = fn(xi)
        y.backward(dy)
        out.append((y.detach(), xi.grad, module.weight.grad.clone()))
    return out


@pytest.mark.parametrize(("x_dtype", "w_dtype"), DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("variant", sorted(HF_NORMS))
def test_forward_bitwise_weight_grad_bitwise_input_grad_within_rounding(variant, x_dtype, w_dtype):
    module = hf_norm(variant, 96, w_dtype)
    x = rows(x_dtype, 96)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(module(x).dtype)
    (y, dx, dw), (y2, dx2, dw2) = both(module, variant, x, dy)
    assert y2.dtype == y.dtype and torch.equal(y2, y)
    assert torch.equal(dw2, dw)
    assert torch.isfinite(dx2).all()
    finite = torch.isfinite(dx).all(-1)
    assert finite[3:].all()  # only the overflowing rows may be non-finite in eager
    assert_close_at_scale(dx2[finite], dx[finite])


def test_saved_tensors_are_x_and_one_float_per_row():
    module = hf_norm("llama", 64, torch.bfloat16)
    x = torch.randn(5, 7, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        AF.rms_norm(x, module.weight, 1e-6, "llama")
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in saved}
    assert storages.pop(module.weight.untyped_storage().data_ptr()) == module.weight.nbytes
    assert storages.pop(x.untyped_storage().data_ptr()) == x.nbytes
    assert list(storages.values()) == [5 * 7 * 4]  # 1/rms: one float32 per row


def test_no_grad_runs_the_plain_ops_and_bad_variant_is_an_error():
    module = hf_norm("gemma", 32, torch.float32)
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(AF.rms_norm(x, module.weight, 1e-6, "gemma"), module(x))
    with pytest.raises(ValueError, match="variant is one of llama, t5, gemma"):
        AF.rms_norm(x, module.weight, 1e-6, "layer")


def test_double_backward_is_a_clear_error():
    module = hf_norm("llama", 16, torch.float32)
    x = torch.randn(2, 16, requires_grad=True)
    (dx,) = torch.autograd.grad(AF.rms_norm(x, module.weight, 1e-6).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dx.sum().backward()


class _DivNorm(nn.Module):  # an RMSNorm written with a division: not bitwise any variant
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = 1e-6

    def forward(self, x):
        h = x.float()
        return self.weight * (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (LlamaRMSNorm(64), "llama"),
        (T5LayerNorm(64), "t5"),
        (GemmaRMSNorm(64), "gemma"),
        (_DivNorm(64), None),
        (nn.LayerNorm(64, bias=False), "layer"),  # subtracts the mean
        (nn.RMSNorm(64, eps=1e-6), "torch"),  # torch's own op, its own arithmetic
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v),
)
def test_variants_are_recognised_by_value(module, expected):
    found = norms.candidates(module)
    assert len(found) == 1
    ((path, eps_attr),) = found.values()
    assert norms.variant_of(module, eps_attr) == expected


def test_modules_not_shaped_like_a_norm_are_not_candidates():
    sizes = nn.Module()
    sizes.weight, sizes.bias, sizes.eps = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(5)), 1e-6
    buffered = nn.LayerNorm(4)
    buffered.register_buffer("scale", torch.ones(4))
    two_eps = nn.LayerNorm(4)
    two_eps.eps_extra = 1e-3
    for module in (sizes, buffered, two_eps, nn.Linear(4, 4), nn.Embedding(4, 4)):
        assert norms.candidates(module) == {}, module


def test_shaped_like_a_norm_but_computing_none_is_not_recognised():
    shaped = nn.Module()
    shaped.weight, shaped.bias, shaped.eps = nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4)), 1e-6
    scale = nn.Module()  # no eps: tried with the usual constants, matches none
    scale.weight = nn.Parameter(torch.ones(4))
    scale.forward = lambda x: x * scale.weight
    for module in (shaped, scale):
        ((_, eps_attr),) = norms.candidates(module).values()
        assert norms.variant_of(module, eps_attr) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_norms_of_every_family_forward_bitwise_and_save_what_they_project(family):
    """Only the norms patched (float32): the loss is the eager loss bitwise; every gradient within 2e-3 of
    eager's at its scale; the bytes freed are the projection's."""
    model = tiny_model(family)
    _, kwargs = input_spec(model).make(2, 12)
    found = [s for s in actpatch.analyze(model, batch_size=2, seq_len=12).sites if s.kind == "norm"]
    assert {s.activation for s in found} == ({"rms_norm"} if family in RMS_FAMILIES else {"layer_norm"})
    assert any(s.patched and s.keeps == "output" for s in found)
    before, loss, grads = _step(model, kwargs)
    only = [s.path for s in found if s.patched]
    report = actpatch.patch_model(model, batch_size=2, seq_len=12, include=only, gated=False)
    assert [s.path for s in report.patched_sites] == only
    after, loss2, grads2 = _step(model, kwargs)
    assert torch.equal(loss2, loss)
    for name, g in grads.items():
        assert (grads2[name] - g).abs().max() <= 2e-3 * g.abs().max() + 1e-7, name
    assert report.projection.saved_bytes == pytest.approx(before - after, rel=0.02)


class _InPlaceAfterNorm(nn.Module):
    def __init__(self, shift: bool) -> None:
        super().__init__()
        self.inp, self.norm, self.proj, self.shift = nn.Linear(8, 8), LlamaRMSNorm(8), nn.Linear(8, 8), shift
        self.to(torch.bfloat16)

    def forward(self, x):
        x = self.inp(x)
        y = self.norm(x)
        y = self.proj(y + 1.0 if self.shift else y)  # shifted: nothing saves the norm's output
        x.add_(1.0)  # legal in eager (the norm kept a float32 copy), not once the norm keeps x
        return (y + x).sum()


@pytest.mark.parametrize("shift", [False, True])
def test_input_modified_in_place_afterwards_is_not_kept(shift):
    """Keeping its output, the norm does not mind; one that would keep its input is not patched."""
    model = _InPlaceAfterNorm(shift)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    report = actpatch.patch_model(model, example_inputs=x)
    (site,) = [s for s in report.sites if s.kind == "norm"]
    if shift:
        assert not site.patched and site.reason.startswith("input modified in place")
        return
    assert site.patched and site.keeps == "output"
    model(x).backward()
    ref(x).backward()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max() <= 2e-2 * q.grad.abs().max()


@pytest.mark.parametrize(("x_dtype", "w_dtype"), [d for d in DTYPES if torch.bfloat16 not in d], ids=str)
@pytest.mark.parametrize("variant", sorted(HF_NORMS))
@pytest.mark.parametrize("shape", [(40, 96), (3, 5, 200), (1, 6), (9, 7), (0, 64)], ids=str)
def test_triton_backward_matches_the_reference(variant, x_dtype, w_dtype, shape):
    """The fused RMSNorm backward under Triton's interpreter (float32, float16; the interpreter rounds
    bfloat16 by truncation: bf16 runs on the GPU) against rms_norm.backward: odd widths, fewer rows than
    programs, no rows."""
    from actpatch.kernels import rms_norm, triton_norm

    width = shape[-1]
    module = hf_norm(variant, width, w_dtype)
    n_rows = torch.Size(shape[:-1]).numel()
    x = rows(x_dtype, width).repeat(n_rows // 40 + 1, 1)[:n_rows].reshape(shape)
    y, r = rms_norm.forward(x, module.weight.detach(), 1e-6, variant)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype)
    dx, dw = triton_norm.backward(dy, x, module.weight.detach(), r, variant)
    dxr, dwr = rms_norm.backward(dy, x, module.weight.detach(), r, variant)
    assert dx.shape == dxr.shape and dx.dtype == dxr.dtype and dw.dtype == dwr.dtype
    if x.numel():
        assert_close_at_scale(dx, dxr)
        assert_close_at_scale(dw, dwr)
    else:
        assert torch.equal(dw, torch.zeros_like(dwr))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", sorted(HF_NORMS))
def test_gpu_forward_bitwise_and_gradients(variant):
    """On CUDA the backward is one fused Triton kernel: dx and dw within the dtype's rounding of eager's."""
    module = hf_norm(variant, 4096, torch.bfloat16, "cuda")
    assert norms.variant_of(module, next(iter(norms.candidates(module).values()))[1]) == variant
    x = rows(torch.bfloat16, 4096, "cuda")
    dy = torch.randn(x.shape, device="cuda", dtype=torch.bfloat16)
    (y, dx, dw), (y2, dx2, dw2) = both(module, variant, x, dy)
    assert torch.equal(y2, y)
    assert_close_at_scale(dw2, dw)
    finite = torch.isfinite(dx).all(-1)
    assert torch.isfinite(dx2).all()
    assert_close_at_scale(dx2[finite], dx[finite])


def test_llama_meta_dry_run_counts_the_norms():
    config = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=100)  # fmt: skip
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(config)
    report = actpatch.analyze(model, batch_size=1, seq_len=256, dtype=torch.bfloat16)
    found = [s for s in report.sites if s.kind == "norm"]
    assert len(found) == 5 and all(s.patched for s in found)
    assert {s.saved_bytes_per_token for s in found} == {64 * 6}  # float32 copy + bf16 product; y kept anyway


def test_recognition_leaves_the_module_untouched():
    """variant_of runs the class's forward on a twin: no hook of the module fires and its parameter objects
    stay in place (an FSDP2 module's DTensor weight must never be swapped out and back)."""
    module = hf_norm("llama", 32, torch.float32)
    weight, params = module.weight, module._parameters
    calls = []
    module.register_forward_hook(lambda *args: calls.append(args))
    assert norms.variant_of(module, "variance_epsilon") == "llama"
    assert calls == [] and module.weight is weight and module._parameters is params
    assert list(module._parameters) == ["weight"]
