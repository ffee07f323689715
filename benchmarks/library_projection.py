"""Projected saved bytes per token per layer of each library's Llama-3-8B layer, eager and patched, against
Hugging Face's: a dry run of ``actpatch.analyze`` on the meta device (no weights, no GPU), bf16, batch 2 x
seq 4096, as the slope between a 2-layer and a 4-layer model (embeddings and logits drop out).

    python benchmarks/library_projection.py [--json FILE]

The models: transformers' ``LlamaForCausalLM``, torchtitan's Llama 3 ``Transformer``, litgpt's ``GPT``
(``Config.from_name("Llama-3-8B")``) and torchtune's ``llama3`` builder, each at dim 4096, 32 heads, 8 KV
heads, FFN 14336, vocab 128256; and litgpt's Pythia-1b at batch 8 x seq 2048.  The projection is what the
tests check against measured bytes (within 2%, tests/test_libraries.py); on a GPU the fused attention keeps
what the dry run assumes (``analysis.probe.fused_sdpa``).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from library_steps import LLAMA3_8B, _litgpt, _titan, _tune

import actpatch


def _hf(layers: int, quick: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    s = LLAMA3_8B
    config = LlamaConfig(
        hidden_size=s["dim"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        intermediate_size=s["ffn"], vocab_size=s["vocab"], num_hidden_layers=layers,
        max_position_embeddings=8192,
    )  # fmt: skip
    return LlamaForCausalLM(config)


MODELS = {  # name: (builder(layers, quick), batch, seq)
    "transformers-llama3-8b-layer": (_hf, 2, 4096),
    "torchtitan-llama3-8b-layer": (_titan, 2, 4096),
    "litgpt-llama3-8b-layer": (lambda n, q: _litgpt("Llama-3-8B", n, q), 2, 4096),
    "torchtune-llama3-8b-layer": (_tune, 2, 4096),
    "litgpt-pythia-1b": (lambda n, q: _litgpt("pythia-1b", n, q), 8, 2048),
}


def per_layer(name: str) -> dict:
    build, batch, seq = MODELS[name]
    bytes_at = {}
    for layers in (2, 4):
        with torch.device("meta"):
            model = build(layers, False)
        model = model.to(torch.bfloat16).train()
        ids = torch.zeros(1, 256, dtype=torch.long, device="meta")
        inputs = {"input_ids": ids} if name.startswith("transformers") else {"input_ids": ids, "labels": ids}
        p = actpatch.analyze(model, example_inputs=inputs, batch_size=batch, seq_len=seq).projection
        bytes_at[layers] = (p.activation_bytes_before, p.activation_bytes_after)
    tokens = batch * seq
    slope = [(bytes_at[4][i] - bytes_at[2][i]) / 2 / tokens for i in (0, 1)]
    return {"batch": batch, "seq": seq, "eager": slope[0], "patched": slope[1]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {}
    for name in args.models:
        r = results[name] = per_layer(name)
        print(
            f"{name}: B/token/layer eager {r['eager']:,.0f} patched {r['patched']:,.0f} "
            f"({r['patched'] / r['eager']:.3f}; batch {r['batch']} x seq {r['seq']}, bf16, dry run)",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
