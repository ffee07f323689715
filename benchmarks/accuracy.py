"""Gradient accuracy of every inverted activation in every dtype, against the information limit.

    python benchmarks/accuracy.py [--device cuda] [--plot docs/img/accuracy.png] [--markdown FILE]

Prints per activation and dtype: max error, the limit's max error, their ratio, and the count of inputs
past the pointwise bound (see actpatch/accuracy.py for the criterion).  Exit code 1 if any fails.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from actpatch.accuracy import MAX_RATIO, measure_dtype
from actpatch.activations import ACTIVATIONS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--plot", help="write a PNG of error vs limit near the minimum")
    p.add_argument("--markdown", help="write the table as Markdown")
    args = p.parse_args()

    header = (
        f"{'activation':<11} {'dtype':<9} {'inputs':>9} {'max err':>10} {'limit max':>10} "
        f"{'ratio':>6} {'past bound':>10} {'non-finite':>10}"
    )
    print(header)
    rows, results, ok = [], {}, True
    t0 = time.time()
    for name in ACTIVATIONS:
        for dname, dtype in DTYPES.items():
            r = measure_dtype(name, dtype, args.device)
            results[name, dname] = r
            ok &= r.passed
            print(
                f"{name:<11} {dname:<9} {r.x.numel():>9} {r.max_error:>10.3e} {r.max_limit:>10.3e} "
                f"{r.ratio:>6.3f} {r.violations:>10} {r.nonfinite:>10}"
            )
            rows.append(
                f"| {name} | {dname} | {r.x.numel()} | {r.max_error:.3e} | {r.max_limit:.3e} | "
                f"{r.ratio:.3f} | {r.violations} | {r.nonfinite} |"
            )
    verdict = "PASS" if ok else "FAIL"
    print(f"{verdict} (max ratio allowed {MAX_RATIO}); {time.time() - t0:.1f} s on {args.device}")
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(
                "| activation | dtype | inputs | max error | limit max | ratio | past bound | non-finite |\n"
                "|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
            )
    if args.plot:
        plot(results, args.plot)
    return 0 if ok else 1


def plot(results, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(ACTIVATIONS), len(DTYPES), figsize=(15, 13), sharex=True)
    for i, name in enumerate(ACTIVATIONS):
        for j, dname in enumerate(DTYPES):
            r = results[name, dname]
            keep = (r.x > -4) & (r.x < 3)
            ax = axes[i, j]
            ax.semilogy(r.x[keep], r.limit[keep].clamp_min(1e-12), ".", ms=1, label="exact inversion (limit)")
            ax.semilogy(r.x[keep], r.error[keep].clamp_min(1e-12), ".", ms=1, alpha=0.5, label="actpatch")
            ax.set_title(f"{name}, {dname}", fontsize=9)
            ax.set_ylim(1e-12, 1)
            if i == len(ACTIVATIONS) - 1:
                ax.set_xlabel("x")
            if j == 0:
                ax.set_ylabel("|gradient error|")
    axes[0, 0].legend(markerscale=8, fontsize=8)
    fig.suptitle("Gradient error of actpatch vs the information limit (exact inversion of the stored y)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
