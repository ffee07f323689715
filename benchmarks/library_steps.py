"""Training steps and saved bytes of other libraries' LLMs, eager against patch_model's defaults, measured as
``benchmarks/train_step.py`` measures the Hugging Face models (same options; its protocol).

    python benchmarks/library_steps.py [--device cuda] [--models ...] [--rounds 3] [--json FILE]
    python benchmarks/library_steps.py --device cpu --quick         # smoke test with tiny shapes

Models, built from each library's own classes with random weights, bf16 on CUDA, in training mode, loss = the
mean cross entropy of the logits against the input tokens (a ``LossOf`` wrapper gives train_step.py's
``input_ids``/``labels`` interface; its paths gain the prefix ``model.``):

- torchtitan-llama3-8b-layer: torchtitan's Llama 3 ``Transformer`` at Llama-3-8B's layer shape (dim 4096,
  32 heads, 8 KV heads, FFN 14336, vocab 128256), batch 2 x seq 4096 (the Hugging Face llama3-8b-layer's);
- litgpt-llama3-8b-layer: litgpt's ``GPT`` with ``Config.from_name("Llama-3-8B")``, the same shape;
- torchtune-llama3-8b-layer: torchtune's ``llama3`` builder, the same shape;
- litgpt-pythia-1b: litgpt's ``GPT`` with ``Config.from_name("pythia-1b")`` (GELU MLP called as
  ``F.gelu``, parallel residual), batch 8 x seq 2048.
"""

from __future__ import annotations

import sys
import types

import torch
import train_step
from torch import nn

LLAMA3_8B = dict(dim=4096, heads=32, kv_heads=8, ffn=14336, vocab=128256)


class LossOf(nn.Module):
    """``model(tokens)`` -> logits, as a model taking ``input_ids`` and ``labels`` and returning ``.loss``."""

    def __init__(self, model: nn.Module, vocab: int) -> None:
        super().__init__()
        self.model = model
        self.config = types.SimpleNamespace(vocab_size=vocab)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> types.SimpleNamespace:
        logits = self.model(input_ids)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        return types.SimpleNamespace(loss=loss)


def _titan(layers: int, quick: bool) -> nn.Module:
    from torchtitan.models.llama3.model.args import TransformerModelArgs
    from torchtitan.models.llama3.model.model import Transformer

    s = dict(dim=64, heads=4, kv_heads=2, ffn=128, vocab=256) if quick else LLAMA3_8B
    args = TransformerModelArgs(  # Llama-3-8B: FFN 1.3 x 8/3 x 4096 rounded up to 1024s = 14336
        dim=s["dim"], n_layers=layers, n_heads=s["heads"], n_kv_heads=s["kv_heads"], vocab_size=s["vocab"],
        multiple_of=32 if quick else 1024, ffn_dim_multiplier=None if quick else 1.3, max_seq_len=4096,
    )  # fmt: skip
    model = Transformer(args)
    with torch.no_grad():
        model.init_weights()
    return LossOf(model, s["vocab"])


def _litgpt(name: str, layers: int, quick: bool) -> nn.Module:
    from litgpt import GPT, Config

    tiny = dict(n_embd=64, n_head=4, n_query_groups=2, intermediate_size=128, vocab_size=256)
    config = Config.from_name(name, n_layer=layers, **(tiny | {"padded_vocab_size": 256} if quick else {}))
    return LossOf(GPT(config), config.padded_vocab_size)


def _tune(layers: int, quick: bool) -> nn.Module:
    from torchtune.models.llama3 import llama3

    s = dict(dim=64, heads=4, kv_heads=2, ffn=128, vocab=256) if quick else LLAMA3_8B
    model = llama3(
        vocab_size=s["vocab"], num_layers=layers, num_heads=s["heads"], num_kv_heads=s["kv_heads"],
        embed_dim=s["dim"], max_seq_len=4096, intermediate_dim=s["ffn"],
    )  # fmt: skip
    return LossOf(model, s["vocab"])


def _patch_model(model: LossOf, patched: dict) -> None:
    """patch_model with its defaults, probed on a 1 x 256 batch of the model's own tokens."""
    import actpatch

    ids = torch.randint(0, model.config.vocab_size, (1, 256), device=next(model.parameters()).device)
    actpatch.patch_model(model, example_inputs={"input_ids": ids, "labels": ids})
    patched["actpatch"] = lambda: actpatch.unpatch_model(model)


MODELS = {
    "torchtitan-llama3-8b-layer": (_titan, 2, 4096, 4, _patch_model),
    "litgpt-llama3-8b-layer": (lambda n, q: _litgpt("Llama-3-8B", n, q), 2, 4096, 4, _patch_model),
    "torchtune-llama3-8b-layer": (_tune, 2, 4096, 4, _patch_model),
    "litgpt-pythia-1b": (lambda n, q: _litgpt("pythia-1b", n, q), 8, 2048, 16, _patch_model),
}


if __name__ == "__main__":
    train_step.MODELS.clear()
    train_step.MODELS.update(MODELS)
    train_step.QUICK.clear()
    train_step.QUICK.update({name: (2, 64, 2) for name in MODELS})
    sys.exit(train_step.main())
