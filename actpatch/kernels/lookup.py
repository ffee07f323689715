"""Whole-dtype lookup tables for 16-bit inputs: a bfloat16 or float16 tensor holds one of 65,536 values.

forward_table(act, dtype, device)   int16 [65536]: the bits of y = torch's own ``act.forward`` of the x
                                    with bit pattern i, on ``device`` (so the kernel's y is that op's,
                                    bitwise); the kernel compares x >= x* itself;
backward_table(act, dtype, device)  float32 [2 · 65536]: g = ``reference.inverse_derivative`` at the y with
                                    bit pattern i, left branch (entries 0..65535) then right, computed on the
                                    CPU, so that dx = dy · g is the reference's backward bitwise everywhere.

The Triton kernels then read one table entry per element instead of evaluating erf/exp (forward) or the
inverse's log, square root and polynomial (backward); the fp16 SiLU and QuickGELU forwards compute instead
(``triton.ARITHMETIC_FLOAT16``), checked against the forward table.  Tables are built once per (activation,
dtype, device) and cached: 128 KiB + 512 KiB.
"""

from __future__ import annotations

import torch

from ..activations import Activation
from .reference import inverse_derivative

DTYPES = (torch.bfloat16, torch.float16)
_FORWARD: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}
_BACKWARD: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}


def every_value(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 65,536 values of a 16-bit dtype, value i having bit pattern i."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).roll(2**15).view(dtype).to(device)


def forward_table(act: Activation, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (act.name, dtype, device)
    if key not in _FORWARD:
        _FORWARD[key] = act.forward(every_value(dtype, device)).view(torch.int16).contiguous()
    return _FORWARD[key]


def backward_table(act: Activation, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (act.name, dtype, device)
    if key not in _BACKWARD:
        y = every_value(dtype)
        g = [inverse_derivative(y, torch.full(y.shape, side), act) for side in (False, True)]
        _BACKWARD[key] = torch.cat(g).to(device).contiguous()
    return _BACKWARD[key]
