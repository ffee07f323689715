"""The site kinds, one module each, and their registry.

A kind knows how its candidates are found and judged (the :class:`~actpatch.analysis.evidence.SiteKind`
protocol the walker loops over: ``watch``, ``decide``) and what it installs (``install``, and ``owns`` to
recognise its own work; :mod:`actpatch.swap` or :mod:`actpatch.in_place` undo it).  Its ``option`` is the
keyword of ``analyze``/``patch_model`` and the ``--option/--no-option`` flag of the CLI choosing it
(``default`` when not given; "" for a kind always on), ``label`` names its sites in the report, ``help``
describes the flag; a ``contextual`` kind's sites depend on the run's context (autocast), and manifests do
not record them; a kind ``left_to_compiler`` is not patched for training under torch.compile.

    KINDS                 in decision order: a kind may amend the decisions of those before it
    options()             option -> default, for every kind with one
    kind_of(module)       the kind owning a patched module (None: not patched)
    site_paths(path, m)   the sites a patched module stands for (a rebound one: its calls by name too)
"""

from __future__ import annotations

from torch import nn

from ..report import KIND_LABELS
from .activation import Activations
from .activation import site_paths as site_paths
from .cast import Casts
from .dropout import Dropouts
from .gated import Gated
from .norm import Norms

KINDS = (Activations(), Gated(), Norms(), Dropouts(), Casts())
KIND_LABELS.update({k.name: k.label for k in KINDS})


def options() -> dict[str, bool]:
    return {k.option: k.default for k in KINDS if k.option}


def by_name(name: str):
    return next(k for k in KINDS if k.name == name)


def kind_of(module: nn.Module):
    return next((k for k in KINDS if k.owns(module)), None)
