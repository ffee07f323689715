"""Dropout modules, and what keeping their masks as bits frees.

A candidate is an ``nn.Dropout`` (or a subclass keeping its forward, ``F.dropout(x, p, training,
inplace)``) with 0 < p < 1.  Its replacement, ``actpatch.nn.PackedDropout``, computes the same outputs and
gradients bitwise and keeps ceil(n/8) bytes of mask bits where torch's dropout keeps a bool mask (GPUs:
n bytes) or a noise tensor of x's dtype (CPU).  What a call frees is read off the probe: the tensors its
own ops saved that nothing else keeps, less the bits.
"""

from __future__ import annotations

import math

from torch import nn

from .memory import Bytes
from .probe import Call, ProbeResult


def candidates(model: nn.Module) -> dict[int, str]:
    """id(module) -> path for every dropout module that drops something (0 < p < 1)."""
    return {
        id(m): path
        for path, m in model.named_modules()
        if isinstance(m, nn.Dropout) and type(m).forward is nn.Dropout.forward and 0.0 < m.p < 1.0
    }


def gain(probe: ProbeResult, call: Call) -> Bytes:
    """Bytes freed by one call: its own saves (the mask or noise) less the packed mask bits."""
    return probe.freed_by(call) + Bytes(0.0, -math.ceil(call.numel / 8))
