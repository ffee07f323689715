"""Gradient accuracy of inverted Python-formula activations (GPT-2's ``gelu_new``, ``FastGELU``).

The forward is the formula's own output, bitwise; its rounding is coarser than torch's op's, so the
information limit is that formula's: at each x, half the spread of f' over the inputs sharing x's branch and
formula output (what any method keeping only y and the bit must confuse).  Printed for every finite
bfloat16 / float16 value with |x| < 30: actpatch's max error (16-bit backward: the minimax table of the
formula's classes), that limit, the error of g from the exact inverse of y (the standard op's backward
applied to the formula's y) and eager autograd's own error through the formula's ops.

    python benchmarks/formula_accuracy.py
"""

from __future__ import annotations

import torch
from transformers.activations import FastGELUActivation, NewGELUActivation

from actpatch import functional
from actpatch.accuracy import all_finite_values
from actpatch.activations import ACTIVATIONS
from actpatch.kernels import reference

ACT = ACTIVATIONS["gelu_tanh"]


def _grad(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad


def row(formula: torch.nn.Module, dtype: torch.dtype) -> dict:
    x = all_finite_values(dtype)
    x = x[x.abs() < 30]
    y, g = _grad(lambda t: functional.gelu(t, "tanh", formula=formula), x)
    _, g_eager = _grad(formula, x)
    exact = ACT.df_safe(x.double())
    right = x.float() >= ACT.x_star
    slot = (right.long() << 16) | (y.view(torch.int16).long() & 0xFFFF)
    lo = torch.full((2**17,), torch.inf, dtype=torch.float64).scatter_reduce(0, slot, exact, "amin")
    hi = torch.full((2**17,), -torch.inf, dtype=torch.float64).scatter_reduce(0, slot, exact, "amax")
    g_inverse = reference.inverse_derivative(y, right, ACT).to(dtype).double()
    return {
        "formula": type(formula).__name__,
        "dtype": str(dtype).removeprefix("torch."),
        "actpatch": float((g.double() - exact).abs().max()),
        "limit": float(((hi - lo) / 2)[slot].max()),
        "exact inverse of y": float((g_inverse - exact).abs().max()),
        "eager autograd": float((g_eager.double() - exact).abs().max()),
    }


def main() -> None:
    rows = [
        row(f, d)
        for f in (NewGELUActivation(), FastGELUActivation())
        for d in (torch.bfloat16, torch.float16)
    ]
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for r in rows:
        print("| " + " | ".join(v if isinstance(v, str) else f"{v:.3e}" for v in r.values()) + " |")


if __name__ == "__main__":
    main()
