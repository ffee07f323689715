"""Saved bytes of tiny models under torch.compile, on the CPU: eager and compiled, unpatched and patched.

    python benchmarks/compiled_bytes.py [--backend inductor|aot_eager] [--models llama gpt2 bert]

Tiny versions of ``benchmarks/train_step.py``'s models (same classes and structure: Llama-3 layers with GQA,
GPT-2, BERT; hidden 64, 2 layers, batch 2, seq 32, float32, SDPA attention), patched with
``actpatch.patch_model``'s defaults.  Bytes: the unique storages autograd saves in one forward
(``actpatch.measure.saved_bytes``, parameters excluded), the compiled model measured after a first call
that compiles it; ``torch.autograd.graph.saved_tensors_hooks`` sees what the compiled graph's partition
saves for its backward.
"""

from __future__ import annotations

import argparse
import sys

import torch

import actpatch
from actpatch import measure

VOCAB = 100
MODES = ("eager", "eager patched", "compiled", "compiled patched")


# name: (config class, model class, loss type, config) of transformers
LAYERS = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 128}
GQA = {"intermediate_size": 224, "num_key_value_heads": 2}
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "ForCausalLM", LAYERS | GQA),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", "ForCausalLM", {"n_layer": 2, "n_embd": 64, "n_head": 4}),
    "bert": ("BertConfig", "BertForMaskedLM", "ForMaskedLM", LAYERS | {"intermediate_size": 256}),
}


def build(name: str):
    """The tiny model, in training mode, its loss named (transformers' warning of an unnamed loss breaks
    the graph)."""
    import transformers

    config_class, model_class, loss, config = MODELS[name]
    config = getattr(transformers, config_class)(**config, vocab_size=VOCAB)
    model = getattr(transformers, model_class)(config)
    model.loss_type = loss
    return model.train()


def saved(model, inputs: dict) -> int:
    """Bytes saved by one forward (the same dropout draws in every mode); its backward run and cleared."""
    torch.manual_seed(1)
    nbytes, out = measure.saved_bytes(model, inputs)
    out.loss.backward()
    for p in model.parameters():
        p.grad = None
    return nbytes


def four_modes(name: str, backend: str) -> dict[str, int]:
    torch.manual_seed(0)
    model = build(name)
    ids = torch.randint(0, VOCAB, (2, 32))
    inputs = {"input_ids": ids, "labels": ids}
    out = {}
    for mode in MODES:
        if mode.endswith("patched"):
            actpatch.patch_model(model, example_inputs=inputs)
        run = model
        if mode.startswith("compiled"):
            torch._dynamo.reset()
            run = torch.compile(model, backend=backend, fullgraph=True)
            saved(run, inputs)  # compiles
        out[mode] = saved(run, inputs)
        actpatch.unpatch_model(model)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager"))
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = p.parse_args()
    print("| model | " + " | ".join(MODES) + " |\n|---|" + "---|" * len(MODES))
    for name in args.models:
        res = four_modes(name, args.backend)
        print(f"| {name} | " + " | ".join(f"{res[m]:,}" for m in MODES) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
