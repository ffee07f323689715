"""Fused Triton kernels vs torch's own activation kernels: time, bandwidth, >2^31 elements, accuracy on GPU.

    python benchmarks/kernels.py [--device cuda] [--shape 8192 14336] [--sweep] [--accuracy] [--large]
                                 [--gated] [--sweep-gated] [--input bf16-normal|normal2] [--rounds 3]
    python benchmarks/kernels.py --device cpu --quick       # smoke test (Triton interpreter)

The figure that counts, "public": forward + backward through the public path, ``torch.autograd.grad`` of
``actpatch.functional.gelu / silu / quick_gelu`` (what a patched model runs), against torch's own op
(``F.gelu``, ``F.silu``, QuickGELU's x·σ(1.702 x)) under the same protocol, ``triton.testing.do_bench``
medians, each the median over ``--rounds`` interleaved rounds (the ratio: the median of the rounds' ratios),
on ``torch.randn(shape, dtype=torch.bfloat16).to(dtype)`` (``--input bf16-normal``, the default;
``normal2`` is ``(torch.randn(shape) * 2).to(dtype)``, this script's input before 2026-12-01).  The kernel
columns ("ours fwd", "bwd", "fwd+bwd") call the kernels directly (``actpatch.kernels.triton``) on the same
input: public minus kernel fwd+bwd is what the public path adds.

Bytes the kernels must move, per element of size s bytes: forward reads x, writes y and 1/8 byte of bits
(2s + 1/8); backward reads y, dy and the bits, writes dx (3s + 1/8).  "% copy" is that count over the time,
divided by the device-to-device copy bandwidth measured in the same run (bytes read + written).  The gated
products (``--gated``) move 4s + 1/4 bytes an element forward (read a, b; write m, k and two bit masks)
and 5s + 1/4 backward (read dm, m, k, the masks; write da, db).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import actpatch.functional as AF
from actpatch.activations import ACTIVATIONS, inverse_table
from actpatch.activations.sigmoid_gated import quick_gelu_forward
from actpatch.kernels import reference
from actpatch.kernels import triton as tk
from actpatch.kernels import triton_gated as tg
from actpatch.kernels.bits import packed_size

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


PUBLIC = {  # activation -> (actpatch's public op, torch's own op)
    "gelu": (AF.gelu, F.gelu),
    "gelu_tanh": (lambda x: AF.gelu(x, "tanh"), lambda x: F.gelu(x, approximate="tanh")),
    "silu": (AF.silu, F.silu),
    "quick_gelu": (AF.quick_gelu, quick_gelu_forward),
}
INPUTS = {  # --input: how the activation's input is drawn
    "bf16-normal": lambda shape, device, dtype: torch.randn(shape, device=device, dtype=torch.bfloat16).to(
        dtype
    ),
    "normal2": lambda shape, device, dtype: (torch.randn(shape, device=device) * 2).to(dtype),
}


def bench(fn, device: str, quick: bool) -> float:
    """Median milliseconds."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(
            do_bench(fn, warmup=25 if quick else 100, rep=50 if quick else 300, return_mode="median")
        )
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


def copy_bandwidth(device: str, quick: bool) -> float:
    """Device-to-device copy, bytes read + written per second."""
    n = 2**20 if quick else 2**30  # bytes per buffer
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), device, quick)
    return 2 * n / (ms * 1e-3)


def time_activation(name: str, x: torch.Tensor, dy: torch.Tensor, args, copy_bw: float) -> dict:
    """One activation on one tensor: the public path's fwd+bwd and torch's; ours kernel by kernel."""
    act = ACTIVATIONS[name]
    s = x.element_size()
    n = x.numel()
    fwd_bytes, bwd_bytes = n * (2 * s + 1 / 8), n * (3 * s + 1 / 8)
    y, bits = tk.forward(x, act)

    def ours_both():
        y2, b2 = tk.forward(x, act)
        return tk.backward(dy, y2, b2, act)

    ours, theirs = PUBLIC[name]
    xg = x.detach().requires_grad_()
    r = {"activation": name, "dtype": str(x.dtype).removeprefix("torch."), "shape": list(x.shape)}
    rounds = {"public_fwdbwd_ms": [], "torch_fwdbwd_ms": [], "ours_fwdbwd_ms": []}
    for _ in range(args.rounds):  # interleaved: a slow spell of the machine hits all three alike
        rounds["public_fwdbwd_ms"].append(
            bench(lambda: torch.autograd.grad(ours(xg), xg, dy), args.device, args.quick)
        )
        rounds["torch_fwdbwd_ms"].append(
            bench(lambda: torch.autograd.grad(theirs(xg), xg, dy), args.device, args.quick)
        )
        rounds["ours_fwdbwd_ms"].append(bench(ours_both, args.device, args.quick))
    r |= {name: statistics.median(ms) for name, ms in rounds.items()} | {"rounds": rounds}
    r["ratio_vs_torch"] = statistics.median(
        p / t for p, t in zip(rounds["public_fwdbwd_ms"], rounds["torch_fwdbwd_ms"], strict=True)
    )
    r["ours_fwd_ms"] = bench(lambda: tk.forward(x, act), args.device, args.quick)
    r["ours_bwd_ms"] = bench(lambda: tk.backward(dy, y, bits, act), args.device, args.quick)
    r["torch_fwd_ms"] = bench(lambda: theirs(x), args.device, args.quick)
    if x.dtype != torch.float32 and args.device == "cuda":  # the arithmetic paths the lookups replace
        r["ours_fwd_arith_ms"] = bench(
            lambda: tk.forward(x, act, lookup_table=False), args.device, args.quick
        )
        r["ours_bwd_arith_ms"] = bench(
            lambda: tk.backward(dy, y, bits, act, lookup_table=False), args.device, args.quick
        )
    r["fwd_pct_copy"] = 100 * fwd_bytes / (r["ours_fwd_ms"] * 1e-3) / copy_bw
    r["bwd_pct_copy"] = 100 * bwd_bytes / (r["ours_bwd_ms"] * 1e-3) / copy_bw
    r["public_pct_copy"] = 100 * (fwd_bytes + bwd_bytes) / (r["public_fwdbwd_ms"] * 1e-3) / copy_bw
    r["floor_fwdbwd_ms"] = (fwd_bytes + bwd_bytes) / copy_bw * 1e3
    print(
        f"{name:<10} {r['dtype']:<8} public fwd+bwd {r['public_fwdbwd_ms']:.4f} ms | torch fwd+bwd "
        f"{r['torch_fwdbwd_ms']:.4f} | x{r['ratio_vs_torch']:.3f} | kernels fwd {r['ours_fwd_ms']:.4f} "
        f"bwd {r['ours_bwd_ms']:.4f} fwd+bwd {r['ours_fwdbwd_ms']:.4f} ({r['fwd_pct_copy']:.0f}/"
        f"{r['bwd_pct_copy']:.0f}/{r['public_pct_copy']:.0f}% copy; floor {r['floor_fwdbwd_ms']:.4f}) | "
        f"torch fwd {r['torch_fwd_ms']:.4f}"
        + (
            f" | arithmetic: fwd {r['ours_fwd_arith_ms']:.4f} bwd {r['ours_bwd_arith_ms']:.4f}"
            if "ours_bwd_arith_ms" in r
            else ""
        ),
        flush=True,
    )
    return r


def kernel_table(args, copy_bw: float) -> list[dict]:
    rows = []
    acts = ["gelu", "silu"] if args.quick else list(ACTIVATIONS)
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        x = INPUTS[args.input](args.shape, args.device, dtype)
        dy = torch.randn_like(x)
        for name in acts:
            rows.append(time_activation(name, x, dy, args, copy_bw))
        if dname == "bfloat16" and args.device == "cuda":  # the gathers' cost: every y in one interval
            act = ACTIVATIONS["silu"]
            y1 = torch.full_like(x, 0.5)
            bits1 = torch.full((packed_size(x.numel()),), 255, dtype=torch.uint8, device=x.device)
            t = bench(lambda: tk.backward(dy, y1, bits1, act), args.device, args.quick)  # noqa: B023
            print(f"silu       bfloat16 bwd with every y = 0.5 (one table interval): {t:.4f} ms", flush=True)
            rows.append({"activation": "silu", "dtype": dname, "note": "bwd, y constant", "ours_bwd_ms": t})
    return rows


def sweep_shapes(shapes, apply, forward, backward, names: tuple[str, ...], label: str) -> dict:
    """Times ``forward()`` and ``backward()`` (ms, one per activation of ``names``) under each (rows, warps)
    of ``shapes``, set by ``apply(rows, warps, rows, warps)``; then applies the forward's and the backward's
    shapes of least total time (``apply(forward rows, warps, backward rows, warps)``): kept for the run."""
    out: dict = {"forward": [], "backward": []}
    for rows, warps in shapes:
        apply(rows, warps, rows, warps)
        f, b = forward(), backward()
        out["forward"].append((sum(f), rows, warps, f))
        out["backward"].append((sum(b), rows, warps, b))
        fs, bs = (" ".join(f"{n} {t:.4f}" for n, t in zip(names, ts, strict=True)) for ts in (f, b))
        print(f"sweep{label} rows {rows:5d} warps {warps:2d}: fwd {fs} | bwd {bs} ms", flush=True)
    (_, fr, fw, _), (_, br, bw, _) = min(out["forward"]), min(out["backward"])
    apply(fr, fw, br, bw)
    out["chosen"] = {"forward": [fr, fw], "backward": [br, bw]}
    print(f"sweep{label} chose (rows, warps): {out['chosen']}", flush=True)
    return out


def _activation_shapes(fr: int, fw: int, br: int, bw: int) -> None:
    """The activation kernels' launch shapes, the lookups' with the arithmetic's."""
    tk.FORWARD_ROWS, tk.FORWARD_WARPS = tk.LOOKUP_FORWARD_ROWS, tk.LOOKUP_FORWARD_WARPS = fr, fw
    tk.BACKWARD_ROWS, tk.BACKWARD_WARPS = tk.LOOKUP_BACKWARD_ROWS, tk.LOOKUP_BACKWARD_WARPS = br, bw
    tk.LOOKUP_BACKWARD_ROWS_FLOAT16 = br
    tk._FORWARD_PLANS.clear()  # launches are resolved once per (op, dtype, device): again at the new shapes
    tk._BACKWARD_PLANS.clear()


def _gated_shapes(fr: int, fw: int, br: int, bw: int) -> None:
    tg.FORWARD_ROWS, tg.FORWARD_WARPS, tg.BACKWARD_ROWS, tg.BACKWARD_WARPS = fr, fw, br, bw
    tg._FORWARD_PLANS.clear()
    tg._BACKWARD_PLANS.clear()


def sweep(args, copy_bw: float) -> dict:
    """Rows per program x warps on GELU and SiLU in the first of --dtypes (``sweep_shapes``), then the
    backward with inverse tables of other sizes (intervals per branch x degree)."""
    x = (torch.randn(args.shape, device=args.device) * 2).to(DTYPES[args.dtypes[0]])
    dy = torch.randn_like(x)
    acts = [ACTIVATIONS["gelu"], ACTIVATIONS["silu"]]
    saved = [tk.forward(x, act) for act in acts]
    out = sweep_shapes(
        ((64, 2), (128, 2), (128, 4), (128, 8), (256, 4), (256, 8), (512, 4), (512, 8), (1024, 8)),
        _activation_shapes,
        lambda: [bench(lambda a=a: tk.forward(x, a), args.device, args.quick) for a in acts],
        lambda: [
            bench(lambda a=a, yb=yb: tk.backward(dy, *yb, a), args.device, args.quick)
            for a, yb in zip(acts, saved, strict=True)
        ],
        ("gelu", "silu"),
        "",
    ) | {"tables": [], "dtype": args.dtypes[0]}
    for n, deg in ((10, 6), (10, 4), (8, 7), (16, 4), (16, 6)):
        times = []
        for act, (y, bits) in zip(acts, saved, strict=True):
            table = inverse_table(act, n, deg)
            times.append(bench(lambda: tk.backward(dy, y, bits, act, table=table), args.device, args.quick))  # noqa: B023
        out["tables"].append({"n": n, "deg": deg, "bwd_ms": times})
        print(f"table {n:3d} intervals/branch x degree {deg}: bwd gelu {times[0]:.4f} silu {times[1]:.4f} ms")
    return out


def gated_inputs(args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, dm) for the gated products: bf16 standard normals, seeded."""
    g = torch.Generator(device=args.device).manual_seed(0)
    return tuple(
        torch.randn(args.shape, device=args.device, generator=g).to(torch.bfloat16) for _ in range(3)
    )


def sweep_gated(args) -> dict:
    """Rows per program x warps of the gated products' kernels on silu_mul and gelu_mul, forward and backward
    apart (``sweep_shapes``)."""
    a, b, dm = gated_inputs(args)
    names = ("silu", "gelu")
    saved = {name: tg.forward(a, b, name) for name in names}
    return sweep_shapes(
        ((32, 2), (64, 1), (64, 2), (64, 4), (128, 4), (128, 8), (256, 4), (256, 8)),
        _gated_shapes,
        lambda: [bench(lambda name=name: tg.forward(a, b, name), args.device, args.quick) for name in names],
        lambda: [
            bench(lambda name=name: tg.backward(dm, *saved[name], name), args.device, args.quick)
            for name in names
        ],
        names,
        " gated",
    )


def gated_table(args, copy_bw: float) -> list[dict]:
    """silu_mul / gelu_mul (triton_gated) against eager act(a) * b, forward and forward+backward, bf16."""
    from actpatch.kernels import gated

    rows = []
    a, b, dm = gated_inputs(args)
    n, s = a.numel(), a.element_size()
    fwd_bytes, bwd_bytes = n * (4 * s + 1 / 4), n * (5 * s + 1 / 4)
    for name in gated.GATED:
        m, k, bits = tg.forward(a, b, name)

        def ours_both(name=name):
            m2, k2, b2 = tg.forward(a, b, name)
            return tg.backward(dm, m2, k2, b2, name)

        def eager_both(name=name):  # what eager autograd runs: act, the product; then da and db
            act = gated.act_forward(name, a)
            _ = act * b
            return gated.act_backward(name, dm * b, a), dm * act

        r = {"activation": f"{name}_mul", "dtype": "bfloat16", "shape": list(a.shape)}
        r["ours_fwd_ms"] = bench(lambda name=name: tg.forward(a, b, name), args.device, args.quick)
        r["ours_bwd_ms"] = bench(lambda: tg.backward(dm, m, k, bits, name), args.device, args.quick)  # noqa: B023
        r["ours_fwdbwd_ms"] = bench(ours_both, args.device, args.quick)
        r["torch_fwd_ms"] = bench(lambda name=name: gated.act_forward(name, a) * b, args.device, args.quick)
        r["torch_fwdbwd_ms"] = bench(eager_both, args.device, args.quick)
        r["ratio_vs_torch"] = r["ours_fwdbwd_ms"] / r["torch_fwdbwd_ms"]
        liger = _liger_silu_mul() if name == "silu" and args.device == "cuda" else None
        if liger is not None:  # Liger-Kernel's fused SwiGLU: forward, then backward from its saved a, b
            la, lb = a.clone(), b.clone()  # Liger's backward writes da, db over its a, b
            r["liger_fwdbwd_ms"] = bench(lambda: liger(la, lb, dm), args.device, args.quick)  # noqa: B023
            r["ratio_vs_liger"] = r["ours_fwdbwd_ms"] / r["liger_fwdbwd_ms"]
        for key, moved in (("fwd", fwd_bytes), ("bwd", bwd_bytes), ("fwdbwd", fwd_bytes + bwd_bytes)):
            r[f"{key}_pct_copy"] = 100 * moved / (r[f"ours_{key}_ms"] * 1e-3) / copy_bw
        r["floor_fwdbwd_ms"] = (fwd_bytes + bwd_bytes) / copy_bw * 1e3
        print(
            f"{name + '_mul':<14} bf16 ours fwd {r['ours_fwd_ms']:.4f} bwd {r['ours_bwd_ms']:.4f} "
            f"fwd+bwd {r['ours_fwdbwd_ms']:.4f} ms ({r['fwd_pct_copy']:.0f}/{r['bwd_pct_copy']:.0f}/"
            f"{r['fwdbwd_pct_copy']:.0f}% copy; floor {r['floor_fwdbwd_ms']:.4f}) | eager fwd "
            f"{r['torch_fwd_ms']:.4f} fwd+bwd {r['torch_fwdbwd_ms']:.4f} | x{r['ratio_vs_torch']:.3f}"
            + (f" | Liger fwd+bwd {r['liger_fwdbwd_ms']:.4f} x{r['ratio_vs_liger']:.3f}" if liger else ""),
            flush=True,
        )
        rows.append(r)
    return rows


def _liger_silu_mul():
    """Liger-Kernel's SwiGLU forward + backward kernels as one call (a, b, dm), or None without Liger."""
    try:
        from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward
    except ImportError:
        return None

    def both(a, b, dm):
        a2, b2, _ = swiglu_forward(a, b)
        return swiglu_backward(a2, b2, dm)

    return both


def large_check(args) -> dict:
    """bf16 SiLU on 2^31 + 8003 elements: the last 800,003 elements against the reference."""
    n = 2**31 + 8003 if not args.quick else 8 * 1000 + 3
    act = ACTIVATIONS["silu"]
    x = torch.empty(n, device=args.device, dtype=torch.bfloat16).normal_(0, 3)
    t0 = time.perf_counter()
    y, bits = tk.forward(x, act)
    dx = tk.backward(y, y, bits, act)
    if args.device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    m = 8 * 100_000 + 3 if not args.quick else 803
    tail = slice(n - m, n)
    start = tail.start // 8
    yr, _ = reference.forward(x[tail], act)
    x_star = torch.tensor(act.x_star, dtype=torch.float32)
    bits_ok = torch.equal(bits[start:], reference.pack_bits(x[tail].float() >= x_star.to(x.device)))
    dxr = reference.backward(y[tail], y[tail], bits[start:], act)
    y_ok = bool(((y[tail].float() - yr.float()).abs() <= 2**-7 * yr.float().abs()).all())
    dx_ok = bool(((dx[tail].float() - dxr.float()).abs() <= 2**-7 * dxr.float().abs()).all())
    res = {"n": n, "bits_ok": bits_ok, "y_ok": y_ok, "dx_ok": dx_ok, "seconds": elapsed}
    print(f"large: n = {n} ({n / 2**31:.4f} x 2^31): y {y_ok}, bits {bits_ok}, dx {dx_ok}", flush=True)
    del x, y, bits, dx
    return res


def accuracy_check(args) -> list[dict]:
    """actpatch.accuracy's criterion on the GPU's output (autograd through the custom ops)."""
    from actpatch.accuracy import all_finite_values, float32_grid, measure

    out = []
    for name, act in ACTIVATIONS.items():
        for dname, dtype in DTYPES.items():
            if dtype == torch.float32:  # a 10x thinner grid than benchmarks/accuracy.py's (CPU bisection)
                x = float32_grid(act, n=200_001, n_min=40_001)
            else:
                x = all_finite_values(dtype)
            if args.quick:
                x = x[:: max(1, x.numel() // 3000)]
            r = measure(name, x.to(args.device))
            out.append(
                {
                    "activation": name,
                    "dtype": dname,
                    "inputs": r.x.numel(),
                    "max_error": r.max_error,
                    "limit_max": r.max_limit,
                    "ratio": r.ratio,
                    "violations": r.violations,
                    "nonfinite": r.nonfinite,
                    "passed": r.passed,
                }
            )
            print(
                f"accuracy {name:<10} {dname:<8} max err {r.max_error:.3e} limit {r.max_limit:.3e} "
                f"ratio {r.ratio:.3f} past bound {r.violations} non-finite {r.nonfinite} "
                f"{'PASS' if r.passed else 'FAIL'}",
                flush=True,
            )
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    p.add_argument("--shape", type=int, nargs="+", default=[8192, 14336])
    p.add_argument(
        "--dtypes",
        nargs="*",
        choices=list(DTYPES),
        default=list(DTYPES),
        help="the activations' (none: none)",
    )
    p.add_argument("--sweep", action="store_true", help="launch shapes and table sizes, first of --dtypes")
    p.add_argument("--large", action="store_true", help="correctness on more than 2^31 elements")
    p.add_argument("--accuracy", action="store_true", help="accuracy criterion on this device's output")
    p.add_argument("--gated", action="store_true", help="the gated products' kernels against eager, bf16")
    p.add_argument("--sweep-gated", action="store_true", help="launch shapes of the gated products' kernels")
    p.add_argument("--input", choices=list(INPUTS), default="bf16-normal", help="the activations' input")
    p.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds of public, torch, kernels fwd+bwd (medians)"
    )
    p.add_argument("--json", help="write all results here")
    args = p.parse_args()
    if args.sweep and not args.dtypes:
        p.error("--sweep sweeps the first of --dtypes: name one")
    if args.quick:
        args.shape = [37, 129]
    ok = True
    res: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device}
    res["torch"], res["triton"] = torch.__version__, tk.triton.__version__
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res["input"] = args.input
    res["copy_bytes_per_s"] = copy_bw = copy_bandwidth(args.device, args.quick)
    print(f"{res['device']}: copy bandwidth {copy_bw / 1e12:.3f} TB/s (read + write)", flush=True)
    if args.sweep:
        res["sweep"] = sweep(args, copy_bw)
    if args.sweep_gated:
        res["sweep_gated"] = sweep_gated(args)
    res["launch"] = {
        "forward": [tk.FORWARD_ROWS, tk.FORWARD_WARPS],
        "backward": [tk.BACKWARD_ROWS, tk.BACKWARD_WARPS],
        "lookup_forward": [tk.LOOKUP_FORWARD_ROWS, tk.LOOKUP_FORWARD_WARPS],
        "lookup_backward": [tk.LOOKUP_BACKWARD_ROWS, tk.LOOKUP_BACKWARD_WARPS],
        "lookup_backward_float16": [tk.LOOKUP_BACKWARD_ROWS_FLOAT16, tk.LOOKUP_BACKWARD_WARPS],
        "gated_forward": [tg.FORWARD_ROWS, tg.FORWARD_WARPS],
        "gated_backward": [tg.BACKWARD_ROWS, tg.BACKWARD_WARPS],
    }
    res["kernels"] = kernel_table(args, copy_bw)
    if args.gated:
        res["gated"] = gated_table(args, copy_bw)
    if args.large:
        res["large"] = large_check(args)
        ok &= all(res["large"][k] for k in ("y_ok", "bits_ok", "dx_ok"))
    if args.accuracy:
        res["accuracy"] = acc = accuracy_check(args)
        ok &= args.quick or all(r["passed"] for r in acc)  # --quick subsamples: not judged
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1, default=str)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
