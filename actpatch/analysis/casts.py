"""Linears under autocast that read one tensor, and the casts of it they keep.

Under ``torch.autocast``, ``F.linear`` casts a float32 input to the autocast dtype inside each call, and
each call keeps its own cast for the weight's gradient: q, k and v projections of one float32 hidden state
(the residual stream of a model with float32 master weights) keep three bf16 copies of it, a gated MLP's
gate and up projections two.  A *group* is the calls of ``nn.Linear`` modules given the same input tensor
object in one forward; the probe shows each call's cast as a tensor it saved of the input's size and last
dimension in another dtype and storage, not made from a parameter (``cast_of``).  Sharing one cast among a
group frees every cast but the first's (``shares``).  Whether autocast is on is read off these casts, so a
forward that enters autocast itself (accelerate wraps a model's forward so under mixed precision) is seen
as it runs, and so is a dry run on meta under :class:`actpatch.meta_autocast.MetaAutocast`.
"""

from __future__ import annotations

import math
from collections import defaultdict

from torch import nn

from .evidence import Evidence
from .memory import Bytes
from .probe import Call, ProbeResult, SavedTensor


def candidates(model: nn.Module) -> dict[int, str]:
    """id(module) -> path for every ``nn.Linear`` running ``nn.Linear.forward``."""
    return {
        id(m): path
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward
    }


def groups(probe: ProbeResult, found: dict[int, str]) -> list[list[Call]]:
    """The calls of the candidates grouped by their input tensor, in call order; groups of two or more."""
    by_input: dict[int, list[Call]] = defaultdict(list)
    for call in probe.watched_calls:
        if call.module is not None and id(call.module) in found:
            by_input[call.input_id].append(call)
    return [calls for calls in by_input.values() if len(calls) > 1]


def cast_of(evidence: Evidence, call: Call) -> SavedTensor | None:
    """The cast of ``call``'s input that its own ops saved (the matmul saves it as rows), if exactly one."""
    numel = math.prod(call.input_shape)
    casts = {
        s.storage: s
        for s in evidence.by_call.get(id(call), ())
        if s.dtype not in (call.input_dtype, None)
        and s.shape[-1:] == call.input_shape[-1:]
        and math.prod(s.shape) == numel
        and not s.of_parameter
        and s.storage != call.input_storage
    }
    return next(iter(casts.values())) if len(casts) == 1 else None


def shares(evidence: Evidence, paths: list[str]) -> dict[str, Bytes]:
    """For the calls of ``paths`` (a group's Linears, in call order) that keep a cast: the bytes each frees
    when they share one cast per input, by path — the first keeping one frees none (its cast is kept, for
    all), each later one its own cast's (in the autocast dtype: not scaled with the model's)."""
    kept: set[int] = set()
    freed: dict[str, Bytes] = {}
    for call in evidence.probe.watched_calls:
        cast = cast_of(evidence, call) if call.site in paths else None
        if cast is None:
            continue
        shared = call.input_id in kept
        freed[call.site] = freed.get(call.site, Bytes()) + Bytes(0.0, float(cast.nbytes if shared else 0))
        kept.add(call.input_id)
    return freed
