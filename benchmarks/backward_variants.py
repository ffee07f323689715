"""The 16-bit lookup backward's launch shape and load order, interleaved in one process (CUDA).

    python benchmarks/backward_variants.py [--rounds 3]

8192 x 14336, y and bits from the forward of the issue's input ``torch.randn(shape, dtype=bfloat16)
.to(dtype)``: ``triton._backward_lookup_kernel`` at 64 x 2 and 128 x 2 (rows x warps), and at 128 x 2 a
copy of it that also issues dy before the bits ("dy early": at 128 x 2 the bits' bytes pass through shared
memory behind a barrier, and loads written after the bits wait for them); torch's fwd+bwd under
``torch.autograd.grad`` for scale.  ``triton.testing.do_bench`` medians; each figure the median over rounds.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench

from actpatch.activations import ACTIVATIONS
from actpatch.kernels import lookup
from actpatch.kernels import triton as tk

TORCH = {"gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


@triton.jit
def _dy_early_kernel(dy_ptr, y_ptr, bits_ptr, dx_ptr, table_ptr, n_rows, ROWS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, 8)
    offs = rows[:, None] * 8 + cols[None, :]
    row_mask = rows < n_rows
    mask = tl.broadcast_to(row_mask[:, None], [ROWS, 8])
    y = tl.load(y_ptr + offs, mask=mask, other=0)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0)
    byte = tl.load(bits_ptr + rows, mask=row_mask, other=0).to(tl.int32)
    right = (byte[:, None] >> cols[None, :]) & 1
    g = tl.load(table_ptr + ((right << 16) | (y.to(tl.int32) & 0xFFFF)), mask=mask, other=0.0)
    tl.store(dx_ptr + offs, (dy.to(tl.float32) * g).to(dx_ptr.dtype.element_ty), mask=mask)


def lookup_backward(dy, y, bits, act, rows, warps):
    n = y.numel()
    dx = torch.empty_like(dy)
    launch = tk.Rows(tk._backward_lookup_kernel, rows, warps, {"BF16_BY_HAND": False}, (None, torch.int16))
    launch(n, (dy, y, bits, dx, lookup.backward_table(act, y.dtype, y.device), n))
    return dx


def dy_early(dy, y, bits, act):
    n = y.numel()
    dx = torch.empty_like(dy)
    table = lookup.backward_table(act, y.dtype, y.device)
    _dy_early_kernel[(triton.cdiv(n // 8, 128),)](dy, y.view(torch.int16), bits, dx, table, n // 8, ROWS=128,
                                                  num_warps=2)  # fmt: skip
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
    print(f"copy {copy_bw / 1e12:.3f} TB/s; 16-bit backward floor {n * 6.125 / copy_bw * 1e3:.4f} ms")
    cases = {}
    for dtype, names in ((torch.float16, ("gelu_tanh", "silu")), (torch.bfloat16, ("silu",))):
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).to(dtype)
        dy = torch.randn(shape, device="cuda").to(dtype)
        for name in names:
            act = ACTIVATIONS[name]
            y, bits = tk.forward(x, act)
            dx0 = tk.backward(dy, y, bits, act).view(torch.int16)
            pre = f"{str(dtype)[6:]} {name} bwd"
            for rows, warps in ((64, 2), (128, 2)):
                assert torch.equal(lookup_backward(dy, y, bits, act, rows, warps).view(torch.int16), dx0)
                cases[f"{pre} {rows}x{warps}"] = lambda d=dy, y=y, b=bits, a=act, r=rows, w=warps: (
                    lookup_backward(d, y, b, a, r, w)
                )
            if dtype == torch.float16:
                assert torch.equal(dy_early(dy, y, bits, act).view(torch.int16), dx0)
                cases[f"{pre} 128x2 dy early"] = lambda d=dy, y=y, b=bits, a=act: dy_early(d, y, b, a)
                xg = x.detach().requires_grad_()
                cases[f"{str(dtype)[6:]} {name} torch fwd+bwd"] = lambda d=dy, xg=xg, f=TORCH[name]: (
                    torch.autograd.grad(f(xg), xg, d)
                )
    times: dict[str, list[float]] = {c: [] for c in cases}
    for _ in range(args.rounds):
        for c, fn in cases.items():
            times[c].append(float(do_bench(fn, warmup=25, rep=100, return_mode="median")))
    for c, t in times.items():
        print(f"{c:36s} {statistics.median(t):.4f}  ({' '.join(f'{v:.4f}' for v in t)})")


if __name__ == "__main__":
    main()
