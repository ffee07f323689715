"""Gated MLPs, recognised by what ran: a module whose forward is down(act(gate) * up) and nothing else.

The probe's events of the parent module must be exactly one of

    gate(x) -> act -> mul <- up(x),   mul -> down                (Llama, Mistral, Qwen2, Gemma, DeepSeek)
    gate_up(x) -> chunk(2, dim=-1) -> gate, up -> act(gate) -> mul <- up,   mul -> down   (Phi-3, GLM)

with x the parent's input and down's output its output, optionally with one child module between the
product and down (T5's dropout: down(dropout(m)), kept as it is).  Children that returned their input and
always will (``nn.Identity``, ``nn.Dropout`` with p = 0: timm's ``drop1``, ``norm``, ``drop2``) are no part
of the pattern; the fused forward skips them.  Anything else in the forward (casts, dropout elsewhere, MoE
routing) and the parent is not fused.  The parent's call is looked for wherever it ran: its caller may be
above its path's parent (an ``nn.ModuleList``'s owner).  Mixture-of-experts modules of transformers
(``Experts`` with grouped or batched matmuls) compute the product in their ``_apply_gate(gate_up)``;
there the events that ran inside one such call (:class:`~actpatch.analysis.probe.GateCall`) must be exactly

    chunk(2, dim=-1) of gate_up -> act(gate) -> mul <- up,   returned          (``match_experts``)

and that method is what gets the fused product.  The fused product (``actpatch.functional.silu_mul`` /
``gelu_mul``) keeps m and one n-element tensor plus 2 bits an element, where eager keeps the gate (act's
input), act's output and up (the product's inputs) and m (down's); with a fused gate_up projection the
gate and up are views of its 2n-element output, which eager keeps whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .memory import Bytes
from .probe import Call, Event, ProbeResult

_PRODUCTS = frozenset({"mul", "__mul__", "__rmul__", "multiply"})
_HALVES = {(2, ("dim", -1)), (2, -1)}  # the constants of .chunk(2, dim=-1) / .chunk(2, -1)


@dataclass(frozen=True)
class GatedParts:
    """What a fused gated MLP calls: its children by attribute name, the method that gets the product."""

    entry: str  # "forward", or "_apply_gate" (MoE experts: the product of gate_up's halves)
    gate: str  # child attribute names (gate == up: one gate_up projection, split by ``split``)
    up: str
    down: str
    split: str  # "" (two projections), "gate_first" or "up_first" (the halves of chunk(2, dim=-1))
    between: str  # a child called on the product before down (dropout), or ""
    skipped: tuple[str, ...] = ()  # children that stayed the identity, not called (``probe.stays_identity``)


@dataclass(frozen=True)
class GatedMLP:
    parent: str  # module path of the MLP
    gate: str  # child attribute names (gate == up: one gate_up projection, split by ``split``)
    up: str
    down: str
    split: str  # "" (two projections), "gate_first" or "up_first" (the halves of chunk(2, dim=-1))
    storages: tuple[int, int, int, int]  # gate, act's output, up, the product
    entry: str = "forward"  # the method that gets the fused product: "forward" or "_apply_gate"
    between: str = ""  # a child called on the product before down (dropout), or ""
    skipped: tuple[str, ...] = ()  # children that stayed the identity

    @property
    def parts(self) -> GatedParts:
        return GatedParts(self.entry, self.gate, self.up, self.down, self.split, self.between, self.skipped)


def match(probe: ProbeResult, act_path: str) -> GatedMLP | None:
    """The gated MLP around the activation at ``act_path`` (a child module, or ``"<parent>:<function>"``
    for a call by name in the parent's forward), if its parent is exactly one."""
    owner, _, function = act_path.partition(":")
    parent = owner if function else act_path.rpartition(".")[0]
    called = [e for events in probe.events.values() for e in events if e.module and e.what == parent]
    events = _pattern(probe.events.get(parent, []))
    skipped = tuple(_attr(e) for e in probe.events.get(parent, []) if e.identity)
    if not parent or len(called) != 1 or len(called[0].inputs) != 1 or len(events) not in (5, 6):
        return None
    acts = [e for e in events if e.what == act_path or (not e.module and e.what == function)]
    act = acts[0] if len(acts) == 1 else None
    mul = next((e for e in events if not e.module and e.what in _PRODUCTS), None)
    ops = [e for e in events if not e.module and e is not act]
    children = [e for e in events if e.module and e is not act]
    if act is None or mul is None or len(mul.inputs) != 2 or len(act.inputs) != 1:
        return None
    if any(e.what.rpartition(".")[0] != parent for e in children):
        return None
    mid = next((e for e in children if e.inputs == (mul.output,) and e.output is not None), None)
    mid = mid if mid and any(e.inputs == (mid.output,) for e in children) else None
    if len(events) != 5 + (mid is not None):
        return None
    children = [e for e in children if e is not mid]
    between = _attr(mid) if mid else ""
    down = next((e for e in children if e.inputs == ((mid or mul).output,)), None)
    if down is None or called[0].output != down.output or down.output is None:
        return None
    storages = lambda g, u: (g.output, act.output, u.output, mul.output)  # noqa: E731
    if len(children) == 3 and len(ops) == 1:  # gate(x), up(x)
        gate = next((e for e in children if e.output == act.inputs[0]), None)
        up = next((e for e in children if e.output in mul.inputs and e.output != act.output), None)
        if gate is None or up is None or len({id(gate), id(up), id(down)}) != 3:
            return None
        if set(mul.inputs) != {act.output, up.output} or not gate.inputs == up.inputs == called[0].inputs:
            return None
        parts = (_attr(gate), _attr(up), _attr(down), "", storages(gate, up))
        return GatedMLP(parent, *parts, between=between, skipped=skipped)
    chunk = next((e for e in ops if e.what == "chunk"), None)
    if len(children) != 2 or chunk is None or chunk.constants not in _HALVES:  # gate_up(x), chunk
        return None
    gate_up = next((e for e in children if e is not down), None)
    both = gate_up.output
    if gate_up.inputs != called[0].inputs or chunk.inputs != (both,) or act.inputs != (both,):
        return None
    up_offset = next((o for i, o in zip(mul.inputs, mul.offsets, strict=True) if i == both), None)
    if set(mul.inputs) != {both, act.output} or up_offset is None or up_offset == act.offsets[0]:
        return None
    split = "gate_first" if act.offsets[0] < up_offset else "up_first"
    name = _attr(gate_up)
    parts = (name, name, _attr(down), split, storages(gate_up, gate_up))
    return GatedMLP(parent, *parts, between=between, skipped=skipped)


def match_experts(probe: ProbeResult, act_path: str) -> GatedMLP | None:
    """The experts module around the activation at ``act_path``, if its one ``_apply_gate`` call ran
    exactly chunk -> act -> mul on the halves of its input and returned the product."""
    parent = act_path.rpartition(".")[0]
    calls = [c for c in probe.gate_calls if c.path == parent]
    if len(calls) != 1:
        return None
    call = calls[0]
    events = _pattern(probe.events.get(parent, [])[call.start : call.end])
    if len(events) != 3 or [e.module for e in events] != [False, True, False]:
        return None
    chunk, act, mul = events
    both = call.input
    if chunk.what != "chunk" or chunk.constants not in _HALVES or chunk.inputs != (both,):
        return None
    if (
        act.what != act_path
        or act.inputs != (both,)
        or mul.what not in _PRODUCTS
        or mul.output != call.output
    ):
        return None
    up_offset = next((o for i, o in zip(mul.inputs, mul.offsets, strict=True) if i == both), None)
    if set(mul.inputs) != {both, act.output} or up_offset is None or up_offset == act.offsets[0]:
        return None
    split = "gate_first" if act.offsets[0] < up_offset else "up_first"
    return GatedMLP(parent, "", "", "", split, (both, act.output, both, mul.output), "_apply_gate")


def _pattern(events: list[Event]) -> list[Event]:
    """The events that can make a pattern: all but the calls of children that stay the identity."""
    return [e for e in events if not e.identity]


def _attr(event: Event) -> str:
    return event.what.rpartition(".")[2]


def gain(probe: ProbeResult, mlp: GatedMLP, act_call: Call) -> Bytes:
    """Bytes freed by fusing: what the activation saved (its input, and its own intermediates: a Python
    formula's) and the product op (its two inputs), where nobody else keeps it, less what the fused op adds:
    one tensor of the gate's size, two bit masks, and the product where nothing saved it."""
    g, s, u, m = mlp.storages
    product_op = f"{mlp.parent} (mul)"
    freed = Bytes()
    inside = (x.storage for x in probe.saved if id(act_call) in x.inside)
    for storage in dict.fromkeys((g, s, u, *inside)).keys() - probe.excluded_storages:  # gate_up: g is u
        savers = [x for x in probe.saved if x.storage == storage]
        if savers and all(id(act_call) in x.inside or x.where == product_op for x in savers):
            freed += Bytes(savers[0].nbytes, 0.0) if savers[0].scalable else Bytes(0.0, savers[0].nbytes)
    size = act_call.numel * act_call.dtype.itemsize
    product_saved = any(x.storage == m for x in probe.saved)
    added = Bytes(size if product_saved else 2 * size, 2.0 * math.ceil(act_call.numel / 8))
    return Bytes(freed.scalable - added.scalable, freed.fixed - added.fixed)
