"""Train a small Llama-style model (SwiGLU MLP, RMSNorm, RoPE, GQA) from scratch, twice: once as is and once
patched with actpatch, from the same seed and data order.  Plots both loss curves and checks that the
patched curve stays within 1% of the baseline at every step.

Next-byte prediction on the docstrings of Python's standard library (see _data.py), no download.

    python examples/llama_loss_curve.py                   # 300 steps, ~2 min on 2 CPU cores
    python examples/llama_loss_curve.py --steps 500 --out docs/img/llama_loss.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _curves import max_relative_deviation, plot, train_steps
from _data import docstrings
from transformers import LlamaConfig, LlamaForCausalLM

import actpatch


def make_batches(steps: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    raw = torch.frombuffer(bytearray(" ".join(docstrings()).encode()), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(raw) - seq, (steps, batch), generator=g)
    return [torch.stack([raw[s : s + seq] for s in row.tolist()]) for row in starts]


def build(width: int, layers: int, seq: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=width, intermediate_size=int(width * 8 / 3) // 16 * 16,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq,
        tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def train(batches, args, *, patched: bool) -> tuple[list[float], float, str]:
    model = build(args.width, args.layers, args.seq, args.seed)
    model.train()
    note = ""
    if patched:
        report = actpatch.patch_model(model, batch_size=args.batch, seq_len=args.seq)
        note = (
            f"{len(report.patched_sites)} of {len(report.sites)} sites patched, projected "
            f"{100 * report.projection.saved_fraction:.1f}% less saved activation memory"
        )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    losses, seconds = train_steps(model, opt, batches, lambda x: model(input_ids=x, labels=x).loss)
    return losses, seconds, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs/img/llama_loss.png"))
    args = ap.parse_args()

    batches = make_batches(args.steps, args.batch, args.seq, args.seed)
    base, t_base, _ = train(batches, args, patched=False)
    pat, t_pat, note = train(batches, args, patched=True)
    dev, step = max_relative_deviation(base, pat)
    n_params = sum(p.numel() for p in build(args.width, args.layers, args.seq, args.seed).parameters())
    title = (
        f"Llama-style {n_params / 1e6:.1f}M params from scratch, next byte on stdlib docstrings\n"
        f"({args.steps} steps, batch {args.batch}×{args.seq})"
    )
    plot(base, pat, title, args.out)
    print(f"patched: {note}")
    print(f"loss baseline {base[0]:.4f} -> {base[-1]:.4f}; patched {pat[0]:.4f} -> {pat[-1]:.4f}")
    print(f"max relative deviation {dev:.2e} at step {step + 1} of {args.steps}")
    print(f"time baseline {t_base:.1f} s, patched {t_pat:.1f} s; plot: {args.out}")
    if dev >= 0.01:
        sys.exit(f"FAIL: patched loss deviates by {dev:.2%} (>= 1%) from the baseline")


if __name__ == "__main__":
    main()
