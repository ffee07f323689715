"""Registers, spills and the SASS instruction mix of the compiled Triton kernels (CUDA only).

    python benchmarks/kernel_sass.py [--dtype bfloat16] [--activation silu]

Runs the forward and backward once on a small tensor, then prints, per kernel and launch shape, the
registers per thread, spilled bytes and the static SASS instructions by opcode (cuobjdump, through
triton.tools.disasm): the loop-free kernels execute each static instruction once per thread, so their
count divided by elements per thread is the instructions each element costs.
"""

from __future__ import annotations

import argparse
import collections
import re

import torch
from triton.tools.disasm import get_sass

from actpatch.activations import ACTIVATIONS
from actpatch.kernels import triton as tk

# "  /*0090*/  @!P0 FFMA.FTZ R3, R2, R4, R3 ;  /* 0x... */" or "@!P0 FFMA.FTZ R3, R2, R4, R3 ;" -> FFMA
_OPCODE = re.compile(r"^\s*(?:/\*[0-9a-f]+\*/)?\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)[.\w]*\b[^;]*;", re.M)


def compiled(jitted) -> list:
    """Every CompiledKernel the JIT holds for ``jitted`` (Triton 3.x: device_caches[device][0])."""
    return [k for caches in jitted.device_caches.values() for k in caches[0].values()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--activation", default="silu")
    p.add_argument("--save", help="also write each kernel's SASS into this folder")
    args = p.parse_args()
    act = ACTIVATIONS[args.activation]
    x = torch.randn(1 << 20, device="cuda").to(getattr(torch, args.dtype))
    y, bits = tk.forward(x, act)
    tk.backward(torch.randn_like(x), y, bits, act)
    torch.cuda.synchronize()
    for name, jitted in (("forward", tk._forward_kernel), ("backward", tk._backward_kernel)):
        for k in compiled(jitted):
            meta = k.metadata
            sass = get_sass(k.asm["cubin"])
            ops = collections.Counter(m.group(1) for m in _OPCODE.finditer(sass))
            if args.save:
                with open(f"{args.save}/{name}_{meta.num_warps}warps.sass", "w") as f:
                    f.write(sass)
            total = sum(v for op, v in ops.items() if op not in ("NOP", "BRA", "EXIT"))
            print(
                f"{name}: warps {meta.num_warps} regs {k.n_regs} spills {k.n_spills} "
                f"static SASS {total}: " + " ".join(f"{op} {n}" for op, n in ops.most_common())
            )


if __name__ == "__main__":
    main()
