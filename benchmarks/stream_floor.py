"""What the backward's memory traffic alone costs: kernels with its tiling and streams but no inverse math.

    python benchmarks/stream_floor.py [--shape 8192 14336]        # CUDA, bf16

The backward reads dy, y and the bits and writes dx.  Here the same [ROWS, 8] tiles, masks and launch
shape move the same bytes with trivial arithmetic (dx = dy·y on one branch, dy on the other), and a second
kernel drops the bits stream (dx = dy·y).  Against the device copy and actpatch's backward, the gap between
"streams" and "actpatch" is what the inverse-derivative arithmetic costs; "streams" against "copy" is what
the access pattern costs.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from actpatch.activations import ACTIVATIONS
from actpatch.kernels import triton as tk


@triton.jit
def _streams_kernel(dy_ptr, y_ptr, bits_ptr, dx_ptr, n_rows, ROWS: tl.constexpr, BITS: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, 8)
    offs = rows[:, None] * 8 + cols[None, :]
    row_mask = rows < n_rows
    mask = tl.broadcast_to(row_mask[:, None], [ROWS, 8])
    y = tl.load(y_ptr + offs, mask=mask, other=0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0).to(tl.float32)
    dx = dy * y
    if BITS:
        byte = tl.load(bits_ptr + rows, mask=row_mask, other=0).to(tl.int32)
        right = ((byte[:, None] >> cols[None, :]) & 1) != 0
        dx = tl.where(right, dy, dx)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs="+", default=[8192, 14336])
    args = p.parse_args()
    x = (torch.randn(args.shape, device="cuda") * 2).to(torch.bfloat16)
    dy = torch.randn_like(x)
    act = ACTIVATIONS["silu"]
    y, bits = tk.forward(x, act)
    dx = torch.empty_like(x)
    n = x.numel()
    assert n % 8 == 0, "a whole number of rows of 8"
    rows, warps = tk.LOOKUP_BACKWARD_ROWS, tk.LOOKUP_BACKWARD_WARPS
    grid = (triton.cdiv(n // 8, rows),)
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_bw = 2 * 2**30 / (do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)
    s = x.element_size()

    def streams(with_bits: bool):
        kernel = _streams_kernel[grid]
        return lambda: kernel(dy, y, bits, dx, n // 8, ROWS=rows, BITS=with_bits, num_warps=warps)

    cases = {  # name: (function, bytes moved per element)
        "streams: dy, y, bits -> dx": (streams(True), 3 * s + 1 / 8),
        "streams: dy, y -> dx": (streams(False), 3 * s),
        "actpatch backward (silu)": (lambda: tk.backward(dy, y, bits, act), 3 * s + 1 / 8),
        "torch silu_backward: dy, x -> dx": (lambda: torch.ops.aten.silu_backward(dy, x), 3 * s),
    }
    print(f"bf16 {list(x.shape)}, launch rows {rows} x warps {warps}; copy {copy_bw / 1e12:.3f} TB/s")
    for name, (fn, per_elem) in cases.items():
        ms = do_bench(fn, return_mode="median")
        print(f"{name:36} {ms:.4f} ms  {100 * n * per_elem / (ms * 1e-3) / copy_bw:5.1f}% of copy")


if __name__ == "__main__":
    main()
