"""Norms that keep their output: fwd+bwd time and saved bytes against the eager modules (CUDA).

For nn.LayerNorm (affine) and Hugging Face's LlamaRMSNorm at rows x hidden in bf16, each followed by the
Linear that saves the norm's output anyway: the eager module against ``actpatch.functional.layer_norm`` /
``rms_norm_from_output`` (keep_output=True), fwd+bwd through ``torch.autograd.grad`` timed with
``triton.testing.do_bench``, and the bytes autograd keeps for norm + Linear (``actpatch.measure``).

    python3 benchmarks/norm_output.py [--rows 16384] [--hidden 4096]
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


def _time(fn, x: torch.Tensor, params: list) -> float:
    dy = torch.randn_like(x)

    def step():
        y = fn(x)
        torch.autograd.grad(y, [x, *params], dy)

    return triton.testing.do_bench(step, warmup=25, rep=200)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=4096)
    args = p.parse_args()
    dt = torch.bfloat16
    x = torch.randn(args.rows, args.hidden, device="cuda", dtype=dt, requires_grad=True)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.rows} x {args.hidden} bf16")
    print("| norm | eager ms | actpatch ms | ratio | saved B/row norm+Linear eager | actpatch |")
    print("|---|---|---|---|---|---|")
    for name, (module, ours) in _variants(args.hidden).items():
        module = module.to("cuda", dt)
        params = list(module.parameters())
        eager_ms, ours_ms = _time(module, x, params), _time(ours, x, params)
        sizes = []
        for fn in (module, ours):
            net = _Then(module, args.hidden).to("cuda", dt)
            net.norm = fn if isinstance(fn, torch.nn.Module) else _Lambda(fn, module)
            nbytes, _ = saved_bytes(net, {"x": x})
            sizes.append(nbytes / args.rows)
        ratio = ours_ms / eager_ms
        row = f"| {name} | {eager_ms:.3f} | {ours_ms:.3f} | {ratio:.3f} | {sizes[0]:,.0f} | {sizes[1]:,.0f} |"
        print(row)


class _Lambda(torch.nn.Module):
    """``fn`` as a module owning ``module``'s parameters (so they are not counted as saved)."""

    def __init__(self, fn, module: torch.nn.Module) -> None:
        super().__init__()
        self.fn, self.module = fn, module

    def forward(self, x):
        return self.fn(x)


if __name__ == "__main__":
    main()
