"""Site kind "activation": an activation module swapped for one keeping its output and a branch bit.

A site is patchable when all of these hold on the probe:

1. its activation is one actpatch inverts (gelu, gelu_tanh, silu, quick_gelu) or squared ReLU (relu2,
   kept from its output alone, r = √y: no branch bit; torch's own op's bits only); relu, tanh and sigmoid
   already keep only their output;
2. it is a registered submodule, or a call its owner (the module whose forward ran it) makes by a name
   its own methods read (``F.gelu``, a module-level activation object: :func:`actpatch.rebind.reason`);
3. it ran, in float32/bfloat16/float16, with a gradient flowing through it, under no other saved-tensor
   hooks (a checkpointed block saves nothing, so there is nothing to gain);
4. nothing modified its output in place;
5. a later op saved its output (or a view of its storage);
6. no other op saved its input's storage (a fused gate_up projection keeps it alive anyway);
7. swapping frees more than the branch bits it adds.

Replacement: ``actpatch.nn.InvertedGELU`` / ``InvertedSiLU`` / ``InvertedQuickGELU`` (``actpatch.functional``
``gelu``, ``silu``, ``quick_gelu``), given the module itself as the formula when it is a Python formula with
its own rounding (:func:`~actpatch.analysis.sites.runs_torch_op`), or ``InvertedReLUSquared``
(``relu_squared``), installed by :mod:`actpatch.swap`; for a call by name, the owner's methods rebound to
read actpatch's function (or that module) instead (:mod:`actpatch.rebind`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from .. import in_place, rebind, swap
from ..analysis.evidence import (
    CHECKPOINTED,
    INVERTIBLE_DTYPES,
    NO_GRADIENT,
    NOTHING_TO_GAIN,
    Decision,
    Evidence,
    Walk,
    Watch,
)
from ..analysis.memory import Bytes
from ..analysis.probe import Call, ProbeResult
from ..analysis.sites import OUTPUT_ONLY, classify_module, runs_torch_op
from ..nn import InvertedGELU, InvertedQuickGELU, InvertedReLUSquared, InvertedSiLU
from ..report import Site

_REPLACEMENTS = {  # activation -> its replacement, given the formula it must keep (None: torch's op)
    "gelu": lambda formula: InvertedGELU("none", formula),
    "gelu_tanh": lambda formula: InvertedGELU("tanh", formula),
    "silu": InvertedSiLU,
    "quick_gelu": InvertedQuickGELU,
    "relu2": lambda _: InvertedReLUSquared(),
}
WITHOUT_BITS = frozenset({"relu2"})  # kept from the output alone
rebind.MODULE_STAND_INS.update(_REPLACEMENTS)
_INVERTED = (InvertedGELU, InvertedSiLU, InvertedQuickGELU, InvertedReLUSquared)


@dataclass
class ActivationSite:
    """An activation as the probe saw it: its path, what it computes, how it is reached and its calls."""

    path: str  # a module's path; "<owner>:<function or class>" for calls by name
    activation: str
    kind: str  # "module" | "unregistered" | "functional"
    calls: list[Call] = field(default_factory=list)
    owner: nn.Module | None = None  # for calls by name, the module whose forward makes them

    def target(self) -> object:
        """What the calls call: the module, torch's function, or the one object every call used."""
        called = {id(c.function or c.module): c.function or c.module for c in self.calls}
        return next(iter(called.values())) if len(called) == 1 else None


class Activations:
    name = "activation"
    option = ""
    default = True
    label = "activations"
    help = ""

    def watch(self, walk: Walk) -> Watch:
        return Watch()

    def decide(self, walk: Walk, watch: Watch, decided: list[Decision]) -> None:
        for site in collect(walk.model, walk.probes[0], walk.classified):
            evidence = walk.evidences[0]
            reason = walk.selection.reason(_reason(evidence, site), (site.path,))
            gains = [gain(e, calls_of(e.probe, site.path), site.activation) for e in walk.evidences]
            found = Site(site.path, site.activation, _consumer(evidence, site), reason is None, reason)
            holds = frozenset(c.output_storage for c in site.calls)
            parts = rebinding(site) if reason is None else None
            decided.append(Decision(found, gains, parts, source=site, holds=holds))

    def install(self, model: nn.Module, site: Site, parts: rebind.Rebinding | None) -> None:
        if parts is not None:
            rebind.install(model.get_submodule(site.path.partition(":")[0]), parts)
            return
        original = model.get_submodule(site.path)
        formula = None if runs_torch_op(original, site.activation) else original
        swap.install(model, site.path, _REPLACEMENTS[site.activation](formula))

    def owns(self, module: nn.Module) -> bool:
        if isinstance(in_place.plan_of(module), rebind.Rebinding):
            return True
        return isinstance(module, _INVERTED) and swap.original_of(module) is not None


def site_paths(path: str, module: nn.Module) -> list[str]:
    """The sites a patched module stands for: its path, and each call by name it rebinds."""
    plan = in_place.plan_of(module)
    if not isinstance(plan, rebind.Rebinding):
        return [path]
    called = (rebind.resolve(target) for target, _, _ in plan.targets)
    return [path] + [f"{path}:{getattr(c, '__name__', None) or type(c).__name__}" for c in called]


def rebinding(site: ActivationSite) -> rebind.Rebinding | None:
    """The plan rebinding a call by name, for a site to patch (None for a module site)."""
    if site.kind == "module":
        return None
    target = site.target()
    by_formula = isinstance(target, nn.Module) and not runs_torch_op(target, site.activation)
    return rebind.plan(site.owner, target, site.activation, by_formula)


def collect(model: nn.Module, probe: ProbeResult, classified: dict[int, str | None]) -> list[ActivationSite]:
    """Activation sites in call order (uncalled activation modules last); nested calls are dropped."""
    sites: dict[str, ActivationSite] = {}
    activation_calls: set[int] = set()
    for call in probe.calls:
        activation = call.activation if call.kind == "functional" else _classify(call.module, classified)
        if activation is None:
            continue
        activation_calls.add(id(call))
        owner = model.get_submodule(call.site.partition(":")[0]) if call.kind != "module" else None
        site = sites.setdefault(call.site, ActivationSite(call.site, activation, call.kind, owner=owner))
        site.calls.append(call)
    for site in list(sites.values()):  # a call inside another activation (ClippedGELU -> gelu) is its part
        site.calls = [c for c in site.calls if not (c.parents & activation_calls)]
        if not site.calls:
            del sites[site.path]
    for path, m in model.named_modules():
        activation = classified.get(id(m))
        if activation is not None and path not in sites:
            sites[path] = ActivationSite(path, activation, "module")
    return list(sites.values())


def _classify(module: nn.Module | None, classified: dict[int, str | None]) -> str | None:
    if module is None:
        return None
    if id(module) not in classified:
        classified[id(module)] = classify_module(module)
    return classified[id(module)]


def _consumer(evidence: Evidence, site: ActivationSite) -> str | None:
    """The op saving the site's output (first call first), else the first op using it."""
    for call in site.calls:
        savers = evidence.outside(call.output_storage, call)
        if savers:
            return savers[0].where
    return next((c.consumers[0] for c in site.calls if c.consumers), None)


def calls_of(probe: ProbeResult, path: str) -> list[Call]:
    return [c for c in probe.calls if c.site == path]


def basic_reason(site: ActivationSite, by_name: bool = True) -> str | None:
    """Rules 1-4: what any swap of this site needs, whatever saves its output or keeps its input (rule 2,
    whether a call by name can be rebound, only ``by_name``: fusing a gated MLP replaces its forward)."""
    if site.activation == "relu" and site.calls and all(_squared(c) for c in site.calls):
        return "squared ReLU written inline (relu, then square): only a module computing it is swapped"
    if site.activation in OUTPUT_ONLY:
        return f"{site.activation} already keeps only its output"
    if site.activation not in _REPLACEMENTS:
        return f"unsupported activation ({site.activation})"
    if not site.calls:
        return "not called by the probe forward"
    by_name_reason = _by_name_reason(site) if by_name and site.kind != "module" else None
    if by_name_reason is not None:
        return by_name_reason
    if site.activation in WITHOUT_BITS and not runs_torch_op(site.calls[0].module, site.activation):
        return f"{site.activation} with its own rounding: the replacement computes torch's op"
    for call in site.calls:
        if call.dtype not in INVERTIBLE_DTYPES:
            return f"{str(call.dtype).removeprefix('torch.')} inputs run the plain op"
        if not call.requires_grad:
            return NO_GRADIENT
        if call.foreign_hooks:
            return CHECKPOINTED
        if call.inplace:
            return f"output modified in place ({call.inplace})"
    return None


def _squared(call: Call) -> bool:
    """A call whose output only a square (``square``, ``pow``, ``**``) uses (not ``mul``: ReGLU's
    relu(a) * b would pass for x * x)."""
    ops = [c.rpartition(" (")[2].rstrip(")") for c in call.consumers]
    return bool(ops) and all(op in ("square", "pow") for op in ops)


def _by_name_reason(site: ActivationSite) -> str | None:
    """Why calls by name (a function, an unregistered module) cannot be rebound in their owner."""
    target = site.target()
    if target is None:
        return "a new activation object at each call: cannot be rebound"
    if not isinstance(target, nn.Module) and target not in rebind.STAND_INS:
        return f"functional {site.activation}: no drop-in function"
    return rebind.reason(site.owner, target)


def _reason(evidence: Evidence, site: ActivationSite) -> str | None:
    """Rules 1-7 on one probe's evidence: None when the site is worth swapping."""
    reason = basic_reason(site)
    if reason is not None:
        return reason
    for call in site.calls:
        if not evidence.outside(call.output_storage, call):
            used = f" (used by {call.consumers[0]})" if call.consumers else ""
            return f"output not saved by a later op{used}"
        keepers = evidence.outside(call.input_storage, call)
        if keepers:
            return f"input kept alive by {keepers[0].where} (shared storage, e.g. a fused projection)"
    freed = gain(evidence, site.calls, site.activation)
    if freed.total <= 0:
        return NOTHING_TO_GAIN
    return None


def gain(evidence: Evidence, calls: list[Call], activation: str) -> Bytes:
    """Bytes freed by swapping these calls: their own saves nobody else keeps, less the branch bits."""
    probe = evidence.probe
    total = Bytes()
    for call in calls:
        seen: set[int] = {call.output_storage}
        for s in evidence.by_call.get(id(call), ()):
            if s.storage in seen or s.storage in probe.excluded_storages:
                continue
            seen.add(s.storage)
            if not evidence.outside(s.storage, call):
                total += Bytes(s.nbytes, 0.0) if s.scalable else Bytes(0.0, s.nbytes)
        if activation not in WITHOUT_BITS:
            total += Bytes(0.0, -math.ceil(call.numel / 8))
    return total
