"""The gated product of the two halves of one gate_up tensor (Phi-3's MLP, MoE experts' ``_apply_gate``):
forward + backward time and peak memory, three ways.

    python benchmarks/gated_halves.py [--shapes 8192x8192 8192x14336] [--rounds 5] [--out halves.json]
    python benchmarks/gated_halves.py --device cpu --quick          # smoke test (the pure-PyTorch path)

eager   a, b = gate_up.chunk(2, -1); b * F.silu(a)                  (Phi-3 unpatched)
views   a, b = gate_up.chunk(2, -1); actpatch.functional.silu_mul(a, b)
        (actpatch before the halves op: contiguous copies of a and b in forward; da, db, then chunk's
        concatenation of them in backward)
halves  actpatch.functional.silu_mul_halves(gate_up)               (the halves read and written in place)

Each is ``torch.autograd.grad(product(gate_up), gate_up, dm)`` on gate_up [T, 2I] and dm [T, I], bf16
``torch.randn``: ``triton.testing.do_bench`` medians, each way's time the median over ``--rounds``
interleaved rounds, its ratio to another the median of the rounds' ratios.  "peak": the most memory
allocated above the inputs during one such call (``torch.cuda.max_memory_allocated``).  "floor": the bytes
the fused kernels must move (forward 4s + 1/4 an element of m: read a, b, write m, k and two bit masks;
backward 5s + 1/4: read dm, m, k, the masks, write da, db) at the device-to-device copy bandwidth measured
in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F
from kernels import bench, copy_bandwidth  # benchmarks/kernels.py: the same timing and copy bandwidth

import actpatch.functional as AF
from actpatch.kernels.bits import packed_size

WAYS = {
    "eager": lambda gu: (lambda a, b: b * F.silu(a))(*gu.chunk(2, dim=-1)),
    "views": lambda gu: AF.silu_mul(*gu.chunk(2, dim=-1)),
    "halves": AF.silu_mul_halves,
}


def peak_above_inputs(fn, device: str) -> int:
    """Bytes allocated at the peak of one ``fn()`` above those allocated before it (CUDA; 0 elsewhere)."""
    if device != "cuda":
        fn()
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def measure(tokens: int, width: int, args, copy_bw: float) -> dict:
    g = torch.Generator(device=args.device).manual_seed(0)
    gu = torch.randn(tokens, 2 * width, device=args.device, generator=g, dtype=torch.bfloat16)
    gu.requires_grad_()
    dm = torch.randn(tokens, width, device=args.device, generator=g, dtype=torch.bfloat16)
    steps = {way: (lambda p=product: torch.autograd.grad(p(gu), gu, dm)) for way, product in WAYS.items()}
    first = {way: step() for way, step in steps.items()}  # compiles the kernels; checks the results
    same = all(torch.equal(a, b) for a, b in zip(first["halves"], first["views"], strict=True))
    rounds = {way: [] for way in WAYS}
    for _ in range(args.rounds):
        for way, step in steps.items():
            rounds[way].append(bench(step, args.device, args.quick))
    n, s = tokens * width, gu.element_size()
    floor_ms = n * (9 * s + 1 / 2) / copy_bw * 1e3
    r = {"tokens": tokens, "width": width, "dtype": "bfloat16", "d_gate_up_equal_views_bitwise": same}
    r |= {f"{way}_fwdbwd_ms": statistics.median(ms) for way, ms in rounds.items()}
    for way, other in (("halves", "views"), ("halves", "eager"), ("views", "eager")):
        r[f"{way}_over_{other}"] = statistics.median(
            a / b for a, b in zip(rounds[way], rounds[other], strict=True)
        )
    r["floor_fwdbwd_ms"] = floor_ms
    r["halves_pct_of_floor"] = 100 * floor_ms / r["halves_fwdbwd_ms"]
    r |= {f"{way}_peak_bytes": peak_above_inputs(step, args.device) for way, step in steps.items()}
    r["halves_expected_peak_bytes"] = 4 * n * s + 2 * packed_size(n)  # m, k, the bits, d(gate_up)
    r["rounds"] = rounds
    print(
        f"{tokens} x {width} bf16 fwd+bwd ms: eager {r['eager_fwdbwd_ms']:.4f}"
        f"  views {r['views_fwdbwd_ms']:.4f}"
        f"  halves {r['halves_fwdbwd_ms']:.4f} (floor {floor_ms:.4f}, {r['halves_pct_of_floor']:.0f}%)  |"
        f"  halves/views x{r['halves_over_views']:.3f}  halves/eager x{r['halves_over_eager']:.3f}"
        f"  views/eager x{r['views_over_eager']:.3f}  |  peak MiB above inputs: "
        + "  ".join(f"{way} {r[f'{way}_peak_bytes'] / 2**20:.1f}" for way in WAYS)
        + f"  (halves expected {r['halves_expected_peak_bytes'] / 2**20:.1f})"
        + f"  | d(gate_up) bitwise views': {same}",
        flush=True,
    )
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", nargs="+", default=["8192x8192", "8192x14336"], help="TOKENSxI")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    copy_bw = copy_bandwidth(args.device, args.quick)
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"{device}, torch {torch.__version__}, copy {copy_bw / 1e9:.0f} GB/s", flush=True)
    rows = [measure(*(int(v) for v in shape.split("x")), args, copy_bw) for shape in args.shapes]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {"device": device, "torch": torch.__version__, "copy_bw": copy_bw, "rows": rows}, f, indent=1
            )


if __name__ == "__main__":
    main()
