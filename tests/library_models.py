"""Tiny random-weight models of libraries other than transformers, built from their own classes (each skips
when its library is not installed: ``pip install 'actpatch[libraries]'``), and the yardsticks their tests
share: loss and gradients against the unpatched model, saved bytes against the projection and against what
inverting every activation and norm could free."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import actpatch
from actpatch import measure
from actpatch.analysis.probe import run_probe

VOCAB, BATCH, SEQ = 128, 2, 16


def litgpt_llama() -> nn.Module:
    litgpt = pytest.importorskip("litgpt")
    config = litgpt.Config(
        name="tiny-llama", block_size=64, vocab_size=VOCAB, padded_vocab_size=VOCAB, n_layer=2, n_head=4,
        n_embd=64, n_query_groups=2, rotary_percentage=1.0, parallel_residual=False, bias=False,
        norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP", intermediate_size=128,
    )  # fmt: skip
    return litgpt.GPT(config)


def litgpt_pythia() -> nn.Module:
    litgpt = pytest.importorskip("litgpt")
    config = litgpt.Config.from_name(
        "pythia-14m", n_layer=2, vocab_size=VOCAB, padded_vocab_size=VOCAB, block_size=64
    )
    return litgpt.GPT(config)


def torchtitan_llama3() -> nn.Module:
    pytest.importorskip("torchtitan")
    from torchtitan.models.llama3.model.args import TransformerModelArgs
    from torchtitan.models.llama3.model.model import Transformer

    args = TransformerModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=32, max_seq_len=64
    )
    model = Transformer(args)
    with torch.no_grad():
        model.init_weights()
    return model


def torchtune_llama3() -> nn.Module:
    pytest.importorskip("torchtune")
    from torchtune.models.llama3 import llama3

    return llama3(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=64)


def torch_encoder(norm_first: bool) -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        64, 4, 128, dropout=0.0, activation="gelu", batch_first=True, norm_first=norm_first
    )
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


BUILDERS = {
    "litgpt-llama": litgpt_llama,
    "litgpt-pythia": litgpt_pythia,
    "torchtitan-llama3": torchtitan_llama3,
    "torchtune-llama3": torchtune_llama3,
    "torch-encoder-post-norm": lambda: torch_encoder(False),
    "torch-encoder-pre-norm": lambda: torch_encoder(True),
}


def build(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict]:
    """(the model in training mode, its forward's keyword arguments)."""
    torch.manual_seed(0)
    model = BUILDERS[name]().to(dtype).train()
    torch.manual_seed(1)
    if name.startswith("torch-encoder"):
        return model, {"src": torch.randn(BATCH, SEQ, 64, dtype=dtype)}
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    return model, ({"tokens": ids} if name.startswith(("torchtitan", "torchtune")) else {"idx": ids})


def loss_of(out: torch.Tensor) -> torch.Tensor:
    return out.float().square().mean()


def step(model: nn.Module, kwargs: dict) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
    """(bytes autograd saved, the loss, every parameter's gradient)."""
    model.zero_grad(set_to_none=True)
    nbytes, out = measure.saved_bytes(model, kwargs)
    loss = loss_of(out)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return nbytes, loss.detach(), grads


def inverting_everything_frees(model: nn.Module, kwargs: dict) -> int:
    """Bytes that inverting every activation and norm call could free: what each one's own ops save that
    nothing else keeps (the probe's ``freed_by``), less its output where no later op saves that (inverted, it
    would keep it), the norms being every module with "Norm" in its class."""
    norms = frozenset(id(m) for m in model.modules() if "Norm" in type(m).__name__ and not m._modules)
    dtype = next(model.parameters()).dtype
    probe = run_probe(model, (), kwargs, dtype, watched=norms)
    total = 0
    for call in (*probe.calls, *probe.watched_calls):
        kept_later = any(s.storage == call.output_storage and id(call) not in s.inside for s in probe.saved)
        output = 0 if kept_later else call.numel * call.dtype.itemsize
        total += max(0, probe.freed_by(call).total - output)
    return int(total)


def patched_copy(model: nn.Module, kwargs: dict) -> tuple[nn.Module, actpatch.PatchReport]:
    patched = copy.deepcopy(model)
    return patched, actpatch.patch_model(patched, example_inputs=kwargs)


def _layer_free(text: str) -> str:
    return re.sub(r"\.\d+\.", ".{i}.", text)


def table() -> str:
    """The Markdown table of docs/beyond-hugging-face.md: what patch_model does to each model (float32,
    batch 2 x seq 16).  ``python tests/library_models.py`` prints it; test_libraries.py checks the doc."""
    rows = ["| model | patched | left alone | saved |", "|---|---|---|---|"]
    for name in BUILDERS:
        model, kwargs = build(name)
        report = actpatch.analyze(model, example_inputs=kwargs)
        patched = sorted({s.kind for s in report.patched_sites})
        count = ", ".join(f"{sum(s.kind == k for s in report.patched_sites)} {k}" for k in patched)
        alone = sorted({_layer_free(f"{s.path}: {s.reason}") for s in report.sites if not s.patched})
        alone = [a for a in alone if "fused into" not in a]
        rows.append(
            f"| {name} | {count} | {'<br>'.join(alone) or '—'} | {report.projection.saved_fraction:.1%} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
