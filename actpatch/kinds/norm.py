"""Site kind "norm": a norm that keeps its output, or an RMSNorm its input (option ``norms``).

Candidates: every module computing a norm bitwise as actpatch's kernels do (:mod:`actpatch.analysis.norms`:
Hugging Face's RMSNorms, ``nn.RMSNorm``, ``nn.LayerNorm`` and the families' LayerNorms).  Per site, from the
probe (:func:`~actpatch.analysis.norms.keeps`):

- keeps its **output** (y, shared with the later op that saves that very storage, and 1/σ per row) when such
  an op exists and nothing else saves the norm's input;
- else, an RMSNorm keeps its **input** (x and 1/rms, not float32 copies), its input unchanged in place
  afterwards;
- else it is left as it is;
- a module named and shaped as a norm that matches no form bitwise is reported, left as it is;
- a norm computed by a function inside another module's forward (``F.layer_norm``, ``F.rms_norm``) is
  reported, left as it is;

patched when it ran with a float input and a gradient, under no other saved-tensor hooks, and frees more than
it adds.  A weight with zeros or tiny entries (``actpatch.kernels.norm_output.safe_weight``) keeps the input:
decided here for the projection, and again in training whenever the weight changes (its version counter).
Under torch.compile, where reading the weight would break the graph, the check is made outside it, for every
dtype y may have: at patching and after every step of a ``torch.optim`` optimizer (a global step hook); the
graph reads the answer as a Python constant (Dynamo guards it: a weight turning unsafe recompiles the graph,
which then keeps the input).  A weight changed otherwise (``load_state_dict``, ``copy_``) while compiled is
checked at the next optimizer step, or by :func:`check_weights`.

Replacement: the module's class becomes a same-name subclass running a plan (:mod:`actpatch.in_place`):
:class:`NormFromOutput` (``actpatch.functional.rms_norm_from_output`` / ``layer_norm``) or
:class:`InvertedNorm` (``actpatch.functional.rms_norm``).
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import functional as F
from .. import in_place
from ..analysis import norms
from ..analysis.evidence import CHECKPOINTED, NO_GRADIENT, Decision, Walk, Watch
from ..analysis.memory import Bytes
from ..analysis.probe import Call
from ..kernels import norm_output
from ..report import Site

_NAMED_NORM = re.compile("norm", re.IGNORECASE)  # the class name proposes; the value decides
_UNRECOGNISED = (
    f"computes no norm actpatch's kernels reproduce bitwise ({', '.join((*norms.RMS_FORMS, 'layer'))})"
)
_FUNCTIONAL = "functional call: a norm computed by a function, not a module, is not replaced"


@dataclass(frozen=True)
class InvertedNorm:
    """An RMSNorm's plan keeping its input: ``forward(x)`` = ``actpatch.functional.rms_norm`` (x, 1/rms)."""

    variant: str
    eps_attr: str
    eps: float | None = None  # when eps_attr is ""
    weight: str = "weight"
    entry = "forward"

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        eps = getattr(module, self.eps_attr) if self.eps_attr else self.eps
        return F.rms_norm(x, getattr(module, self.weight), eps, self.variant)


@dataclass(frozen=True)
class NormFromOutput:
    """A norm's plan keeping its output and 1/σ (``form`` "layer": ``actpatch.functional.layer_norm``, else
    ``rms_norm_from_output``); where the weight is unsafe to divide by, its input instead.  ``safe``: the
    weight check per dtype of y, made outside torch.compile's graph (``check``), read inside it."""

    form: str
    eps_attr: str
    eps: float | None = None  # when eps_attr is ""
    weight: str = "weight"
    safe: dict[torch.dtype, bool] = field(default_factory=dict, compare=False, repr=False)
    entry = "forward"

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        w, b = getattr(module, self.weight, None), getattr(module, "bias", None)
        eps = getattr(module, self.eps_attr) if self.eps_attr else self.eps
        safe = self.safe.get(x.dtype, False) if torch.compiler.is_compiling() else None
        if self.form == "layer":
            return F.layer_norm(x, x.shape[-1:], w, b, eps, weight_safe=safe)
        return F.rms_norm_from_output(x, w, eps, self.form, weight_safe=safe)

    def check(self, module: nn.Module) -> None:
        """The weight check for every dtype of y (one host sync, none where the weight has not changed); a
        weight on meta has no values: unchecked, a compiled graph keeps the input until it is."""
        w, b = getattr(module, self.weight, None), getattr(module, "bias", None)
        if not any(t is not None and t.is_meta for t in (w, b)):
            self.safe.update(norm_output.keeps_output_by_dtype(w, b, self.form))


# modules installed with a NormFromOutput, in patching order: the same on every rank, whose sharded weights
# (FSDP2) are gathered in that order
_CHECKED: dict[int, weakref.ref[nn.Module]] = {}
_STEP_HOOK: list = []  # the handle of the global optimizer step hook, once registered


def check_weights(*_: object) -> None:
    """Every norm keeping its output checks its weight again, for torch.compile (``NormFromOutput.check``);
    run after every ``torch.optim`` optimizer step."""
    for ref in list(_CHECKED.values()):
        module = ref()
        if module is not None and isinstance(plan := in_place.plan_of(module), NormFromOutput):
            plan.check(module)


def _checked_in_training(module: nn.Module) -> None:
    """Check ``module``'s weight now and after every optimizer step."""
    if not _STEP_HOOK:
        _STEP_HOOK.append(register_optimizer_step_post_hook(check_weights))
    key = id(module)
    if key not in _CHECKED:  # an entry leaves when its module is collected
        _CHECKED[key] = weakref.ref(module, lambda _: _CHECKED.pop(key, None))
    in_place.plan_of(module).check(module)


class Norms:
    name = "norm"
    option = "norms"
    default = True
    label = "norms"
    help = "Norms keep their output (shared with the next op) and 1/σ; or RMSNorms x and 1/rms."

    def watch(self, walk: Walk) -> Watch:
        found = norms.candidates(walk.model)
        return Watch(watched=frozenset(found), found=found)

    def decide(self, walk: Walk, watch: Watch, decided: list[Decision]) -> None:
        modules = walk.modules
        for path, eps_attr in watch.found.values():
            calls = walk.watched_calls(path)
            found = norms.recognise(modules[path], eps_attr) if calls else None
            if found is None:
                if calls and _NAMED_NORM.search(type(modules[path]).__name__):
                    decided.append(self._unrecognised(walk, path, modules[path]))
                continue
            form, eps = found
            kept = norms.keeps(walk.evidences[0], calls, form, walk.held(decided))
            if kept == "output" and not _safe(modules[path], form, calls):
                kept = "input" if form in norms.KEEPS_INPUT else None
            activation = "layer_norm" if form == "layer" else "rms_norm"
            if kept is None:
                decision = walk.watched_site(path, self, activation, lambda p, c: norms.gain(p, c, "output"))
                reason = _why_not(walk, decision.site, calls, walk.held(decided))
                decision.site.patched, decision.site.reason = False, reason
            else:
                check = _input_unchanged if kept == "input" else lambda _: None
                gain = lambda p, c, kept=kept: norms.gain(p, c, kept)  # noqa: E731
                decision = walk.watched_site(path, self, activation, gain, check)
                decision.site.keeps = kept
                weight = norms.weight_name(modules[path])
                decision.parts = norms.NormParts(form, eps_attr, kept, eps if not eps_attr else None, weight)
            decided.append(decision)
        sites = {d.site.path for d in decided if d.site.kind == self.name}
        for path, function in norms.functional_calls(walk.probes[0], sites):
            site = Site(path, function, None, False, _FUNCTIONAL, kind=self.name)
            decided.append(Decision(site, [Bytes() for _ in walk.probes]))

    def _unrecognised(self, walk: Walk, path: str, module: nn.Module) -> Decision:
        """A module named as a norm and shaped as one that computes none of the forms bitwise (DeBERTa's
        float32 LayerNorm, Nemotron's LayerNorm1P): reported, left as it is."""
        site = Site(path, type(module).__name__, None, False, _UNRECOGNISED, kind=self.name)
        return Decision(site, [Bytes() for _ in walk.probes])

    def install(self, model: nn.Module, site: Site, parts: norms.NormParts) -> None:
        plan = NormFromOutput if parts.keeps == "output" else InvertedNorm
        module = model.get_submodule(site.path)
        in_place.install(module, plan(parts.form, parts.eps_attr, parts.eps, parts.weight))
        if plan is NormFromOutput:
            _checked_in_training(module)

    def owns(self, module: nn.Module) -> bool:
        return isinstance(in_place.plan_of(module), InvertedNorm | NormFromOutput)


def _safe(module: nn.Module, form: str, calls: list[Call]) -> bool:
    """Whether the weight (and bias) allow rebuilding x̂ from y (``norm_output.keeps_output``; a model on
    meta has no values: assumed so)."""
    w, b = getattr(module, norms.weight_name(module), None), getattr(module, "bias", None)
    if any(t is not None and t.is_meta for t in (w, b)):
        return True
    return norm_output.keeps_output(w, b, calls[0].dtype, form)


def _why_not(walk: Walk, site: Site, calls: list[Call], held: frozenset[int]) -> str | None:
    """The reason a norm that can keep neither its output nor its input is left alone."""
    if site.reason in (NO_GRADIENT, CHECKPOINTED):
        return site.reason
    evidence, call = walk.evidences[0], calls[0]
    if call.input_storage in held:
        return "input kept by the patched activation before it: nothing to gain"
    savers = evidence.outside(call.input_storage, call)
    if savers:
        return f"input kept by {savers[0].where} and its own backward: nothing to gain"
    if norms.output_saved(walk.probes[0], call):
        return "its weight is zero, tiny or small against its bias on some channel: y cannot give x̂ back"
    if evidence.outside(call.output_storage, call):
        return "output saved only by the next norm, which keeps its own output: keeping it would add memory"
    return "output not saved by a later op: keeping it would add memory"


def _input_unchanged(call: Call) -> str | None:
    return f"{call.inplace}: the replacement keeps its input" if call.inplace else None
