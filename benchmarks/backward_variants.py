"""The float16 lookup backward's launch shape and stream loads, interleaved in one process (CUDA).

    python benchmarks/backward_variants.py [--rounds 3] [--normal2]

8192 x 14336 float16, GELU tanh and SiLU, y and bits from the forward of the issue's input
(``torch.randn(shape, dtype=bfloat16).to(float16)``, "bf16-normal") and of ``(randn(shape) * 2).to(float16)``
("normal2"): the backward at (rows, warps), with dy and y loaded as usual or L2-only (".cg", leaving L1 to
the table's gathers); torch's fwd+bwd under ``torch.autograd.grad`` for scale.  ``triton.testing.do_bench``
medians, each figure the median over the rounds.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from actpatch.activations import ACTIVATIONS
from actpatch.kernels import lookup
from actpatch.kernels import triton as tk

TORCH = {"gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


def lookup_backward(dy, y, bits, act, rows, warps, stream):
    n = y.numel()
    dx = torch.empty_like(dy)
    args = (dy, y.view(torch.int16), bits, dx, lookup.backward_table(act, y.dtype, y.device), n)
    tk._launch(tk._backward_lookup_kernel, n, rows, warps, args, BF16_BY_HAND=False, STREAM=stream)
    return dx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--normal2", action="store_true", help="also GELU tanh on the normal2 input")
    args = p.parse_args()
    shape = (8192, 14336)
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_bw = 2 * 2**30 / (do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)
    n = shape[0] * shape[1]
    print(f"copy {copy_bw / 1e12:.3f} TB/s; fp16 backward floor {n * 6.125 / copy_bw * 1e3:.4f} ms")
    inputs = {"bf16-normal": torch.randn(shape, device="cuda", dtype=torch.bfloat16).to(torch.float16)}
    if args.normal2:
        inputs["normal2"] = (torch.randn(shape, device="cuda") * 2).to(torch.float16)
    dy = torch.randn(shape, device="cuda").to(torch.float16)
    cases = {}
    for iname, x in inputs.items():
        for name in ("gelu_tanh", "silu") if iname == "bf16-normal" else ("gelu_tanh",):
            act = ACTIVATIONS[name]
            y, bits = tk.forward(x, act)
            dx0 = tk.backward(dy, y, bits, act).view(torch.int16)
            shapes = ((64, 2), (128, 2), (256, 2)) if iname == "bf16-normal" else ((64, 2), (128, 2))
            for rows, warps in shapes:
                for stream in (False, True):
                    dx = lookup_backward(dy, y, bits, act, rows, warps, stream).view(torch.int16)
                    assert torch.equal(dx, dx0), (iname, name, rows, warps, stream)
                    label = f"{iname} {name} bwd {rows}x{warps}{' .cg' if stream else ''}"
                    cases[label] = lambda y=y, b=bits, a=act, r=rows, w=warps, s=stream: lookup_backward(
                        dy, y, b, a, r, w, s
                    )
            if iname == "bf16-normal":
                xg = x.detach().requires_grad_()
                cases[f"{iname} {name} torch fwd+bwd"] = lambda xg=xg, f=TORCH[name]: torch.autograd.grad(
                    f(xg), xg, dy
                )
    times: dict[str, list[float]] = {c: [] for c in cases}
    for _ in range(args.rounds):
        for c, fn in cases.items():
            times[c].append(float(do_bench(fn, warmup=25, rep=100, return_mode="median")))
    for c, t in times.items():
        print(f"{c:40s} {statistics.median(t):.4f}  ({' '.join(f'{v:.4f}' for v in t)})")


if __name__ == "__main__":
    main()
