"""The float32 backward's load order and launch shape, and the bf16 lookup backward's shape (CUDA).

    python benchmarks/backward_variants.py [--rounds 3]

float32 (``_backward_kernel``, SiLU's inverse table, 8192 x 14336): dy and y loaded as the code has them
("as is"), as volatile loads with dy first ("early": issued together before the index arithmetic), or
L2-only (".cg"), each at several (rows, warps); bf16 lookup backward at three shapes.  Interleaved rounds of
``triton.testing.do_bench`` medians; the figure is the median over rounds.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from triton.testing import do_bench

from actpatch.activations import ACTIVATIONS, table_for
from actpatch.kernels import lookup
from actpatch.kernels import triton as tk
from actpatch.kernels.reference import device_coefficients


def float32_backward(dy, y, bits, act, rows, warps, early):
    n = y.numel()
    dx = torch.empty_like(dy)
    table = table_for(act)
    coef = device_coefficients(act, table, y.device)
    scalars = tk._table_scalars(table)
    tk._launch(
        tk._backward_kernel, n, rows, warps, (dy, y, bits, dx, coef, n), **scalars, STRIDE=coef.shape[1],
        GPU=True, BF16_BY_HAND=False, EARLY=early,
    )  # fmt: skip
    return dx


def lookup_backward(dy, y, bits, act, rows, warps):
    n = y.numel()
    dx = torch.empty_like(dy)
    args = (dy, y.view(torch.int16), bits, dx, lookup.backward_table(act, y.dtype, y.device), n)
    tk._launch(tk._backward_lookup_kernel, n, rows, warps, args, BF16_BY_HAND=False)
    return dx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    shape = (8192, 14336)
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_bw = 2 * 2**30 / (do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)
    n = shape[0] * shape[1]
    print(f"copy {copy_bw / 1e12:.3f} TB/s; float32 backward floor {n * 12.125 / copy_bw * 1e3:.4f} ms")
    act = ACTIVATIONS["silu"]
    cases = {}
    x = torch.randn(shape, device="cuda")
    dy = torch.randn_like(x)
    y, bits = tk.forward(x, act)
    dx0 = tk.backward(dy, y, bits, act)
    for early, label in ((0, "as is"), (1, "early"), (2, ".cg")):
        assert torch.equal(float32_backward(dy, y, bits, act, 128, 8, early), dx0), label
        for rows, warps in ((128, 8), (128, 4), (64, 2), (256, 8)):
            name = f"fp32 bwd silu {label} {rows}x{warps}"
            cases[name] = lambda r=rows, w=warps, e=early: float32_backward(dy, y, bits, act, r, w, e)
    xb = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    dyb = torch.randn_like(xb)
    yb, bitsb = tk.forward(xb, act)
    for rows, warps in ((64, 2), (128, 2), (256, 4)):
        cases[f"bf16 lookup bwd silu {rows}x{warps}"] = lambda r=rows, w=warps: lookup_backward(
            dyb, yb, bitsb, act, r, w
        )
    times: dict[str, list[float]] = {c: [] for c in cases}
    for _ in range(args.rounds):
        for c, fn in cases.items():
            times[c].append(float(do_bench(fn, warmup=25, rep=100, return_mode="median")))
    for c, t in times.items():
        print(f"{c:36s} {statistics.median(t):.4f}  ({' '.join(f'{v:.4f}' for v in t)})")


if __name__ == "__main__":
    main()
