"""Site kind "norm": an RMSNorm that keeps x and 1/rms instead of float32 copies (option ``norms``).

Candidates: every module computing an RMSNorm bitwise as ``actpatch.kernels.rms_norm`` does
(:mod:`actpatch.analysis.norms`).  Patched when it ran with a float input and a gradient, under no other
saved-tensor hooks, its input unchanged in place afterwards (the replacement keeps it), and keeping x and
1/rms frees more than it adds.

Replacement: the module's class becomes a same-name subclass running :class:`InvertedNorm`
(:mod:`actpatch.in_place`), which calls ``actpatch.functional.rms_norm``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .. import functional as F
from .. import in_place
from ..analysis import norms
from ..analysis.evidence import Decision, Walk, Watch
from ..analysis.probe import Call
from ..report import Site


@dataclass(frozen=True)
class InvertedNorm:
    """An RMSNorm's plan: ``forward(x)`` = ``actpatch.functional.rms_norm`` (keeps x and 1/rms)."""

    variant: str
    eps_attr: str
    entry = "forward"

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, module.weight, getattr(module, self.eps_attr), self.variant)


class Norms:
    name = "norm"
    option = "norms"
    default = True
    label = "norms"
    help = "RMSNorms keep their input and 1/rms, not float32 copies."

    def watch(self, walk: Walk) -> Watch:
        found = norms.candidates(walk.model)
        return Watch(watched=frozenset(found), found=found)

    def decide(self, walk: Walk, watch: Watch, decided: list[Decision]) -> None:
        modules = walk.modules
        for path, eps_attr in watch.found.values():
            variant = norms.variant_of(modules[path], eps_attr) if walk.watched_calls(path) else None
            if variant is None:
                continue
            decision = walk.watched_site(path, self, "rms_norm", norms.gain, _input_unchanged)
            decision.parts = norms.NormParts(variant, eps_attr)
            decided.append(decision)

    def install(self, model: nn.Module, site: Site, parts: norms.NormParts) -> None:
        in_place.install(model.get_submodule(site.path), InvertedNorm(**asdict(parts)))

    def owns(self, module: nn.Module) -> bool:
        return isinstance(in_place.plan_of(module), InvertedNorm)


def _input_unchanged(call: Call) -> str | None:
    return f"{call.inplace}: the replacement keeps its input" if call.inplace else None
