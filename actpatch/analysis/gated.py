"""Gated MLPs, recognised by what ran: a module whose forward is down(act(gate(x)) * up(x)) and nothing else.

The probe's events of the parent module must be exactly its three child projections, the activation
site and one product, wired as

    gate(x) -> act -> mul <- up(x),   mul -> down,   x = the parent's input,   down's output = its output

(Llama, Mistral, Qwen2, Gemma, DeepSeek dense MLPs).  Anything else in the forward (dropout, casts, a
fused gate_up projection and its split, MoE routing) and the parent is not fused.  The fused product
(``actpatch.functional.silu_mul`` / ``gelu_mul``) keeps m and one n-element tensor plus 2 bits an element
where eager keeps the gate (act's input), act's output and up (the product's inputs) and m (down's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .memory import Bytes
from .probe import Call, Event, ProbeResult

_PRODUCTS = frozenset({"mul", "__mul__", "__rmul__", "multiply"})


@dataclass(frozen=True)
class GatedMLP:
    parent: str  # module path of the MLP
    gate: str  # child attribute names
    up: str
    down: str
    storages: tuple[int, int, int, int]  # gate's output, act's output, up's output, the product


def match(probe: ProbeResult, act_path: str) -> GatedMLP | None:
    """The gated MLP around the activation module at ``act_path``, if its parent is exactly one."""
    parent, _, _ = act_path.rpartition(".")
    grand = parent.rpartition(".")[0]
    called = [e for e in probe.events.get(grand, ()) if e.module and e.what == parent]
    events = probe.events.get(parent, [])
    if not parent or len(called) != 1 or len(events) != 5:
        return None
    act = next((e for e in events if e.module and e.what == act_path), None)
    mul = next((e for e in events if not e.module and e.what in _PRODUCTS), None)
    children = [e for e in events if e.module and e is not act]
    if act is None or mul is None or len(children) != 3 or len(mul.inputs) != 2 or len(act.inputs) != 1:
        return None
    if any(e.what.rpartition(".")[0] != parent for e in children):
        return None
    gate = next((e for e in children if e.output == act.inputs[0]), None)
    up = next((e for e in children if e.output in mul.inputs and e.output != act.output), None)
    down = next((e for e in children if e.inputs == (mul.output,)), None)
    if gate is None or up is None or down is None or len({id(gate), id(up), id(down)}) != 3:
        return None
    wired = (
        set(mul.inputs) == {act.output, up.output}
        and gate.inputs == up.inputs == called[0].inputs
        and len(called[0].inputs) == 1
        and called[0].output == down.output is not None
    )
    if not wired:
        return None
    storages = (gate.output, act.output, up.output, mul.output)
    return GatedMLP(parent, _attr(gate), _attr(up), _attr(down), storages)


def _attr(event: Event) -> str:
    return event.what.rpartition(".")[2]


def gain(probe: ProbeResult, mlp: GatedMLP, act_call: Call) -> Bytes:
    """Bytes freed by fusing: what the activation (its input) and the product op (its two inputs) saved and
    nobody else keeps, less what the fused op adds: one tensor of the gate's size, two bit masks, and the
    product where nothing saved it."""
    g, s, u, m = mlp.storages
    product_op = f"{mlp.parent} (mul)"
    freed = Bytes()
    for storage in (g, s, u):
        savers = [x for x in probe.saved if x.storage == storage]
        ours = [x for x in savers if (id(act_call) in x.inside if storage == g else x.where == product_op)]
        if savers and len(ours) == len(savers):
            freed += Bytes(savers[0].nbytes, 0.0) if savers[0].scalable else Bytes(0.0, savers[0].nbytes)
    size = act_call.numel * act_call.dtype.itemsize
    product_saved = any(x.storage == m for x in probe.saved)
    added = Bytes(size if product_saved else 2 * size, 2.0 * math.ceil(act_call.numel / 8))
    return Bytes(freed.scalable - added.scalable, freed.fixed - added.fixed)
