"""Squared ReLU, y = relu(x)², that keeps only its output y: pure PyTorch, any device.

Eager ``torch.square(F.relu(x))`` keeps r = relu(x) (relu's output, and square's input) and the next Linear
keeps y.  Here autograd keeps y alone, which the next Linear keeps anyway:

    forward(x)      y = r · r, r = relu(x): torch's ops, bitwise (square, pow(·, 2) and r * r are the
                    same one multiply, in float32 for 16-bit x, where r · r is exact, then rounded once
                    to x's dtype)
    backward(dy, y) dx = dy · (2 r̂), r̂ = √y rounded to y's dtype: eager's pow backward, 0 where y = 0
                    (eager's relu mask)

No branch bit is needed: x <= 0 gives y = 0 and dx = 0, as eager's relu backward (also for dy = ±inf or
NaN, which eager masks there too).  NaN x gives NaN y and NaN dx, as eager.

Exact where y is a normal number: y = fl(r²) loses the low half of r², but r is itself a number of the
dtype, and in binary floating point √(fl(r²)) rounds back to r (round to nearest: y = r² (1 + δ),
|δ| <= u, puts √y within r · u/2 of r, inside r's rounding interval).  So r̂ = r, and dx is eager's
dy · (2 r) bitwise, for r from √(the smallest normal) (float32 and bfloat16 1.1e-19, float16 2⁻⁷ =
0.0078) up to where r² overflows.  √y is taken in float64 here, rounded once to the dtype (torch's CPU
float32 √ can be an ulp off, which would miss r in float32); the Triton kernel's correctly rounded float32
√ gives the same r̂ (``tests/test_relu_squared.py`` checks both on every bfloat16 and float16 input and a
dense float32 grid).

Where y is subnormal or 0 (r² below the smallest normal) y keeps too few digits: with s the dtype's
smallest subnormal, y = 0 up to r = √(s/2) and |2 √y − 2 r| <= s / (√y + r) above, so

    |dx − 2 r dy| <= √(2 s) · |dy|  (+ dx's rounding):  float16 2⁻¹¹·⁵ ≈ 3.5e-4, bfloat16 2⁻⁶⁶, float32 2⁻⁷⁴.

y = +inf (r² past the dtype's largest value) takes y as that largest value, r̂ about the largest r whose
square is finite: dx stays finite for finite dy, where eager's 2 r dy comes from the true r.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def forward(x: torch.Tensor) -> torch.Tensor:
    """y = relu(x)², bitwise ``torch.square(F.relu(x))``."""
    return torch.square(F.relu(x))


def root(y: torch.Tensor) -> torch.Tensor:
    """r̂ = √y rounded to y's dtype (y = inf as the dtype's largest value): r itself where y is normal."""
    return y.double().clamp_max(torch.finfo(y.dtype).max).sqrt().to(y.dtype)


def backward(dy: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dx = dy · (2 r̂) as eager's pow backward computes it, 0 where y = 0."""
    return torch.where(y == 0, 0.0, dy * (2 * root(y)))
