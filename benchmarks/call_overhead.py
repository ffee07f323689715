"""CPU time per call: what a training step that cannot keep the GPU busy pays for each activation.

    python benchmarks/call_overhead.py [--device cuda] [--calls 2000]

Forward + backward of a 4096-element bf16 tensor (the GPU finishes each kernel long before the CPU
launches the next), wall time per call over ``--calls`` calls, for torch's F.gelu, actpatch's eager path
(``actpatch.functional.gelu``: an autograd.Function) and how much of it its two launchers take, an
autograd.Function that saves two tensors and launches nothing (the floor of any op written in Python),
the custom op through the dispatcher (``torch.ops.actpatch.gelu``, what torch.compile calls), and the
raw kernel launchers (``actpatch.kernels.ops.activation_forward`` / ``_backward``); then the other sites'
eager paths against what they replace, on [16, 256] rows: ``silu_mul`` against ``F.silu(a) * b``,
``rms_norm`` against Hugging Face's LlamaRMSNorm, ``dropout`` (p = 0.1) against ``F.dropout``.  The
machine's CPU speed varies between sessions: compare rows of one run.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import actpatch.functional as AF
from actpatch.kernels import ops

WARMUP = 100


def per_call_us(fn, calls: int, device: str) -> float:
    for _ in range(WARMUP):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


class LaunchesNothing(torch.autograd.Function):
    """Saves its output twice, as the inverted activation saves y and its bits; computes nothing."""

    @staticmethod
    def forward(ctx, x):
        y = torch.empty_like(x)
        ctx.save_for_backward(y, y)
        return y

    @staticmethod
    def backward(ctx, dy):
        _y, _also_y = ctx.saved_tensors
        return torch.empty_like(dy)


def launcher_split_us(fn, calls: int, device: str) -> tuple[float, float]:
    """µs per call of ``fn`` spent inside ``ops.activation_forward`` and inside ``ops.activation_backward``
    (which autograd runs on its own thread for CUDA tensors)."""
    spent = {"activation_forward": 0.0, "activation_backward": 0.0}
    originals = {name: getattr(ops, name) for name in spent}

    def timed(name):
        def run(*args):
            t0 = time.perf_counter()
            try:
                return originals[name](*args)
            finally:
                spent[name] += time.perf_counter() - t0

        return run

    for name in spent:
        setattr(ops, name, timed(name))
    try:
        per_call_us(fn, calls, device)
    finally:
        for name, original in originals.items():
            setattr(ops, name, original)
    return tuple(spent[name] / (WARMUP + calls) * 1e6 for name in spent)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument(
        "--profile", action="store_true", help="cProfile actpatch's eager path: where its time goes"
    )
    args = p.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    x = torch.randn(4096, device=args.device, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    y, bits = ops.activation_forward("gelu", x.detach())
    cases = {
        "torch F.gelu": lambda: F.gelu(x).backward(dy),
        "actpatch.functional.gelu (eager path)": lambda: AF.gelu(x).backward(dy),
        "autograd.Function launching nothing": lambda: LaunchesNothing.apply(x).backward(dy),
        "torch.ops.actpatch.gelu (custom op)": lambda: torch.ops.actpatch.gelu(x)[0].backward(dy),
        "kernel launchers only (fwd + bwd)": lambda: ops.activation_backward(
            "gelu", dy, *ops.activation_forward("gelu", x.detach())
        ),
        "backward launcher only": lambda: ops.activation_backward("gelu", dy, y, bits),
    }
    a, b = (torch.randn(16, 256, device=args.device, dtype=dtype, requires_grad=True) for _ in range(2))
    dm = torch.randn_like(a)
    norm = LlamaRMSNorm(256).to(device=args.device, dtype=dtype)
    cases |= {
        "torch F.silu(a) * b": lambda: (F.silu(a) * b).backward(dm),
        "actpatch.functional.silu_mul": lambda: AF.silu_mul(a, b).backward(dm),
        "LlamaRMSNorm (eager)": lambda: norm(a).backward(dm),
        "actpatch.functional.rms_norm": lambda: AF.rms_norm(a, norm.weight, 1e-6).backward(dm),
        "torch F.dropout": lambda: F.dropout(a, 0.1).backward(dm),
        "actpatch.functional.dropout": lambda: AF.dropout(a, 0.1).backward(dm),
    }
    for name, fn in cases.items():
        print(f"{name:<40} {per_call_us(fn, args.calls, args.device):8.1f} µs per call", flush=True)
        if name.endswith("(eager path)"):
            fwd, bwd = launcher_split_us(fn, args.calls, args.device)
            print(f"{'  of which in the forward launcher':<40} {fwd:8.1f}")
            print(
                f"{'  of which in the backward launcher':<40} {bwd:8.1f}  (on autograd's thread)", flush=True
            )
    if args.profile:
        import cProfile
        import pstats

        with cProfile.Profile() as prof:
            per_call_us(cases["actpatch.functional.gelu (eager path)"], args.calls, args.device)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
