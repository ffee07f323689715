"""patch_model / unpatch_model / analyze: swap the activations worth inverting, in place and reversibly.

Contract::

    analyze(model, *, batch_size=None, seq_len=None, dtype=None, example_inputs=None,
            include=None, exclude=None, compiled=None, **options) -> PatchReport
    patch_model(model, *, include=None, exclude=None, example_inputs=None, batch_size=None, seq_len=None,
                dtype=None, compiled=None, **options) -> PatchReport                       # in place
    unpatch_model(model) -> list[str]                                          # paths restored

- ``include``/``exclude``: fnmatch patterns on module paths ("*.mlp.act_fn", "model.layers.0.*");
  ``include=None`` selects every site, ``include=[]`` none.
- ``batch_size``, ``seq_len``: the shape the projection is for; None = the shape of ``example_inputs``
  when given (:mod:`actpatch.analysis.inputs` says how it is read), else batch 1 and seq 512.  An
  explicit ``seq_len`` with example inputs that have no sequence dimension (images) is a ValueError.
- ``dtype``: the dtype of the projection (a torch.dtype, or its name); None = the parameters' dtype.
- ``example_inputs``: a dict of forward keyword arguments, a tuple of positional ones, or one tensor;
  None synthesizes inputs from the model's config (see :mod:`actpatch.analysis.inputs`).
- ``options``: one bool per site kind with an option (:mod:`actpatch.kinds`; any other keyword is a
  TypeError): ``gated=True``, ``norms=True``, ``dropouts=False``, ``casts=True`` by default.
- ``gated``: fuse gated MLPs, down(act(gate(x)) * up(x)), keeping the product and the gate (site kind
  "gated"); ``norms``: RMSNorms keep x and 1/rms instead of float32 copies (site kind "norm").  Either
  changes no forward value (bitwise) and is decided by the same evidence; False leaves those sites alone.
- ``dropouts``: ``nn.Dropout`` modules keep their masks as bits (``actpatch.nn.PackedDropout``, site kind
  "dropout"): the same random draws, outputs and gradients, bitwise.  Off by default: under
  ``torch.compile`` the opaque op keeps the compiler from fusing dropout with its neighbours (GPT-2
  medium: 1.23 times the compiled step; docs/benchmarks.md).
- ``casts``: under autocast, Linears given one tensor share one cast of it (site kind "cast",
  :mod:`actpatch.kinds.cast`): the same outputs and gradients, bitwise.
- ``compiled``: decide for training under ``torch.compile``: a kind's sites are kept only where the
  compiled graph keeps less with them, dropouts are left to the compiler (:mod:`actpatch.compiled`); None
  (default): whether ``model`` is what ``torch.compile`` returned (its own module is then patched).
- Works on models on the meta device (``accelerate.init_empty_weights``): nothing is allocated and the
  report has ``dry_run=True``; patching a meta model swaps the modules all the same.

Which sites are patched is decided by evidence (:mod:`actpatch.analysis.walker`, asking each kind of
:mod:`actpatch.kinds`).  Liger-Kernel's SwiGLU/GeGLU MLPs and RMSNorms are probed as the eager modules they
replaced, and taken over only where actpatch keeps less (:mod:`actpatch.integrations.liger`).  A replacement
module (:mod:`actpatch.swap`) keeps the original in its ``__dict__`` (not as a submodule), so
``state_dict``, ``parameters`` and ``named_modules`` paths do not change and :func:`unpatch_model` restores
the very same objects.  A fused gated MLP or a patched norm keeps its children, parameters and class name:
its class becomes a subclass running a plan
(:mod:`actpatch.in_place`), which follows copies, replicas and pickling.
Patching twice changes nothing: sites already patched stay patched, whatever the options of the later
call (which only choose what it adds; a gated MLP fused later takes over its activation's swap); the
report always describes the model as it is after the call (call unpatch_model to start over).  For
:func:`analyze`, ``Site.patched`` says whether patch_model would leave the site patched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from . import in_place, kinds, swap
from .analysis.evidence import SiteKind
from .analysis.walker import walk
from .compiled import is_compiled, trains_compiled
from .compiled import settle as settle_compiled
from .integrations import liger
from .report import PatchReport, Site

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def analyze(
    model: nn.Module,
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    dtype: torch.dtype | str | None = None,
    example_inputs: object = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    compiled: bool | None = None,
    **options: bool,
) -> PatchReport:
    """Find the sites of ``model`` (activations, and those of the kinds chosen by ``options``: gated MLPs,
    norms, dropouts, casts) and project the memory patching saves; changes nothing.  ``compiled``: decide
    for training under torch.compile (:mod:`actpatch.compiled`); None: whether ``model`` or any of its
    modules is compiled."""
    _check_module(model)
    chosen = _options(options, "analyze")
    compiled = trains_compiled(model) if compiled is None else compiled
    model = _inner(model)
    if any(n is not None and n < 1 for n in (batch_size, seq_len)):
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    include, exclude = _patterns(include, "include"), _patterns(exclude, "exclude")
    target = _as_dtype(dtype)
    already = {p for path, m in patched_modules(model).items() for p in kinds.site_paths(path, m)}
    with _originals_restored(model) as patched_now, liger.eager_view(model) as liger_modules:
        present = {k.option for k in patched_now.values() if k.option}  # kept, whatever the options
        report = walk(
            model,
            kinds.KINDS,
            batch_size=batch_size,
            seq_len=seq_len,
            dtype=target,
            example_inputs=example_inputs,
            include=include,
            exclude=exclude,
            already_patched=already,
            options={o: on or o in present for o, on in chosen.items()},
            kept_only=frozenset(o for o in present if not chosen[o]),
        )
    report = liger.settle(report, model, liger_modules)
    if compiled and not report.dry_run:
        _settle_compiled(model, report, example_inputs)
    return report


def _settle_compiled(model: nn.Module, report: PatchReport, example_inputs: object) -> None:
    """The sites of the kinds that free nothing under torch.compile left out (:mod:`actpatch.compiled`)."""

    def install(site: Site) -> None:
        kinds.by_name(site.kind).install(model, site, report.parts.get(site.path))

    def uninstall(site: Site) -> None:
        _unpatch(model, site.path, model.get_submodule(site.path))

    with _originals_restored(model):
        order = [k.name for k in kinds.KINDS]
        left = frozenset(k.name for k in kinds.KINDS if getattr(k, "left_to_compiler", False))
        settle_compiled(model, report, example_inputs, install, uninstall, order=order, no_measure=left)


def patch_model(
    model: nn.Module,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    example_inputs: object = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    dtype: torch.dtype | str | None = None,
    compiled: bool | None = None,
    **options: bool,
) -> PatchReport:
    """Swap in place every activation the evidence says is worth inverting, and patch the sites of the
    kinds chosen by ``options`` (``gated``, ``norms``, ``dropouts``, ``casts``); returns the report.
    ``compiled``: as for :func:`analyze`; a compiled model's own module is patched."""
    _check_module(model)
    _options(options, "patch_model")
    report = analyze(
        model,
        compiled=compiled,
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=dtype,
        example_inputs=example_inputs,
        include=include,
        exclude=exclude,
        **options,
    )
    model = _inner(model)
    current = patched_modules(model)
    for site in report.sites:
        if site.patched and site.path not in current:
            kinds.by_name(site.kind).install(model, site, report.parts.get(site.path))
        elif not site.patched and site.path in current:  # an activation a gated MLP now fuses
            _unpatch(model, site.path, current[site.path])
    return report


def unpatch_model(model: nn.Module) -> list[str]:
    """Put every patched site back as it was (the original modules, classes and methods); returns the
    paths restored."""
    _check_module(model)
    model = _inner(model)
    patched = patched_modules(model)
    for path, module in patched.items():
        _unpatch(model, path, module)
    return list(patched)


def patched_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> replacement (or the module patched in place), for every site patched by actpatch."""
    return {
        path: m
        for path, m in model.named_modules()
        if swap.original_of(m) is not None or in_place.is_patched(m)
    }


def original_module(module: nn.Module) -> nn.Module | None:
    """The module a replacement stands in for (None if ``module`` is not a replacement)."""
    return swap.original_of(module)


def _unpatch(model: nn.Module, path: str, module: nn.Module) -> None:
    if in_place.is_patched(module):
        in_place.uninstall(module)
    else:
        swap.uninstall(model, path)


@contextlib.contextmanager
def _originals_restored(model: nn.Module) -> Iterator[dict[str, SiteKind]]:
    """Originals in place while probing (so the evidence is the same), replacements put back after;
    yields the kind of each patched path."""
    patched = patched_modules(model)
    plans = {path: in_place.plan_of(m) for path, m in patched.items()}
    owners = {path: kinds.kind_of(m) for path, m in patched.items()}
    for path, module in patched.items():
        _unpatch(model, path, module)
    try:
        yield owners
    finally:
        for path, module in patched.items():
            if plans[path] is not None:
                in_place.install(module, plans[path])
            else:
                swap.install(model, path, module)


def _options(given: dict[str, object], caller: str) -> dict[str, bool]:
    """Every kind's option: ``given`` (each a bool), else its default."""
    known = kinds.options()
    for name, value in given.items():
        if name not in known:
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}")
        if not isinstance(value, bool):
            raise TypeError(f"{caller}(): {name} must be True or False, got {value!r}")
    return known | given


def _inner(model: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (its sites are patched there), else ``model``."""
    return model._orig_mod if is_compiled(model) else model


def _check_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"actpatch expects a torch.nn.Module, got {type(model).__name__}")


def _patterns(value: str | Iterable[str] | None, name: str) -> list[str] | None:
    """``include``/``exclude`` as a list of fnmatch patterns: a str is one pattern."""
    if value is None or isinstance(value, str):
        return value if value is None else [value]
    patterns = list(value) if isinstance(value, Iterable) else None
    if patterns is None or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{name} must be a pattern (str) or a list of them, got {value!r}")
    return patterns


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The projection's dtype: None (the parameters'), or a floating dtype actpatch projects."""
    if dtype is None:
        return None
    value = dtype
    if not isinstance(dtype, torch.dtype):
        value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if value not in FLOAT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise ValueError(f"unsupported dtype {dtype!r}: actpatch projects {names}")
    return value
