"""Norms that keep their output: fwd+bwd time and saved bytes against the eager modules (CUDA).

For nn.LayerNorm (affine) and Hugging Face's LlamaRMSNorm at rows x hidden (each width given), each followed
by the Linear that saves the norm's output anyway: the eager module against ``actpatch.functional.layer_norm``
/ ``rms_norm_from_output`` (keep_output=True), fwd+bwd through ``torch.autograd.grad`` timed with
``triton.testing.do_bench`` (wall: the GPU's time, or the CPU's where launching is the slower) and, for
LayerNorm, ``do_bench_cudagraph`` (the kernels alone: one CUDA graph of the steps; LlamaRMSNorm's steps
failed to capture on torch 2.11, cudaErrorStreamCaptureImplicit), and the bytes autograd keeps for norm +
Linear (``actpatch.measure``).

    python3 benchmarks/norm_output.py [--rows 16384] [--hidden 768 1024 2048 4096] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton.testing
from transformers.models.llama.modeling_llama import LlamaRMSNorm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actpatch import functional  # noqa: E402
from actpatch.measure import saved_bytes  # noqa: E402


class _Then(torch.nn.Module):
    """norm(x) then a Linear (which saves the norm's output)."""

    def __init__(self, norm, hidden: int) -> None:
        super().__init__()
        self.norm, self.linear = norm, torch.nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        return self.linear(self.norm(x))


def _variants(hidden: int) -> dict:
    ln = torch.nn.LayerNorm(hidden)
    rms = LlamaRMSNorm(hidden)
    for m in (ln, rms):
        with torch.no_grad():
            m.weight.normal_(1.0, 0.1)
    with torch.no_grad():
        ln.bias.normal_(0.0, 0.1)
    actpatch_ln = lambda x: functional.layer_norm(x, (hidden,), ln.weight, ln.bias, ln.eps, keep_output=True)  # noqa: E731
    actpatch_rms = lambda x: functional.rms_norm_from_output(  # noqa: E731
        x, rms.weight, rms.variance_epsilon, "llama", keep_output=True
    )
    return {"LayerNorm": (ln, actpatch_ln), "LlamaRMSNorm": (rms, actpatch_rms)}


HEADER = (
    "| norm | hidden | wall: eager ms | actpatch ms | ratio | graph: eager ms | actpatch ms | ratio "
    "| saved B/row norm+Linear eager | actpatch |"
)


def _time(fn, x: torch.Tensor, params: list, graph: bool) -> tuple[float, float]:
    """(wall ms, CUDA-graph ms where ``graph``, else nan) of one fwd+bwd."""
    dy = torch.randn_like(x)

    def step():
        y = fn(x)
        torch.autograd.grad(y, [x, *params], dy)

    wall = triton.testing.do_bench(step, warmup=25, rep=200)
    return wall, triton.testing.do_bench_cudagraph(step, rep=50) if graph else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--hidden", type=int, nargs="+", default=[4096])
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    args = p.parse_args()
    dt = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.rows} rows, {args.dtype}")
    print(HEADER + "\n" + "|---" * 10 + "|")
    for hidden in args.hidden:
        x = torch.randn(args.rows, hidden, device="cuda", dtype=dt, requires_grad=True)
        for name, (module, ours) in _variants(hidden).items():
            module = module.to("cuda", dt)
            params = list(module.parameters())
            graph = name == "LayerNorm"
            (eager_ms, eager_g), (ours_ms, ours_g) = (_time(f, x, params, graph) for f in (module, ours))
            sizes = []
            for fn in (module, ours):
                net = _Then(module, hidden).to("cuda", dt)
                net.norm = fn if isinstance(fn, torch.nn.Module) else _Lambda(fn, module)
                nbytes, _ = saved_bytes(net, {"x": x})
                sizes.append(nbytes / args.rows)
            print(
                f"| {name} | {hidden} | {eager_ms:.3f} | {ours_ms:.3f} | {ours_ms / eager_ms:.3f} "
                f"| {eager_g:.3f} | {ours_g:.3f} | {ours_g / eager_g:.3f} "
                f"| {sizes[0]:,.0f} | {sizes[1]:,.0f} |"
            )


class _Lambda(torch.nn.Module):
    """``fn`` as a module owning ``module``'s parameters (so they are not counted as saved)."""

    def __init__(self, fn, module: torch.nn.Module) -> None:
        super().__init__()
        self.fn, self.module = fn, module

    def forward(self, x):
        return self.fn(x)


if __name__ == "__main__":
    main()
