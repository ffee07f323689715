"""Decisions for a model trained under ``torch.compile``: keep a kind's sites only where the compiled graph
keeps less with them.

Eager evidence says what autograd keeps op by op.  A compiled graph keeps what AOTAutograd's partition
chooses: inductor's min-cut partitioner recomputes cheap pointwise ops in the backward from tensors it keeps
anyway (a SiLU from its input, a product from its factors), so a site that frees memory in eager mode may
free nothing compiled, and then only adds its bits.  With ``compiled=True`` (the default for a model
``torch.compile`` returned), ``patch_model`` measures, on the model's own device, the bytes the compiled
graph saves for its backward in one training forward (backend ``aot_eager_decomp_partition``: inductor's
decompositions and partitioner, run without code generation), first unpatched, then with the patched sites
of each kind added in turn (activations, gated MLPs, norms, casts); a kind whose sites do not lower them is
left out, each site with the reason, and the projection gives its bytes back.  Dropout sites are left to the
compiler without measuring: its dropout fuses with its neighbours and keeps no more than a seed or a mask,
where the opaque op costs step time (GPT-2 medium compiled: 1.23 x the step, docs/benchmarks.md).

Measuring compiles the model once per kind and resets ``torch.compile``'s caches (``torch._dynamo.reset``)
before each; call ``patch_model`` before compiling anything else.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from . import measure
from .analysis.inputs import input_spec
from .analysis.probe import training_mode
from .report import PatchReport, Projection, Site

BACKEND = "aot_eager_decomp_partition"
SHAPE = (2, 32)  # (batch, seq) of the measured forward, unless the example inputs fix theirs
LEFT_TO_COMPILER = (
    "under torch.compile: left to the compiler, whose dropout fuses with its neighbours (the opaque op "
    "costs step time)"
)


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is what ``torch.compile`` returned for a module."""
    return isinstance(model, torch._dynamo.eval_frame.OptimizedModule)


def trains_compiled(model: nn.Module) -> bool:
    """Whether ``model`` runs compiled: what ``torch.compile`` returned, or a module any of whose modules
    were compiled in place (``module.compile()``, as torchtitan compiles each block)."""
    in_place = (getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
    return is_compiled(model) or any(in_place)


def settle(
    model: nn.Module,
    report: PatchReport,
    example_inputs: object,
    install: Callable[[Site], None],
    uninstall: Callable[[Site], None],
    *,
    order: list[str],
    no_measure: frozenset[str],
) -> PatchReport:
    """Mark not patched the sites of every kind (in ``order``) whose sites do not lower the compiled graph's
    saved bytes (``install`` / ``uninstall`` put one site in and out; the model's other sites are its
    originals while this runs), and those of the kinds in ``no_measure`` (dropouts); give their bytes back
    to the projection.  In place."""
    spec = input_spec(model, example_inputs)
    args, kwargs = spec.make(*(spec.fixed_shape or SHAPE))
    by_kind = {k: [s for s in report.sites if s.patched and s.kind == k] for k in order}
    back, installed = 0, []
    try:
        best = _compiled_bytes(model, args, kwargs)
        for kind, sites in by_kind.items():
            if not sites:
                continue
            if kind in no_measure:
                back += _leave(sites, LEFT_TO_COMPILER)
                continue
            for site in sites:
                install(site)
                installed.append(site)
            nbytes = _compiled_bytes(model, args, kwargs)
            if nbytes < best:
                best = nbytes
                continue
            for site in sites:
                uninstall(site)
                installed.remove(site)
            said = f"under torch.compile the compiled graph keeps no less with the {kind} sites"
            back += _leave(sites, f"{said} ({nbytes:,} B against {best:,} B without)")
    finally:
        for site in installed:
            uninstall(site)
    p = report.projection
    after = p.activation_bytes_after + back * p.batch_size * p.seq_len
    report.projection = Projection(p.batch_size, p.seq_len, p.dtype, p.activation_bytes_before, after)
    return report


def _leave(sites: list[Site], reason: str) -> int:
    """Mark ``sites`` not patched with ``reason``; the bytes per token they were credited."""
    freed = sum(s.saved_bytes_per_token for s in sites)
    for s in sites:
        s.patched, s.reason, s.saved_bytes_per_token, s.keeps = False, reason, 0, ""
    return freed


def _compiled_bytes(model: nn.Module, args: tuple, kwargs: dict) -> int:
    """Bytes the compiled graph of ``model`` saves for backward in one training forward (its second call:
    the first compiles), parameters and buffers excluded; the RNG as it was."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=BACKEND)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), training_mode(model), torch.enable_grad():
        compiled(*args, **kwargs)
        nbytes, _ = measure.saved_bytes(compiled, kwargs, args)
    torch._dynamo.reset()
    return nbytes
