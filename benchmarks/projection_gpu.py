"""Check actpatch's memory projection against a real forward, unpatched and patched.

On CUDA the reference is ``torch.cuda.memory_allocated()`` after a training forward minus before it
(the loss is the only output kept); on CPU (``--device cpu``, smaller shapes) it is the bytes of the
unique non-parameter storages autograd saves.  Three models, random weights, built from configs:
a GPT-2-medium-shaped, a BERT-base-shaped and a Llama-shaped model (bf16 on CUDA, fp32 on CPU).

    python benchmarks/projection_gpu.py                 # CUDA, bf16
    python benchmarks/projection_gpu.py --device cpu    # small shapes, fp32
"""

from __future__ import annotations

import argparse
import gc

import torch
import transformers as tf

import actpatch
from actpatch.analysis.inputs import input_spec
from actpatch.measure import saved_bytes

MODELS = {
    "gpt2-medium (4 layers)": lambda: (tf.GPT2Config(n_layer=4, n_embd=1024, n_head=16), tf.GPT2LMHeadModel),
    "bert-base": lambda: (tf.BertConfig(), tf.BertForMaskedLM),
    "llama (4 layers, 8B shape)": lambda: (
        tf.LlamaConfig(
            num_hidden_layers=4,
            hidden_size=4096,
            intermediate_size=14336,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
        ),
        tf.LlamaForCausalLM,
    ),
}
CPU_MODELS = {
    "gpt2-small-ish (2 layers)": lambda: (tf.GPT2Config(n_layer=2, n_embd=256, n_head=4), tf.GPT2LMHeadModel),
    "bert (2 layers, 256)": lambda: (
        tf.BertConfig(num_hidden_layers=2, hidden_size=256, intermediate_size=1024, num_attention_heads=4),
        tf.BertForMaskedLM,
    ),
    "llama (2 layers, 256)": lambda: (
        tf.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=256,
            intermediate_size=896,
            num_attention_heads=8,
            num_key_value_heads=2,
            vocab_size=8000,
        ),
        tf.LlamaForCausalLM,
    ),
}


def measured_bytes(model: torch.nn.Module, kwargs: dict, device: torch.device) -> int:
    """Activation bytes one training forward leaves allocated (CUDA) or saved for backward (CPU)."""
    torch.manual_seed(0)
    if device.type == "cuda":
        with torch.no_grad():  # warm-up: cuBLAS workspaces and kernels' buffers are not activations
            model(**kwargs)
        gc.collect()
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        loss = model(**kwargs).loss
        torch.cuda.synchronize()
        used = torch.cuda.memory_allocated() - start
        del loss
        return used
    nbytes, out = saved_bytes(model, kwargs)
    del out
    return nbytes


def run(device: torch.device, batch: int, seq: int) -> list[tuple]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    for name, build in (MODELS if device.type == "cuda" else CPU_MODELS).items():
        config, cls = build()
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        model = cls(config).to(device=device, dtype=dtype).train()
        s = min(seq, getattr(config, "max_position_embeddings", seq))  # BERT: 512 positions
        _, kwargs = input_spec(model).make(batch, s)
        report = actpatch.analyze(model, batch_size=batch, seq_len=s)
        before = measured_bytes(model, kwargs, device)
        actpatch.patch_model(model, batch_size=batch, seq_len=s)
        after = measured_bytes(model, kwargs, device)
        p = report.projection
        rows.append((f"{name}, seq {s}", p.activation_bytes_before, before, p.activation_bytes_after, after))
        del model, kwargs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = args.batch or (4 if device.type == "cuda" else 2)
    seq = args.seq or (1024 if device.type == "cuda" else 128)
    what = "cuda.memory_allocated delta" if device.type == "cuda" else "saved-tensor bytes"
    print(f"device {device}, batch {batch} x seq {seq}; measured = {what}")
    print(
        f"{'model':36} {'projected':>14} {'measured':>14} {'err':>7} | "
        f"{'proj. patched':>14} {'measured':>14} {'err':>7}"
    )
    for name, pb, mb, pa, ma in run(device, batch, seq):
        print(
            f"{name:36} {pb:14,} {mb:14,} {100 * (pb - mb) / mb:6.2f}% | "
            f"{pa:14,} {ma:14,} {100 * (pa - ma) / ma:6.2f}%"
        )


if __name__ == "__main__":
    main()
