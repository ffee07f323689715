"""Site kind "gated": a gated MLP, down(act(gate(x)) · up(x)), whose product is fused (option ``gated``).

An activation site that passes rules 1-4 of the activation kind, whose parent module is a gated MLP at every
probe shape (:func:`actpatch.analysis.gated.match`, ``match_experts``), yields a site of kind "gated" at the
parent, fused when it frees memory, and at least as much as inverting the activation alone would (rules 5
and 6 do not apply: the fused product keeps its own tensors, and a fused gate_up output kept alive through
the product's input is what fusing frees); the activation's site is then reported as fused into it.

Replacement: the MLP's class becomes a same-name subclass running :class:`FusedGated`
(:mod:`actpatch.in_place`), which calls ``actpatch.functional.silu_mul`` / ``gelu_mul`` (on the halves of one
gate_up tensor, ``silu_mul_halves`` / ``gelu_mul_halves``).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .. import functional as F
from .. import in_place
from ..analysis import gated
from ..analysis.evidence import Decision, Walk, Watch
from ..analysis.probe import stays_identity
from ..kernels.gated import GATED
from ..report import Site
from .activation import ActivationSite, basic_reason, calls_of

_PRODUCTS = {
    "silu": F.silu_mul,
    "gelu": F.gelu_mul,
    "gelu_tanh": functools.partial(F.gelu_mul, approximate="tanh"),
}
_HALVES_PRODUCTS = {
    "silu": F.silu_mul_halves,
    "gelu": F.gelu_mul_halves,
    "gelu_tanh": functools.partial(F.gelu_mul_halves, approximate="tanh"),
}


@dataclass(frozen=True)
class FusedGated:
    """A gated MLP's plan: ``forward(x)`` = down(between(act(gate(x)) · up(x))) with the product fused
    (``split``: the two halves of one gate_up(x)), or, for ``entry`` "_apply_gate" (MoE experts), the fused
    product of gate_up's halves.  Children that stayed the identity (``nn.Identity``, ``nn.Dropout(0)``:
    ``skipped``) are not called; one that no longer is (a dropout given p > 0 after patching) is an error,
    never a silent skip."""

    activation: str
    entry: str
    gate: str
    up: str
    down: str
    split: str
    between: str
    skipped: tuple[str, ...] = ()

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for name in self.skipped:
            if not stays_identity(getattr(module, name)):
                raise RuntimeError(
                    f"actpatch: {name} of this fused gated MLP was the identity when patched and no longer "
                    "is; call actpatch.unpatch_model and patch_model again"
                )
        if self.entry == "_apply_gate":
            return self._halves_product(x)
        if self.split:
            m = self._halves_product(getattr(module, self.gate)(x))
        else:
            m = _PRODUCTS[self.activation](getattr(module, self.gate)(x), getattr(module, self.up)(x))
        return getattr(module, self.down)(getattr(module, self.between)(m) if self.between else m)

    def _halves_product(self, gate_up: torch.Tensor) -> torch.Tensor:
        return _HALVES_PRODUCTS[self.activation](gate_up, gate_first=self.split == "gate_first")


class Gated:
    name = "gated"
    option = "gated"
    default = True
    label = "gated MLPs"
    help = "Fuse gated MLPs (SwiGLU, GeGLU): keep the product and the gate."

    def watch(self, walk: Walk) -> Watch:
        """Transformers' MoE experts compute act(gate) · up in ``_apply_gate``: the probe observes it."""
        experts = (m for m in walk.model.modules() if _has_apply_gate(m, walk.classified))
        return Watch(gates=frozenset(id(m) for m in experts))

    def decide(self, walk: Walk, watch: Watch, decided: list[Decision]) -> None:
        """Each activation decision inside a gated MLP is replaced by (or, fused, joined by) the MLP's."""
        for alone in list(decided):
            if not isinstance(alone.source, ActivationSite):
                continue
            fused = self._fused(walk, alone.source)
            if fused is None:
                continue
            site = alone.site
            alone_frees_more = site.reason is None and fused.gains[0].total < alone.gains[0].total
            if alone_frees_more and fused.site.path not in walk.selection.already_patched:
                continue  # invert the activation alone
            decided.insert(decided.index(alone), fused)
            if fused.site.patched:
                site.patched, site.reason = False, f"fused into the gated product at {fused.site.path}"

    def _fused(self, walk: Walk, site: ActivationSite) -> Decision | None:
        """The gated MLP's decision replacing ``site`` (an activation passing rules 1-4 in a gated MLP at
        every probe shape; its input may be kept alive by the product: fusing frees it)."""
        if site.activation not in GATED or basic_reason(site, by_name=False) is not None:
            return None
        mlps, gains = [], []
        for probe in walk.probes:
            calls = calls_of(probe, site.path)
            mlp = gated.match(probe, site.path) or gated.match_experts(probe, site.path)
            if len(calls) != 1 or mlp is None:
                return None
            mlps.append(mlp)
            gains.append(gated.gain(probe, mlp, calls[0]))
        mlp = mlps[0]
        if any((m.parent, m.parts) != (mlp.parent, mlp.parts) for m in mlps) or gains[0].total <= 0:
            return None
        reason = walk.selection.reason(None, (mlp.parent, site.path), self.option)
        consumer = next((s.where for s in walk.probes[0].saved if s.storage == mlp.storages[3]), None)
        fused = Site(mlp.parent, site.activation, consumer, reason is None, reason, kind=self.name)
        return Decision(fused, gains, mlp.parts)

    def install(self, model: nn.Module, site: Site, parts: gated.GatedParts) -> None:
        in_place.install(model.get_submodule(site.path), FusedGated(site.activation, **asdict(parts)))

    def owns(self, module: nn.Module) -> bool:
        return isinstance(in_place.plan_of(module), FusedGated)


def _has_apply_gate(module: nn.Module, classified: dict[int, str | None]) -> bool:
    """A module with an ``_apply_gate`` method of its class (transformers' MoE experts) and an activation
    child actpatch can fuse."""
    if "_apply_gate" in vars(module) or not callable(getattr(type(module), "_apply_gate", None)):
        return False
    return any(classified.get(id(child)) in GATED for child in module.children())
