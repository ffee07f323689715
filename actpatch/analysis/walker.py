"""The graph walker: candidates, probes, the evidence rules, and the report.

A site is patchable when all of these hold on the probe:

1. its activation is one actpatch inverts (gelu, gelu_tanh, silu, quick_gelu);
2. it is a registered submodule (functional calls and module-level singletons are reported only);
3. it ran, in float32/bfloat16/float16, with a gradient flowing through it, under no other saved-tensor
   hooks (a checkpointed block saves nothing, so there is nothing to gain);
4. nothing modified its output in place;
5. a later op saved its output (or a view of its storage);
6. no other op saved its input's storage (a fused gate_up projection keeps it alive anyway);
7. swapping frees more than the branch bits it adds.

Sites that pass are then filtered by ``include``/``exclude`` (fnmatch patterns on the path).  With
``gated``, an activation that passes rules 1-4 and whose parent module is a gated MLP at every probe
shape (:func:`actpatch.analysis.gated.match`) yields a site of kind "gated" at the parent, fused when it
frees memory, and at least as much as inverting the activation alone would (rules 5 and 6 do not apply:
the fused product keeps its own tensors, and a fused gate_up output kept alive through the product's
input is what fusing frees); the activation site is then reported as fused into it.

With ``norms``, every module that computes an RMSNorm bitwise as ``actpatch.kernels.rms_norm`` does
(:mod:`actpatch.analysis.norms`) is a site of kind "norm", patched when it ran with a float input and a
gradient, under no other saved-tensor hooks, its input unchanged in place afterwards (the replacement keeps
it), and keeping x and 1/rms frees more than it adds.

With ``dropouts``, every ``nn.Dropout`` with 0 < p < 1 that ran (:mod:`actpatch.analysis.dropouts`) is a
site of kind "dropout", patched when it ran with a gradient, under no other saved-tensor hooks, not in
place, and its mask's bits free more than they add.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..kernels.gated import GATED
from ..report import PatchReport, Projection, Site
from . import dropouts as _dropouts
from . import gated
from . import norms as _norms
from .inputs import input_spec, model_dtype, unwrap
from .memory import Bytes, Fit, Projector, fit_kind, probe_shapes
from .probe import Call, ProbeResult, run_probe
from .sites import INVERTIBLE, classify_module, is_candidate

INVERTIBLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OPTIONS = {"gated": "gated", "norm": "norms", "dropout": "dropouts"}  # site kind -> the option choosing it


@dataclass
class _Site:
    path: str
    activation: str
    kind: str  # "module" | "unregistered" | "functional"
    calls: list[Call] = field(default_factory=list)


def walk(
    model: nn.Module,
    *,
    batch_size: int,
    seq_len: int,
    dtype: torch.dtype | None,
    example_inputs: object,
    include: list[str] | None,
    exclude: list[str] | None,
    already_patched: set[str],
    gated: bool = False,
    norms: bool = False,
    dropouts: bool = False,
    kept_only: frozenset[str] = frozenset(),
) -> PatchReport:
    """Analyse ``model`` (whose originals are in place) and decide every site; changes nothing.
    With ``gated``, an activation inside a gated MLP (``gated.match``) is fused with its product; with
    ``norms``, RMSNorms keep x and 1/rms; with ``dropouts``, dropout modules keep their masks as bits.
    The options named in ``kept_only`` ("gated", "norms", "dropouts") are on only to report the sites of
    that kind in ``already_patched``: the others of that kind are left alone."""
    selection = _Selection(include, exclude, already_patched, kept_only)
    target = dtype or model_dtype(model)
    with torch.random.fork_rng(devices=[]):
        kinds = {id(m): classify_module(m) for m in model.modules() if is_candidate(m)}
    norm_candidates = _norms.candidates(model) if norms else {}
    dropout_candidates = _dropouts.candidates(model) if dropouts else {}
    gate_modules = frozenset(id(m) for m in model.modules() if gated and _has_apply_gate(m, kinds))
    with _meta_cast(model, target):
        probe_dtype = model_dtype(model)
        spec = input_spec(model, example_inputs)
        shapes = probe_shapes(spec.seq_dependent, spec.max_seq, spec.fixed_shape, batch_size)
        ids = frozenset(norm_candidates) | frozenset(dropout_candidates)
        probes = [run_probe(model, *spec.make(b, s), probe_dtype, ids, gate_modules) for b, s in shapes]
    sites = _collect_sites(model, probes[0], kinds)
    evidences = [_Evidence(p) for p in probes]
    decided: list[tuple[Site, list[Bytes]]] = []  # each site, and what it frees at each probe shape
    parts: dict[str, gated.GatedParts | _norms.NormParts] = {}
    for site in sites:
        reason, consumer = evidences[0].judge(site)
        reason = selection.reason(reason, (site.path,))
        gains = [e.gain(_calls_of(e.probe, site)) for e in evidences]
        fused = None
        if gated:
            basic = evidences[0].basic_reason(site)
            fused = _gated_site(site, basic, probes, selection)
        alone_frees_more = fused is not None and reason is None and _total(fused[1][0]) < _total(gains[0])
        if alone_frees_more and fused[0].path not in selection.already_patched:  # invert the activation alone
            fused = None
        if fused is not None:
            fused_site, fused_gains, parts[fused_site.path] = fused
            decided.append((fused_site, fused_gains))
            if fused_site.patched:
                reason = f"fused into the gated product at {fused_site.path}"
        decided.append((Site(site.path, site.activation, consumer, reason is None, reason), gains))
    modules = dict(model.named_modules())
    for path, eps_attr in norm_candidates.values():
        norm = _norm_site(modules[path], path, eps_attr, probes, selection)
        if norm is not None:
            norm_site, norm_gains, parts[path] = norm
            decided.append((norm_site, norm_gains))
    for path in dropout_candidates.values():
        dropout = _dropout_site(modules[path], path, probes, selection)
        if dropout is not None:
            decided.append(dropout)

    kind = fit_kind(spec.seq_dependent, spec.fixed_shape)
    ratio = target.itemsize / probe_dtype.itemsize
    patched = [site for site, _ in decided if site.patched]
    freed = tuple(Fit(shapes, gains, kind) for site, gains in decided if site.patched)
    totals = Fit(shapes, [_total_bytes(p) for p in probes], kind)
    projector = Projector(totals, freed, tuple(s.kind for s in patched), ratio, spec.max_seq)
    for i, site in enumerate(patched):
        site.saved_bytes_per_token = round(projector.site(i, batch_size, seq_len) / (batch_size * seq_len))
    total, saved = projector(batch_size, seq_len)
    before = round(total)
    projection = Projection(
        batch_size, seq_len, str(target).removeprefix("torch."), before, before - round(saved)
    )
    order = {path: i for i, path in enumerate(modules)}  # module order; a path's own calls in call order
    decided.sort(key=lambda d: order.get(d[0].path.partition(":")[0], len(order)))
    report = PatchReport(_model_name(model), _is_meta(model), [s for s, _ in decided], projection)
    report.parts = parts
    report.projector = projector
    return report


@contextlib.contextmanager
def _meta_cast(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """On meta, cast floating parameters to ``dtype`` for the probe (free, and restored exactly), so the
    float32 upcasts a model makes in ``dtype`` are seen as they are.  Real models are probed as they are."""
    params = [p for p in model.parameters() if p.is_meta and p.is_floating_point() and p.dtype != dtype]
    dtypes = [p.dtype for p in params]
    for p in params:
        p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for p, d in zip(params, dtypes, strict=True):
            p.data = p.data.to(d)


def _gated_site(
    site: _Site,
    basic_reason: str | None,
    probes: list[ProbeResult],
    selection: _Selection,
) -> tuple[Site, list[Bytes], gated.GatedParts] | None:
    """The gated site replacing ``site`` (an activation passing rules 1-4 in a gated MLP at every probe
    shape; its input may be kept alive by the product: fusing frees it), what it frees at each probe
    shape, and its parts (``GatedMLP.parts``)."""
    if site.activation not in GATED or site.kind != "module" or basic_reason is not None:
        return None
    mlps, gains = [], []
    for probe in probes:
        calls = _calls_of(probe, site)
        mlp = (
            (gated.match(probe, site.path) or gated.match_experts(probe, site.path))
            if len(calls) == 1
            else None
        )
        if mlp is None:
            return None
        mlps.append(mlp)
        gains.append(gated.gain(probe, mlp, calls[0]))
    mlp = mlps[0]
    if any((m.parent, m.parts) != (mlp.parent, mlp.parts) for m in mlps):
        return None
    if gains[0].scalable + gains[0].fixed <= 0:
        return None
    reason = selection.reason(None, (mlp.parent, site.path), OPTIONS["gated"])
    consumer = next((s.where for s in probes[0].saved if s.storage == mlp.storages[3]), None)
    fused = Site(mlp.parent, site.activation, consumer, reason is None, reason, kind="gated")
    return fused, gains, mlp.parts


def _norm_site(
    module: nn.Module,
    path: str,
    eps_attr: str,
    probes: list[ProbeResult],
    selection: _Selection,
) -> tuple[Site, list[Bytes], _norms.NormParts] | None:
    """The site of an RMSNorm-shaped module that ran and computes a known variant, what it frees at each
    probe shape, and its parts; None for a module that is not one."""
    called = any(c.site == path for c in probes[0].watched_calls)
    variant = _norms.variant_of(module, eps_attr) if called else None
    if variant is None:
        return None
    site, gains = _watched_site(path, "norm", _norms.gain, probes, selection)
    return site, gains, _norms.NormParts(variant, eps_attr)


def _dropout_site(
    module: nn.Module,
    path: str,
    probes: list[ProbeResult],
    selection: _Selection,
) -> tuple[Site, list[Bytes]] | None:
    """The site of a dropout module that ran, and what it frees at each probe shape; None when it did
    not run."""
    if not any(c.site == path for c in probes[0].watched_calls):
        return None
    site, gains = _watched_site(path, "dropout", _dropouts.gain, probes, selection)
    if module.inplace and path not in selection.already_patched:
        site.patched, site.reason = False, "in-place dropout (inplace=True): left as it is"
    return site, gains


def _watched_site(
    path: str,
    kind: str,
    gain: Callable[[ProbeResult, Call], Bytes],
    probes: list[ProbeResult],
    selection: _Selection,
) -> tuple[Site, list[Bytes]]:
    """The site of a watched module (kind "norm": activation "rms_norm"; "dropout": "dropout") and what
    ``gain`` says its calls free at each probe shape: patched when every call ran with a gradient, outside
    checkpointed blocks, (a norm) with its input unchanged afterwards, and it frees something."""
    calls = [c for c in probes[0].watched_calls if c.site == path]
    gains = [sum((gain(p, c) for c in p.watched_calls if c.site == path), Bytes()) for p in probes]
    reason = None
    for call in calls:
        if not call.requires_grad:
            reason = "no gradient flows through it (frozen, no_grad or reentrant checkpointing)"
        elif call.foreign_hooks:
            reason = "inside a checkpointed block: nothing is saved there, nothing to gain"
        elif call.inplace and kind == "norm":
            reason = f"{call.inplace}: the replacement keeps its input"
        if reason:
            break
    if reason is None and _total(gains[0]) <= 0:
        reason = "nothing to gain"
    reason = selection.reason(reason, (path,), OPTIONS[kind])
    consumer = next((s.where for s in probes[0].saved if s.storage == calls[0].output_storage), None)
    activation = "rms_norm" if kind == "norm" else kind
    return Site(path, activation, consumer, reason is None, reason, kind=kind), gains


def _has_apply_gate(module: nn.Module, kinds: dict[int, str | None]) -> bool:
    """A module with an ``_apply_gate`` method of its class (transformers' MoE experts) and an activation
    child actpatch can fuse: its ``_apply_gate`` calls are observed by the probe."""
    if "_apply_gate" in vars(module) or not callable(getattr(type(module), "_apply_gate", None)):
        return False
    return any(kinds.get(id(child)) in GATED for child in module.children())


def _collect_sites(model: nn.Module, probe: ProbeResult, kinds: dict[int, str | None]) -> list[_Site]:
    """Activation sites in call order (uncalled activation modules last); nested calls are dropped."""
    sites: dict[str, _Site] = {}
    activation_calls: set[int] = set()
    for call in probe.calls:
        activation = call.activation if call.kind == "functional" else _classify(call.module, kinds)
        if activation is None:
            continue
        activation_calls.add(id(call))
        sites.setdefault(call.site, _Site(call.site, activation, call.kind)).calls.append(call)
    for site in list(sites.values()):  # a call inside another activation (ClippedGELU -> gelu) is its part
        site.calls = [c for c in site.calls if not (c.parents & activation_calls)]
        if not site.calls:
            del sites[site.path]
    for path, m in model.named_modules():
        activation = kinds.get(id(m))
        if activation is not None and path not in sites:
            sites[path] = _Site(path, activation, "module")
    return list(sites.values())


def _classify(module: nn.Module | None, kinds: dict[int, str | None]) -> str | None:
    if module is None:
        return None
    if id(module) not in kinds:
        kinds[id(module)] = classify_module(module)
    return kinds[id(module)]


def _calls_of(probe: ProbeResult, site: _Site) -> list[Call]:
    return [c for c in probe.calls if c.site == site.path]


class _Evidence:
    """What one probe says about calls: who saved what."""

    def __init__(self, probe: ProbeResult) -> None:
        self.probe = probe
        self.by_storage: dict[int, list] = defaultdict(list)
        self.by_call: dict[int, list] = defaultdict(list)
        for s in probe.saved:
            self.by_storage[s.storage].append(s)
            for c in s.inside:
                self.by_call[c].append(s)

    def _outside(self, storage: int | None, call: Call) -> list:
        return [s for s in self.by_storage.get(storage, ()) if id(call) not in s.inside]

    def judge(self, site: _Site) -> tuple[str | None, str | None]:
        """(reason it is not patched or None, consumer) for a site."""
        consumer = None
        for call in site.calls:
            savers = self._outside(call.output_storage, call)
            if savers and consumer is None:
                consumer = savers[0].where
        if consumer is None:
            consumer = next((c.consumers[0] for c in site.calls if c.consumers), None)
        return self._reason(site), consumer

    def _reason(self, site: _Site) -> str | None:
        reason = self.basic_reason(site)
        if reason is not None:
            return reason
        for call in site.calls:
            if not self._outside(call.output_storage, call):
                used = f" (used by {call.consumers[0]})" if call.consumers else ""
                return f"output not saved by a later op{used}"
            keepers = self._outside(call.input_storage, call)
            if keepers:
                return f"input kept alive by {keepers[0].where} (shared storage, e.g. a fused projection)"
        gain = self.gain(site.calls)
        if gain.scalable + gain.fixed <= 0:
            return "nothing to gain"
        return None

    def basic_reason(self, site: _Site) -> str | None:
        """Rules 1-4: what any swap of this site needs, whatever saves its output or keeps its input."""
        if site.activation not in INVERTIBLE:
            return f"unsupported activation ({site.activation})"
        if site.kind == "functional":
            return "functional call: cannot be swapped"
        if site.kind == "unregistered":
            return "module not registered as a submodule (a shared singleton): cannot be swapped"
        if not site.calls:
            return "not called by the probe forward"
        for call in site.calls:
            if call.dtype not in INVERTIBLE_DTYPES:
                return f"{str(call.dtype).removeprefix('torch.')} inputs run the plain op"
            if not call.requires_grad:
                return "no gradient flows through it (frozen, no_grad or reentrant checkpointing)"
            if call.foreign_hooks:
                return "inside a checkpointed block: nothing is saved there, nothing to gain"
            if call.inplace:
                return f"output modified in place ({call.inplace})"
        return None

    def gain(self, calls: list[Call]) -> Bytes:
        """Bytes freed by swapping these calls: their own saves nobody else keeps, less the branch bits."""
        total = Bytes()
        for call in calls:
            seen: set[int] = {call.output_storage}
            for s in self.by_call.get(id(call), ()):
                if s.storage in seen or s.storage in self.probe.excluded_storages:
                    continue
                seen.add(s.storage)
                if not self._outside(s.storage, call):
                    total += Bytes(s.nbytes, 0.0) if s.scalable else Bytes(0.0, s.nbytes)
            total += Bytes(0.0, -math.ceil(call.numel / 8))
        return total


def _total(b: Bytes) -> float:
    return b.scalable + b.fixed


def _total_bytes(probe: ProbeResult) -> Bytes:
    seen: set[int] = set()
    total = Bytes()
    for s in probe.saved:
        if s.storage in seen or s.storage in probe.excluded_storages:
            continue
        seen.add(s.storage)
        total += Bytes(s.nbytes, 0.0) if s.scalable else Bytes(0.0, s.nbytes)
    return total


@dataclass(frozen=True)
class _Selection:
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


def _model_name(model: nn.Module) -> str:
    config = getattr(unwrap(model), "config", None)
    return getattr(config, "_name_or_path", None) or type(unwrap(model)).__name__


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())
