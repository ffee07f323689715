"""Projection against a real forward at batch 1 and 2 (CPU): the reliability issue's item 7.

GPT-2 (12 layers) and a Pythia-1b-shaped GPT-NeoX (4 layers), random weights, float32, seq 128: the
bytes ``actpatch.analyze`` projects before patching against what autograd saves in one forward
(``actpatch.measure.saved_bytes``), with and without an attention mask.

    python benchmarks/projection_batch1.py
"""

from __future__ import annotations

import torch
import transformers as tf

import actpatch
from actpatch.analysis.inputs import input_spec
from actpatch.measure import saved_bytes

CONFIGS = {
    "gpt2": tf.GPT2Config(),
    "pythia-1b shape, 4 layers": tf.GPTNeoXConfig(
        num_hidden_layers=4, hidden_size=2048, intermediate_size=8192, num_attention_heads=8, rotary_pct=0.25
    ),
}


def main(seq: int = 128) -> None:
    print("| model | batch | attention mask | projected | measured | error |")
    print("|---|---|---|---|---|---|")
    for name, config in CONFIGS.items():
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config)
        for batch in (1, 2):
            _, kwargs = input_spec(model).make(batch, seq)
            report = actpatch.analyze(model, batch_size=batch, seq_len=seq)
            projected = report.projection.activation_bytes_before
            for mask in (False, True):
                extra = {"attention_mask": torch.ones(batch, seq, dtype=torch.long)} if mask else {}
                measured, _ = saved_bytes(model, {**kwargs, **extra})
                error = projected / measured - 1
                print(f"| {name} | {batch} | {mask} | {projected:,} | {measured:,} | {error:+.2%} |")


if __name__ == "__main__":
    main()
