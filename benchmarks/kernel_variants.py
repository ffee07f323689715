"""Kernel variants for issue 17's fp16 and gated targets, interleaved in one process (CUDA, 8192 x 14336).

    python benchmarks/kernel_variants.py [--rounds 3] [--json out.json]

Each round times every variant once (``triton.testing.do_bench`` medians); the figures are medians over
rounds.  Inputs: the issue's ``torch.randn(shape, dtype=bfloat16).to(float16)`` ("bf16-normal": values on
the bf16 grid) and ``(torch.randn(shape) * 2).to(float16)`` ("normal2": every fp16 bit used).

- fp16 forwards: the table read by x's bits ("table") or by x's bits rotated right by 3 ("rotated": the
  values of a bf16-grid input then sit side by side, as in a bf16 table), with the streams' loads marked
  evict-first (s1) or L2-only (s2); the arithmetic forwards ("arith"; SiLU also with div.rn's fast path
  and no slow-path branch, "arith fast div"), each checked bitwise against torch on every fp16 value.
- fp16 lookup backward: as it is, dy issued before y (volatile loads keep their order, "early"),
  streams evict-first / L2-only, and launch shapes.
- silu_mul backward (bf16): as it is, and dm and k issued first ("early"), at several launch shapes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from actpatch.activations import ACTIVATIONS
from actpatch.activations.sigmoid_gated import quick_gelu_forward
from actpatch.kernels import lookup
from actpatch.kernels import triton as tk
from actpatch.kernels import triton_gated as tg
from actpatch.kernels.bits import packed_size

TORCH = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "quick_gelu": quick_gelu_forward,
}


def rotated(table: torch.Tensor) -> torch.Tensor:
    """table[i] moved to index rotr3(i) (16-bit rotation right by 3)."""
    j = torch.arange(65536, device=table.device)
    return table[((j << 3) | (j >> 13)) & 0xFFFF].contiguous()


def lookup_forward(x, act, table, rows=tk.LOOKUP_FORWARD_ROWS, warps=tk.LOOKUP_FORWARD_WARPS, **knobs):
    n = x.numel()
    y = torch.empty_like(x)
    bits = torch.empty(packed_size(n), dtype=torch.uint8, device=x.device)
    args = (x.view(torch.int16), y.view(torch.int16), bits, table, n)
    kernel = tk._kernel(tk._forward_lookup_kernel, x.device)[0]
    tk._launch(kernel, n, rows, warps, args, x_star=tk._f32(act.x_star), FP16=True, **knobs)
    return y, bits


def arith_forward(x, act, **knobs):
    n = x.numel()
    y = torch.empty_like(x)
    bits = torch.empty(packed_size(n), dtype=torch.uint8, device=x.device)
    kernel, compiled = tk._kernel(tk._forward_kernel, x.device)
    tk._launch(
        kernel, n, tk.FORWARD_ROWS, tk.FORWARD_WARPS, (x, y, bits, n), x_star=tk._f32(act.x_star),
        ACT=tk.ACT_CODES[act.name], ROUND_INTERMEDIATE=True, LIBDEVICE=compiled, BF16_BY_HAND=False, **knobs,
    )  # fmt: skip
    return y, bits


def lookup_backward(dy, y, bits, act, rows=64, warps=2, **knobs):
    n = y.numel()
    dx = torch.empty_like(dy)
    args = (dy, y.view(torch.int16), bits, dx, lookup.backward_table(act, y.dtype, y.device), n)
    kernel = tk._kernel(tk._backward_lookup_kernel, y.device)[0]
    tk._launch(kernel, n, rows, warps, args, BF16_BY_HAND=False, **knobs)
    return dx


def gated_backward(dm, m, k, bits, rows=64, warps=4, **knobs):
    n = dm.numel()
    da, db = torch.empty_like(dm), torch.empty_like(dm)
    args = (dm, m, k, bits, bits, da, db, n, packed_size(n))
    top = float(torch.finfo(dm.dtype).max)
    kernel, compiled = tk._kernel(tg._backward_kernel, dm.device)
    tk._launch(kernel, n, rows, warps, args, top=top, ACT=2, LIBDEVICE=compiled, TABLE=False, **knobs)
    return da, db


def same_bits(a, b) -> int:
    """Number of values whose bits differ (any NaN equals any NaN)."""
    same = (a.view(torch.int16) == b.view(torch.int16)) | (a.isnan() & b.isnan())
    return int((~same).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=2, default=[8192, 14336])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    shape = args.shape

    def bench(fn) -> float:
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_bw = 2 * 2**30 / (bench(lambda: dst.copy_(src)) * 1e-3)
    n = shape[0] * shape[1]
    out: dict = {"device": torch.cuda.get_device_name()}
    out["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out["copy_tb_s"] = copy_bw / 1e12
    print(f"{out['device']} {out['date']} copy {copy_bw / 1e12:.3f} TB/s", flush=True)

    # bitwise checks on every fp16 value
    v = lookup.every_value(torch.float16, "cuda")
    checks = {}
    for name in ("gelu", "gelu_tanh", "silu", "quick_gelu"):
        act = ACTIVATIONS[name]
        ref = TORCH[name](v)
        checks[f"{name} arith"] = same_bits(arith_forward(v, act)[0], ref)
        table = rotated(lookup.forward_table(act, torch.float16, v.device))
        yr, br = lookup_forward(v, act, table, ROTATE=True)
        yt, bt = lookup_forward(v, act, lookup.forward_table(act, torch.float16, v.device))
        checks[f"{name} rotated table"] = same_bits(yr, ref) + int((br != bt).sum())
    checks["silu arith fast div"] = same_bits(
        arith_forward(v, ACTIVATIONS["silu"], FAST_DIV=True)[0], F.silu(v)
    )
    out["mismatches_of_65536"] = checks
    print("mismatches of 65536 fp16 values:", checks, flush=True)

    inputs = {
        "bf16-normal": torch.randn(shape, device="cuda", dtype=torch.bfloat16).to(torch.float16),
        "normal2": (torch.randn(shape, device="cuda") * 2).to(torch.float16),
    }
    dy = torch.randn(shape, device="cuda").to(torch.float16)
    cases: dict[str, object] = {}
    for iname, x in inputs.items():
        for name in ("gelu", "gelu_tanh", "silu", "quick_gelu"):
            act = ACTIVATIONS[name]
            t0 = lookup.forward_table(act, torch.float16, x.device)
            tr = rotated(t0)
            pre = f"{iname} fwd {name}"
            cases[f"{pre} table"] = lambda x=x, a=act, t=t0: lookup_forward(x, a, t)
            cases[f"{pre} rotated"] = lambda x=x, a=act, t=tr: lookup_forward(x, a, t, ROTATE=True)
            if name in ("gelu_tanh", "silu"):
                for st in (1, 2):
                    cases[f"{pre} rotated s{st}"] = lambda x=x, a=act, t=tr, st=st: lookup_forward(
                        x, a, t, ROTATE=True, STREAM=st
                    )
            cases[f"{pre} arith"] = lambda x=x, a=act: arith_forward(x, a)
            if name == "silu":
                cases[f"{pre} arith fast div"] = lambda x=x, a=act: arith_forward(x, a, FAST_DIV=True)
            if name in ("gelu_tanh", "silu"):
                cases[f"{pre} torch"] = lambda x=x, f=TORCH[name]: f(x)
        for name in ("gelu_tanh", "silu"):
            act = ACTIVATIONS[name]
            y, bits = tk.forward(x, act)
            pre = f"{iname} bwd {name}"
            cases[f"{pre} 64x2"] = lambda y=y, b=bits, a=act: lookup_backward(dy, y, b, a)
            cases[f"{pre} 64x2 early"] = lambda y=y, b=bits, a=act: lookup_backward(dy, y, b, a, EARLY=True)
            for st in (1, 2):
                cases[f"{pre} 64x2 s{st}"] = lambda y=y, b=bits, a=act, st=st: lookup_backward(
                    dy, y, b, a, STREAM=st
                )
            for rows, warps in ((32, 1), (128, 2), (128, 4), (256, 4)):
                cases[f"{pre} {rows}x{warps}"] = lambda y=y, b=bits, a=act, r=rows, w=warps: lookup_backward(
                    dy, y, b, a, r, w
                )
                cases[f"{pre} {rows}x{warps} early"] = lambda y=y, b=bits, a=act, r=rows, w=warps: (
                    lookup_backward(dy, y, b, a, r, w, EARLY=True)
                )
            xg = x.detach().requires_grad_()
            cases[f"{iname} fwd+bwd {name} torch"] = lambda xg=xg, f=TORCH[name]: torch.autograd.grad(
                f(xg), xg, dy
            )
    xb = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    yb, bb = tk.forward(xb, ACTIVATIONS["silu"])
    cases["bf16-normal bwd silu bf16 table 64x2"] = lambda: lookup_backward(dy.to(torch.bfloat16), yb, bb,
                                                                            ACTIVATIONS["silu"])  # fmt: skip
    g = torch.Generator(device="cuda").manual_seed(0)
    a, b, dm = (torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3))
    m, k, gbits = tg.forward(a, b, "silu")
    cases["silu_mul fwd"] = lambda: tg.forward(a, b, "silu")
    for rows, warps in ((64, 4), (64, 2), (32, 2), (128, 4)):
        cases[f"silu_mul bwd {rows}x{warps}"] = lambda r=rows, w=warps: gated_backward(dm, m, k, gbits, r, w)
        cases[f"silu_mul bwd {rows}x{warps} early"] = lambda r=rows, w=warps: gated_backward(
            dm, m, k, gbits, r, w, EARLY=True
        )
    da0, db0 = gated_backward(dm, m, k, gbits)
    da1, db1 = gated_backward(dm, m, k, gbits, EARLY=True)
    out["silu_mul_early_equal"] = same_bits(da0, da1) + same_bits(db0, db1) == 0
    print("silu_mul early backward equal:", out["silu_mul_early_equal"], flush=True)
    for x in inputs.values():
        for name in ("gelu_tanh", "silu"):
            act = ACTIVATIONS[name]
            y, bits = tk.forward(x, act)
            dx0 = lookup_backward(dy, y, bits, act)
            for knobs in ({"EARLY": True}, {"STREAM": 1}, {"STREAM": 2}):
                assert torch.equal(
                    dx0.view(torch.int16), lookup_backward(dy, y, bits, act, **knobs).view(torch.int16)
                )

    times: dict[str, list[float]] = {c: [] for c in cases}
    for r in range(args.rounds):
        for c, fn in cases.items():
            times[c].append(bench(fn))
        print(f"round {r} done", flush=True)
    out["ms"] = {c: statistics.median(t) for c, t in times.items()}
    out["rounds"] = times
    for c, t in out["ms"].items():
        print(f"{c:48s} {t:.4f}  ({' '.join(f'{v:.4f}' for v in times[c])})")
    floor = n * (18.5) / copy_bw * 1e3
    print(f"silu_mul floor (18.5 B/element at copy) {floor:.4f} ms; fwd+bwd 95% bar {floor / 0.95:.4f}")
    out["silu_mul_floor_ms"] = floor
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
