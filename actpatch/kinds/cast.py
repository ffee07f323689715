"""Site kind "cast": Linears under autocast reading one tensor share one cast of it (option ``casts``).

Candidates (:mod:`actpatch.analysis.casts`): the ``nn.Linear`` modules.  A group is their calls given the
same input tensor (q, k, v of one hidden state; gate and up) of which one at least kept a cast of it
(autocast ran); each Linear of a group is a site, patched when every call of the group ran with a gradient,
under no other saved-tensor hooks, and it frees its cast (it reads the first chosen Linear's instead) or is
that first one and another frees its own.  The outputs and gradients are eager's, bitwise
(:func:`actpatch.functional.autocast_input`).  Its sites depend on the run's autocast, so
manifests do not record them (``contextual``): ``patch_model`` under the same autocast finds them again.

Replacement: each Linear of the group becomes a same-name subclass running :class:`SharedCast`
(:mod:`actpatch.in_place`): ``F.linear(autocast_input(x), weight, bias)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import in_place
from ..analysis import casts
from ..analysis.evidence import NOTHING_TO_GAIN, Decision, Walk, Watch, call_reason
from ..analysis.memory import Bytes
from ..functional import autocast_input
from ..report import Site


@dataclass(frozen=True)
class SharedCast:
    """A Linear's plan: ``forward(x)`` = ``F.linear(autocast_input(x), weight, bias)``."""

    entry = "forward"

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(autocast_input(x), module.weight, module.bias)


class Casts:
    name = "cast"
    option = "casts"
    default = True
    label = "shared casts"
    help = "Linears under autocast reading one tensor share one cast of it (same outputs and gradients)."
    contextual = True

    def watch(self, walk: Walk) -> Watch:
        found = casts.candidates(walk.model)
        return Watch(watched=frozenset(found), found=found)

    def decide(self, walk: Walk, watch: Watch, decided: list[Decision]) -> None:
        for group in casts.groups(walk.probes[0], watch.found):
            cast = next(filter(None, (casts.cast_of(walk.evidences[0], c) for c in group)), None)
            if cast is None:  # no call casts its input (no autocast): not a site
                continue
            paths = list(dict.fromkeys(c.site for c in group))
            reason = call_reason(group)
            reasons = {p: walk.selection.reason(reason, (p,), self.option) for p in paths}
            chosen = [p for p in paths if reasons[p] is None]
            shares = [casts.shares(evidence, chosen) for evidence in walk.evidences]
            holder = next(iter(shares[0]), None)
            gaining = [p for p, freed in shares[0].items() if freed.total > 0]
            dtype = str(cast.dtype).removeprefix("torch.")
            for path in paths:
                gains = [s.get(path, Bytes()) for s in shares]
                why = reasons[path]
                if why is None and not (gaining if path == holder else path in gaining):
                    why = NOTHING_TO_GAIN
                site = Site(
                    path, f"to {dtype}", _sharing(path, holder, gaining), why is None, why, kind=self.name
                )
                decided.append(Decision(site, gains))

    def install(self, model: nn.Module, site: Site, parts: object) -> None:
        in_place.install(model.get_submodule(site.path), SharedCast())

    def owns(self, module: nn.Module) -> bool:
        return isinstance(in_place.plan_of(module), SharedCast)


def _sharing(path: str, holder: str | None, gaining: list[str]) -> str | None:
    """Who shares whose cast: the first Linear's, named relative to its parent."""
    if holder is None or not gaining:
        return None
    parent = holder.rpartition(".")[0]
    name = lambda p: p.removeprefix(f"{parent}.") if parent else p  # noqa: E731
    if path == holder:
        return f"its cast shared with {', '.join(map(name, gaining))}"
    return f"shares {name(holder)}'s cast"
