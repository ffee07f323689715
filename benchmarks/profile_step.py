"""Where a training step's time goes, eager against patched: CUDA kernel time by kernel, and wall time.

    python benchmarks/profile_step.py [--model bert-base] [--steps 3] [--compiled [model|blocks]]

Builds the model as benchmarks/train_step.py does, warms up, then profiles ``--steps`` steps of each mode
with torch.profiler: per mode, the wall time per step, the summed CUDA kernel time per step (the GPU's
busy time), and the kernels whose time differs most between the modes; and the host-device synchronisations
one eager step makes (``torch.cuda.set_sync_debug_mode``: each one stops the CPU from running ahead of the
GPU, so the CPU time of what follows shows in the wall time).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile
from train_step import MODELS, batch, build, runner, step, unswap


def profile_mode(run, steps: int) -> tuple[float, Counter]:
    """(wall ms per step, Counter kernel name -> CUDA µs per step) of ``run()``, one training step."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / steps
    kernels: Counter = Counter()
    for e in prof.key_averages():
        if e.device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.key[:90]] += e.device_time_total / steps
    return wall, kernels


def synchronisations(model, inputs: dict) -> list[str]:
    """The warnings torch gives for each synchronising CUDA call in one step."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(model, inputs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bert-base", choices=list(MODELS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--compiled", nargs="?", const="model", choices=["model", "blocks"])
    args = p.parse_args()
    args.device, args.dtype, args.quick = "cuda", torch.bfloat16, False
    _, b, s, layers, swap = MODELS[args.model]
    model = build(args.model, layers, args)
    run = runner(model, args)
    inputs = batch(model, b, s, "cuda")
    syncs = synchronisations(run, inputs)
    print(
        f"{args.model}: {len(syncs)} synchronising calls in one eager step",
        *syncs[:3],
        sep="\n  ",
        flush=True,
    )
    result = {}
    for mode in ("eager", "patched", "eager", "patched"):  # the second round is the one reported
        patched: dict = {}
        if mode == "patched":
            swap(model, patched)
        for _ in range(3):
            step(run, inputs)
        result[mode] = profile_mode(lambda: step(run, inputs), args.steps)
        unswap(patched)
    for mode, (wall, kernels) in result.items():
        busy = sum(kernels.values()) / 1e3
        print(f"{args.model} {mode}: wall {wall:.2f} ms/step, CUDA kernels {busy:.2f} ms/step", flush=True)
    eager, ours = result["eager"][1], result["patched"][1]
    diff = {k: ours.get(k, 0.0) - eager.get(k, 0.0) for k in set(eager) | set(ours)}
    print("kernels differing most (µs/step, patched - eager; eager, patched):")
    for k in sorted(diff, key=lambda k: -abs(diff[k]))[: args.top]:
        print(f"  {diff[k]:+9.1f}  {eager.get(k, 0.0):9.1f} {ours.get(k, 0.0):9.1f}  {k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
