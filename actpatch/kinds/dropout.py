"""Site kind "dropout": an ``nn.Dropout`` that keeps its mask as bits (option ``dropouts``).

Candidates: :func:`actpatch.analysis.dropouts.candidates` (0 < p < 1).  Patched when it ran with a gradient,
under no other saved-tensor hooks, not in place, and its mask's bits free more than they add.

Replacement: ``actpatch.nn.PackedDropout(p)`` (``actpatch.functional.dropout``: the same random draws,
outputs and gradients, bitwise), installed by :mod:`actpatch.swap`.
"""

from __future__ import annotations

from torch import nn

from .. import swap
from ..analysis import dropouts
from ..analysis.evidence import Decision, Walk, Watch
from ..nn import PackedDropout
from ..report import Site

_INPLACE = "in-place dropout (inplace=True): left as it is"


class Dropouts:
    name = "dropout"
    option = "dropouts"
    default = False
    label = "dropouts"
    help = "Dropouts keep their masks as bits (same outputs and gradients; eager training)."
    left_to_compiler = True  # under torch.compile its sites are not patched (actpatch.compiled)

    def watch(self, walk: Walk) -> Watch:
        found = dropouts.candidates(walk.model)
        return Watch(watched=frozenset(found), found=found)

    def decide(self, walk: Walk, watch: Watch, decided: list[Decision]) -> None:
        modules = walk.modules
        for path in watch.found.values():
            if not walk.watched_calls(path):
                continue
            decision = walk.watched_site(path, self, "dropout", dropouts.gain)
            if modules[path].inplace and path not in walk.selection.already_patched:
                decision.site.patched, decision.site.reason = False, _INPLACE
            decided.append(decision)

    def install(self, model: nn.Module, site: Site, parts: object) -> None:
        swap.install(model, site.path, PackedDropout(model.get_submodule(site.path).p))

    def owns(self, module: nn.Module) -> bool:
        return isinstance(module, PackedDropout) and swap.original_of(module) is not None
