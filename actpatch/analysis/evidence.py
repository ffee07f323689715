"""What the walker hands each site kind: the probes, who saved what, the caller's selection, and the shape of
a kind (:class:`SiteKind`) — the one interface the walker loops over.

A kind (``actpatch.kinds``) is asked two things, in registration order:

    watch(walk)                   -> Watch: the modules whose calls the probe must record (``watched``, by
                                     id), whose ``_apply_gate`` it must observe (``gates``), and the
                                     kind's candidates as it found them (``found``)
    decide(walk, watch, decided)  appends its Decisions (site, bytes freed at each probe shape, parts to
                                  install) to ``decided``; a kind that replaces another's sites (gated
                                  replaces its activation) amends theirs there
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..report import Site
from .memory import Bytes
from .probe import Call, ProbeResult

INVERTIBLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

NO_GRADIENT = "no gradient flows through it (frozen, no_grad or reentrant checkpointing)"
CHECKPOINTED = "inside a checkpointed block: nothing is saved there, nothing to gain"
NOTHING_TO_GAIN = "nothing to gain"


def call_reason(calls: list[Call], check: Callable[[Call], str | None] = lambda _: None) -> str | None:
    """The first reason against ``calls``, call by call: no gradient, a checkpointed block, or ``check``'s
    (the kind's own); None when there is none."""
    for call in calls:
        if not call.requires_grad:
            return NO_GRADIENT
        if call.foreign_hooks:
            return CHECKPOINTED
        reason = check(call)
        if reason:
            return reason
    return None


@dataclass
class Decision:
    """One site as decided, what it frees at each probe shape, and what patching installs (the kind's parts;
    ``source``: the kind's own record of the site, for a kind amending it; ``holds``: the storages of the
    first probe its replacement keeps itself, which eager left to a later op to save)."""

    site: Site
    gains: list[Bytes]
    parts: object = None
    source: object = None
    holds: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Watch:
    watched: frozenset[int] = frozenset()  # ids of modules whose calls the probe records
    gates: frozenset[int] = frozenset()  # ids of modules whose ``_apply_gate`` calls it observes
    found: Any = None  # the kind's candidates, handed back to its ``decide``


class SiteKind(Protocol):
    name: str  # Site.kind of its sites
    option: str  # the keyword (and --flag) choosing it; "" for a kind always on
    default: bool

    def watch(self, walk: Walk) -> Watch: ...

    def decide(self, walk: Walk, watch: Watch, decided: list[Decision]) -> None: ...


@dataclass(frozen=True)
class Selection:
    """Which sites the caller chose: ``include``/``exclude`` fnmatch patterns on paths, the options on only
    to keep what is already patched (``kept_only``), and the sites patched already (they stay patched)."""

    include: list[str] | None
    exclude: list[str] | None
    already_patched: set[str]
    kept_only: frozenset[str]

    def reason(self, reason: str | None, paths: tuple[str, ...], option: str = "") -> str | None:
        """``reason`` for a site named by ``paths`` (any may be included, none excluded), or why it is not
        chosen; None for a site already patched."""
        if paths[0] in self.already_patched:
            return None
        if reason is None and option in self.kept_only:
            return f"{option}=False: only the {option} sites already patched are kept"
        included = self.include is None or any(fnmatch.fnmatchcase(p, i) for p in paths for i in self.include)
        excluded = self.exclude and any(fnmatch.fnmatchcase(p, e) for p in paths for e in self.exclude)
        if reason is None and not (included and not excluded):
            return "excluded by include/exclude"
        return reason


class Evidence:
    """What one probe says about calls: who saved what."""

    def __init__(self, probe: ProbeResult) -> None:
        self.probe = probe
        self.by_storage: dict[int, list] = defaultdict(list)
        self.by_call: dict[int, list] = defaultdict(list)
        for s in probe.saved:
            self.by_storage[s.storage].append(s)
            for c in s.inside:
                self.by_call[c].append(s)

    def outside(self, storage: int | None, call: Call) -> list:
        """The saves of ``storage`` by ops not inside ``call``."""
        return [s for s in self.by_storage.get(storage, ()) if id(call) not in s.inside]

    def consumer(self, call: Call) -> str | None:
        """The op saving ``call``'s output outside it, else the first op using it."""
        savers = self.outside(call.output_storage, call)
        return savers[0].where if savers else next(iter(call.consumers), None)


@dataclass
class Walk:
    """One walk of a model: its modules, the probes at each shape and their evidence, the selection, the
    activation each candidate module computes (``classified``, by id) and the options on."""

    model: nn.Module
    selection: Selection
    classified: dict[int, str | None]
    options: dict[str, bool]
    probes: list[ProbeResult] = field(default_factory=list)
    evidences: list[Evidence] = field(default_factory=list)

    @property
    def modules(self) -> dict[str, nn.Module]:
        """Path -> module, every path of a module reached through several parents."""
        return dict(self.model.named_modules(remove_duplicate=False))

    @staticmethod
    def held(decided: list[Decision]) -> frozenset[int]:
        """The storages the patched sites decided so far keep themselves."""
        return frozenset().union(*(d.holds for d in decided if d.site.patched))

    def on(self, kind: SiteKind) -> bool:
        return not kind.option or self.options.get(kind.option, False)

    def watched_calls(self, path: str, probe: int = 0) -> list[Call]:
        return [c for c in self.probes[probe].watched_calls if c.site == path]

    def watched_site(
        self,
        path: str,
        kind: SiteKind,
        activation: str,
        gain: Callable[[ProbeResult, Call], Bytes],
        check: Callable[[Call], str | None] = lambda _: None,
    ) -> Decision:
        """The decision on a watched module: patched when every call ran with a gradient, outside
        checkpointed blocks, passes ``check`` (the kind's own reason against a call, or None), and frees
        what ``gain`` says its calls free at each probe shape."""
        calls = self.watched_calls(path)
        gains = [sum((gain(p, c) for c in p.watched_calls if c.site == path), Bytes()) for p in self.probes]
        reason = call_reason(calls, check)
        if reason is None and gains[0].total <= 0:
            reason = NOTHING_TO_GAIN
        reason = self.selection.reason(reason, (path,), kind.option)
        consumer = self.evidences[0].consumer(calls[0]) if calls else None
        site = Site(path, activation, consumer, reason is None, reason, kind=kind.name)
        return Decision(site, gains)
