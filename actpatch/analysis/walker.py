"""The graph walker: one probe forward per shape, each site kind's decisions, and the projection.

``walk(model, kinds, ...)`` classifies the model's candidate activation modules, asks every kind whose
option is on which modules the probe must watch (:class:`~actpatch.analysis.evidence.Watch`), runs the probe
at each shape (:mod:`actpatch.analysis.probe`), lets each kind decide its sites from that evidence
(:class:`~actpatch.analysis.evidence.SiteKind`, in the order given), and projects what the patched sites
free at the requested shape (:mod:`actpatch.analysis.memory`).  It knows no kind: the kinds are
``actpatch.kinds``, passed in by ``actpatch.patching``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..report import PatchReport, Projection
from .evidence import Decision, Evidence, Selection, SiteKind, Walk
from .inputs import input_spec, model_dtype, unwrap
from .memory import Fit, Projector, fit_kind, probe_shapes
from .probe import run_probe
from .sites import classify_module, is_candidate


def walk(
    model: nn.Module,
    kinds: Sequence[SiteKind],
    *,
    batch_size: int | None,
    seq_len: int | None,
    dtype: torch.dtype | None,
    example_inputs: object,
    include: list[str] | None,
    exclude: list[str] | None,
    already_patched: set[str],
    options: dict[str, bool],
    kept_only: frozenset[str] = frozenset(),
) -> PatchReport:
    """Analyse ``model`` (whose originals are in place) and decide every site of the ``kinds`` whose option
    is on in ``options`` (a kind without an option is always on); changes nothing.  The options named in
    ``kept_only`` are on only to report the sites of that kind in ``already_patched``: the others of that
    kind are left alone.  The projection is at ``batch_size`` x ``seq_len``; one left None is the example
    inputs' own (:meth:`~actpatch.analysis.inputs.InputSpec.projection_shape`)."""
    selection = Selection(include, exclude, already_patched, kept_only)
    target = dtype or model_dtype(model)
    with torch.random.fork_rng(devices=[]):
        classified = {id(m): classify_module(m) for m in model.modules() if is_candidate(m)}
    walk = Walk(model, selection, classified, options)
    kinds = [k for k in kinds if walk.on(k)]
    watches = [k.watch(walk) for k in kinds]
    watched = frozenset().union(*(w.watched for w in watches))
    gates = frozenset().union(*(w.gates for w in watches))
    with _meta_cast(model, target):
        probe_dtype = model_dtype(model)
        spec = input_spec(model, example_inputs)
        batch_size, seq_len = spec.projection_shape(batch_size, seq_len)
        shapes = probe_shapes(spec.seq_dependent, spec.max_seq, spec.fixed_shape, batch_size)
        walk.probes = [run_probe(model, *spec.make(b, s), probe_dtype, watched, gates) for b, s in shapes]
    walk.evidences = [Evidence(p) for p in walk.probes]
    decided: list[Decision] = []
    for kind, watch in zip(kinds, watches, strict=True):
        kind.decide(walk, watch, decided)

    fit = fit_kind(spec.seq_dependent, spec.fixed_shape)
    ratio = target.itemsize / probe_dtype.itemsize
    patched = [d for d in decided if d.site.patched]
    freed = tuple(Fit(shapes, d.gains, fit) for d in patched)
    totals = Fit(shapes, [p.total() for p in walk.probes], fit)
    projector = Projector(totals, freed, tuple(d.site for d in patched), ratio, spec.max_seq)
    for i, d in enumerate(patched):
        d.site.saved_bytes_per_token = round(projector.site(i, batch_size, seq_len) / (batch_size * seq_len))
    total, saved = projector(batch_size, seq_len)
    before = round(total)
    projection = Projection(
        batch_size, seq_len, str(target).removeprefix("torch."), before, before - round(saved)
    )
    order = {path: i for i, path in enumerate(walk.modules)}  # module order; a path's own calls in call order
    decided.sort(key=lambda d: order.get(d.site.path.partition(":")[0], len(order)))
    report = PatchReport(_model_name(model), _is_meta(model), [d.site for d in decided], projection)
    report.parts = {d.site.path: d.parts for d in decided if d.parts is not None}
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


def _model_name(model: nn.Module) -> str:
    config = getattr(unwrap(model), "config", None)
    return getattr(config, "_name_or_path", None) or type(unwrap(model)).__name__


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())
