"""Norms that keep their output, decided per site by the probe: LayerNorms and RMSNorms of the families and
torch's own modules, the fall-backs, weights with zeros appearing mid-training, and the bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from tiny_models import saved_bytes, tiny_model
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.olmo.modeling_olmo import OlmoLayerNorm

import actpatch
from actpatch import kinds
from actpatch.analysis import norms
from actpatch.analysis.inputs import input_spec


@pytest.mark.parametrize(
    ("module", "form"),
    [
        (nn.LayerNorm(64), "layer"),
        (nn.LayerNorm(64, bias=False), "layer"),
        (nn.LayerNorm(64, elementwise_affine=False), "layer"),
        (OlmoLayerNorm(64), "layer"),  # no parameters, no eps attribute, computes in float32
        (nn.RMSNorm(64, eps=1e-6), "torch"),
        (nn.RMSNorm(64), "torch"),  # eps=None
        (LlamaRMSNorm(64), "llama"),
    ],
    ids=lambda v: f"{type(v).__name__}{tuple(dict(v.named_parameters()))}" if isinstance(v, nn.Module) else v,
)
def test_norms_are_recognised_by_value(module, form):
    ((_, eps_attr),) = norms.candidates(module).values()
    assert norms.variant_of(module, eps_attr) == form


class _Block(nn.Module):
    """Linear -> norm -> Linear (saves the norm's output), optionally with the norm's input saved by another
    op, or the norm's output going through a dropout first (nothing saves it)."""

    def __init__(self, norm: nn.Module, *, input_saved: bool = False, dropout: bool = False) -> None:
        super().__init__()
        self.inp, self.norm, self.proj = nn.Linear(16, 16), norm, nn.Linear(16, 16)
        self.input_saved = input_saved
        self.drop = nn.Dropout(0.5) if dropout else nn.Identity()

    def forward(self, x):
        x = self.inp(x)
        y = self.proj(self.drop(self.norm(x)))
        return (y * x).sum() if self.input_saved else y.square().sum()


@pytest.mark.parametrize(
    ("norm", "input_saved", "dropout", "keeps", "reason"),
    [
        (nn.LayerNorm(16), False, False, "output", None),
        (LlamaRMSNorm(16), False, False, "output", None),
        (nn.RMSNorm(16), False, False, "output", None),
        (LlamaRMSNorm(16), True, False, "input", None),  # x saved anyway: keeping it costs nothing
        (LlamaRMSNorm(16), False, True, "input", None),  # nothing saves y: keep x, as before (bf16)
        (nn.LayerNorm(16), True, False, "", "input kept by"),
        (nn.LayerNorm(16), False, True, "", "output not saved by a later op"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v),
)
def test_what_a_norm_keeps_is_decided_by_the_probe(norm, input_saved, dropout, keeps, reason):
    """In bfloat16 (in float32 an RMSNorm keeping x frees nothing: eager keeps one float32 tensor)."""
    model = _Block(norm, input_saved=input_saved, dropout=dropout).to(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    ref = copy.deepcopy(model)
    report = actpatch.patch_model(model, example_inputs=x)
    (site,) = [s for s in report.sites if s.kind == "norm"]
    assert (site.patched, site.keeps) == (reason is None, keeps)
    assert reason is None or site.reason.startswith(reason)
    torch.manual_seed(0)
    model(x).backward()
    torch.manual_seed(0)
    ref(x).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max() <= 2e-2 * q.grad.abs().max(), name


def test_zero_weights_appearing_mid_training_keep_the_gradient_right():
    """A norm keeping its output divides by its weight: once entries become exactly 0 (an in-place update,
    as pruning does), it keeps its input instead, and the gradient stays eager's."""
    model = _Block(nn.LayerNorm(16))
    ref = copy.deepcopy(model)
    actpatch.patch_model(model, example_inputs=torch.randn(2, 5, 16))
    x = torch.randn(2, 5, 16)
    for step in range(3):
        if step == 1:
            for m in (model, ref):
                with torch.no_grad():
                    m.norm.weight[:4] = 0.0
        for m in (model, ref):
            m.zero_grad()
            m(x).backward()
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            assert torch.isfinite(p.grad).all()
            assert (p.grad - q.grad).abs().max() <= 2e-3 * q.grad.abs().max(), step


def test_a_weight_with_zeros_at_patch_time_keeps_its_input():
    norm = LlamaRMSNorm(16)
    with torch.no_grad():
        norm.weight[3] = 0.0
    model = _Block(norm).to(torch.bfloat16)
    report = actpatch.patch_model(model, example_inputs=torch.randn(2, 5, 16, dtype=torch.bfloat16))
    (site,) = [s for s in report.sites if s.kind == "norm"]
    assert site.patched and site.keeps == "input"


def test_double_backward_through_a_norm_keeping_its_output_names_actpatch():
    model = _Block(nn.LayerNorm(16))
    actpatch.patch_model(model, example_inputs=torch.randn(2, 5, 16))
    x = torch.randn(2, 5, 16, requires_grad=True)
    (g,) = torch.autograd.grad(model(x), x, create_graph=True)
    with pytest.raises(RuntimeError, match="actpatch"):
        g.sum().backward()


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_norms_without_gradients_run_the_plain_op(mode):
    model = _Block(nn.LayerNorm(16))
    ref = copy.deepcopy(model)
    actpatch.patch_model(model, example_inputs=torch.randn(2, 5, 16))
    x = torch.randn(2, 5, 16)
    with mode():
        assert torch.equal(model(x), ref(x))


def test_lora_frozen_linears_save_nothing_so_norms_keep_their_input():
    """Under LoRA the base q/k/v and gate/up projections are frozen: they save no input, the norm's output
    is saved only by the small LoRA A matrices (still that very storage), so the decision follows it."""
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["o_proj"]))  # q/k/v frozen
    report = actpatch.analyze(lora, batch_size=2, seq_len=12)
    found = [s for s in report.sites if s.kind == "norm" and ".layers." in s.path]
    assert found and all(s.keeps == "input" for s in found)


def test_every_kind_option_is_a_keyword_and_a_flag():
    """The registry is the one source: patch_model's keywords and the CLI's flags are its options."""
    from typer.testing import CliRunner

    from actpatch.cli.app import app

    options = kinds.options()
    assert options == {"gated": True, "norms": True, "dropouts": False, "casts": True}
    help_text = CliRunner().invoke(app, ["convert", "--help"], env={"COLUMNS": "200"}).output
    assert all(f"--no-{o}" in help_text for o in options)
    with pytest.raises(TypeError, match="unexpected keyword argument 'norm'"):
        actpatch.patch_model(nn.Linear(2, 2), norm=True)
    with pytest.raises(TypeError, match="must be True or False"):
        actpatch.analyze(nn.Linear(2, 2), norms="yes")


def test_report_says_what_each_norm_keeps():
    config = tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)
    with torch.device("meta"):
        model = tf.GPT2LMHeadModel(config)
    report = actpatch.analyze(model, batch_size=1, seq_len=64, dtype=torch.bfloat16)
    found = [s for s in report.sites if s.kind == "norm"]
    assert len(found) == 5 and all(s.keeps == "output" and s.activation == "layer_norm" for s in found)
    assert "[norm: layer_norm keeps output]" in report.to_text()
    assert all(d["keeps"] == "output" for d in report.to_dict()["sites"] if d["kind"] == "norm")


class _StrictLayerNorm(nn.LayerNorm):
    """A LayerNorm refusing a weight of another dtype than x, as CUDA's does (float32 weight, bf16 x)."""

    def forward(self, x):
        if self.weight.dtype != x.dtype:
            raise RuntimeError("expected scalar type BFloat16 but found Float")
        return super().forward(x)


def test_a_layer_norm_refusing_mixed_dtypes_is_recognised():
    """Only RMSNorm forms are checked with a float32 weight and bf16 x; a LayerNorm failing there (CUDA's)
    is still a LayerNorm."""
    ((_, eps_attr),) = norms.candidates(_StrictLayerNorm(32)).values()
    assert norms.variant_of(_StrictLayerNorm(32), eps_attr) == "layer"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_gpu_norms_keep_their_outputs_in_bf16(family):
    """On CUDA in bf16 every block's norm keeps its output; the loss is eager's bitwise, and each gradient
    is no further from the float32 model's than twice eager bf16's (plus 1e-6 of the largest gradient:
    BERT's key biases have none, only rounding)."""
    model = tiny_model(family).cuda()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    reference = copy.deepcopy(model)
    model = model.to(torch.bfloat16)
    eager = copy.deepcopy(model)
    report = actpatch.patch_model(model, batch_size=2, seq_len=16, gated=False)
    found = [s for s in report.sites if s.kind == "norm" and ".0." in s.path]
    assert len(found) >= 2 and all(s.patched and s.keeps == "output" for s in found)
    _, kwargs = input_spec(model).make(2, 16)
    kwargs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    losses = [m(**kwargs).loss for m in (reference, eager, model)]
    assert torch.equal(losses[2], losses[1])
    for loss in losses:
        loss.backward()
    scale = max(p.grad.abs().max() for p in reference.parameters() if p.grad is not None)
    named = zip(reference.named_parameters(), eager.parameters(), model.parameters(), strict=True)
    for (name, r), e, p in named:
        if r.grad is not None:
            ours, theirs = (p.grad.float() - r.grad).norm(), (e.grad.float() - r.grad).norm()
            assert ours <= 2 * theirs + 1e-6 * scale * r.numel() ** 0.5, name


def test_norms_patched_in_float32_train_under_autocast():
    """Patched in float32, trained under bf16 autocast (the Linear then saves its own bf16 copy): the norm
    still computes eager's values, and the gradients are eager's under autocast."""
    model = _Block(nn.LayerNorm(16))
    ref = copy.deepcopy(model)
    report = actpatch.patch_model(model, example_inputs=torch.randn(2, 5, 16))
    assert [s.keeps for s in report.sites if s.kind == "norm"] == ["output"]
    x = torch.randn(2, 5, 16)
    for m in (model, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(x).backward()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max() <= 2e-2 * q.grad.abs().max()


def test_compiled_patched_norms_have_no_graph_breaks():
    """Under torch.compile a norm reads its weight check, made outside the graph: one graph, eager's values
    and gradients."""
    model = _Block(nn.LayerNorm(16))
    ref = copy.deepcopy(model)
    actpatch.patch_model(model, example_inputs=torch.randn(2, 5, 16))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 5, 16)
    compiled(x).backward()
    ref(x).backward()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * q.grad.abs().max()


class _OutputChangedInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.norm, self.proj = nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 16)

    def forward(self, x):
        y = self.norm(self.inp(x))
        out = self.proj(y)
        y.mul_(2.0)  # the Linear saved y: eager's backward refuses it too
        return out.sum()


def test_an_output_changed_in_place_is_autograds_own_error():
    model = _OutputChangedInPlace()
    ref = copy.deepcopy(model)
    actpatch.patch_model(model, example_inputs=torch.randn(2, 5, 16))
    x = torch.randn(2, 5, 16)
    for m in (ref, model):
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            m(x).backward()


@pytest.mark.parametrize("family", ["nemotron", "deberta"])
def test_norms_no_kernel_reproduces_are_reported(family):
    """Nemotron's LayerNorm1P (w + 1) and DeBERTa's float32 LayerNorm compute no form bitwise: each is a
    site with its reason, not silently absent from the report."""
    if family == "nemotron":
        config = tf.NemotronConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100)  # fmt: skip
        model = tf.NemotronForCausalLM(config)
    else:
        config = tf.DebertaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                                  num_attention_heads=4, vocab_size=100)  # fmt: skip
        model = tf.DebertaForMaskedLM(config)
    report = actpatch.analyze(model.train(), batch_size=2, seq_len=8)
    own = {"NemotronLayerNorm1P", "DebertaLayerNorm"}
    found = [s for s in report.sites if s.kind == "norm" and s.activation in own]
    assert found and all(not s.patched and s.reason.startswith("computes no norm") for s in found)


def test_norms_sharing_their_input_keep_their_outputs_together():
    """GPT-NeoX's parallel residual: input_layernorm(x) and post_attention_layernorm(x) each keep x for the
    other; keeping both outputs frees x, counted once in the projection."""
    model = tiny_model("gpt_neox")
    assert model.config.use_parallel_residual
    _, kwargs = input_spec(model).make(2, 16)
    report = actpatch.analyze(model, batch_size=2, seq_len=16)
    layer_norms = [s for s in report.sites if s.kind == "norm" and ".layers." in s.path]
    assert len(layer_norms) == 4 and all(s.patched and s.keeps == "output" for s in layer_norms)
    patched = copy.deepcopy(model)
    actpatch.patch_model(patched, batch_size=2, seq_len=16)
    freed = saved_bytes(model, kwargs)[0] - saved_bytes(patched, kwargs)[0]
    assert report.projection.saved_bytes == pytest.approx(freed, rel=0.02)
