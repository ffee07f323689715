"""patch_model / unpatch_model / analyze: swap the activations worth inverting, in place and reversibly.

Contract::

    analyze(model, *, batch_size=1, seq_len=512, dtype=None, example_inputs=None,
            include=None, exclude=None, gated=True, norms=True, dropouts=False) -> PatchReport
    patch_model(model, *, include=None, exclude=None, example_inputs=None, batch_size=1, seq_len=512,
                dtype=None, gated=True, norms=True, dropouts=False) -> PatchReport          # in place
    unpatch_model(model) -> list[str]                                          # paths restored

- ``include``/``exclude``: fnmatch patterns on module paths ("*.mlp.act_fn", "model.layers.0.*");
  ``include=None`` selects every site, ``include=[]`` none.
- ``dtype``: the dtype of the projection (a torch.dtype, or its name); None = the parameters' dtype.
- ``example_inputs``: a dict of forward keyword arguments, a tuple of positional ones, or one tensor;
  None synthesizes inputs from the model's config (see :mod:`actpatch.analysis.inputs`).
- ``gated``: fuse gated MLPs, down(act(gate(x)) * up(x)), keeping the product and the gate (site kind
  "gated"); ``norms``: RMSNorms keep x and 1/rms instead of float32 copies (site kind "norm").  Either
  changes no forward value (bitwise) and is decided by the same evidence; False leaves those sites alone.
- ``dropouts``: ``nn.Dropout`` modules keep their masks as bits (``actpatch.nn.PackedDropout``, site kind
  "dropout"): the same random draws, outputs and gradients, bitwise.  Off by default: under
  ``torch.compile`` the opaque op keeps the compiler from fusing dropout with its neighbours (GPT-2
  medium: 1.23 times the compiled step; docs/benchmarks.md).
- Works on models on the meta device (``accelerate.init_empty_weights``): nothing is allocated and the
  report has ``dry_run=True``; patching a meta model swaps the modules all the same.

Which sites are patched is decided by evidence (:mod:`actpatch.analysis.walker`).  The replacement
module keeps the original in its ``__dict__`` (not as a submodule), so ``state_dict``, ``parameters``
and ``named_modules`` paths do not change and :func:`unpatch_model` restores the very same objects.
A fused gated MLP or a patched RMSNorm keeps its children, parameters and class name: its class becomes a
subclass running a plan (:mod:`actpatch.in_place`), which follows copies, replicas and pickling.
Patching twice changes nothing: sites already patched stay patched, whatever the options of the later
call (which only choose what it adds; a gated MLP fused later takes over its activation's swap); the
report always describes the model as it is after the call (call unpatch_model to start over).  For
:func:`analyze`, ``Site.patched`` says whether patch_model would leave the site patched.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import functional as F
from . import in_place
from .analysis.sites import runs_torch_op
from .analysis.walker import OPTIONS, walk
from .nn import InvertedGELU, InvertedQuickGELU, InvertedSiLU, PackedDropout
from .report import PatchReport, Site

_ORIGINAL = "_actpatch_original"
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_PRODUCTS = {
    "silu": F.silu_mul,
    "gelu": F.gelu_mul,
    "gelu_tanh": functools.partial(F.gelu_mul, approximate="tanh"),
}

_REPLACEMENTS = {  # activation -> replacement of the original module, given the formula it must keep
    "gelu": lambda _, formula: InvertedGELU("none", formula),
    "gelu_tanh": lambda _, formula: InvertedGELU("tanh", formula),
    "silu": lambda _, formula: InvertedSiLU(formula),
    "quick_gelu": lambda _, formula: InvertedQuickGELU(formula),
    "dropout": lambda original, _: PackedDropout(original.p),
}


def analyze(
    model: nn.Module,
    *,
    batch_size: int = 1,
    seq_len: int = 512,
    dtype: torch.dtype | str | None = None,
    example_inputs: object = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    gated: bool = True,
    norms: bool = True,
    dropouts: bool = False,
) -> PatchReport:
    """Find the sites of ``model`` (activations, gated MLPs, RMSNorms, dropouts) and project the memory
    patching saves; changes nothing."""
    _check_module(model)
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    include, exclude = _patterns(include, "include"), _patterns(exclude, "exclude")
    target = _as_dtype(dtype)
    chosen = {"gated": gated, "norms": norms, "dropouts": dropouts}
    with _originals_restored(model) as patched_now:
        present = {OPTIONS[k] for k in patched_now.values() if k in OPTIONS}  # kept, whatever the options
        return walk(
            model,
            batch_size=batch_size,
            seq_len=seq_len,
            dtype=target,
            example_inputs=example_inputs,
            include=include,
            exclude=exclude,
            already_patched=set(patched_now),
            kept_only=frozenset(o for o in present if not chosen[o]),
            **{o: on or o in present for o, on in chosen.items()},
        )


def patch_model(
    model: nn.Module,
    *,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    example_inputs: object = None,
    batch_size: int = 1,
    seq_len: int = 512,
    dtype: torch.dtype | str | None = None,
    gated: bool = True,
    norms: bool = True,
    dropouts: bool = False,
) -> PatchReport:
    """Swap in place every activation the evidence says is worth inverting; returns the report.
    With ``gated``, gated MLPs (down(act(gate(x)) * up(x))) compute their product fused instead; with
    ``norms``, RMSNorms keep x and 1/rms; with ``dropouts``, dropouts keep their masks as bits."""
    report = analyze(
        model,
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=dtype,
        example_inputs=example_inputs,
        include=include,
        exclude=exclude,
        gated=gated,
        norms=norms,
        dropouts=dropouts,
    )
    current = patched_modules(model)
    for site in report.sites:
        if site.patched and site.path not in current:
            _patch(model, site, report.parts.get(site.path))
        elif not site.patched and site.path in current:  # an activation a gated MLP now fuses
            _unpatch(model, site.path, current[site.path])
    return report


def unpatch_model(model: nn.Module) -> list[str]:
    """Put every original activation module (and gated MLP or RMSNorm forward) back; returns the paths
    restored."""
    _check_module(model)
    patched = patched_modules(model)
    for path, module in patched.items():
        _unpatch(model, path, module)
    return list(patched)


def patched_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> replacement (or the gated MLP or RMSNorm patched in place), for every site patched
    by actpatch."""
    return {path: m for path, m in model.named_modules() if _ORIGINAL in m.__dict__ or in_place.is_patched(m)}


def original_module(module: nn.Module) -> nn.Module | None:
    """The module a replacement stands in for (None if ``module`` is not a replacement)."""
    return module.__dict__.get(_ORIGINAL)


@dataclass(frozen=True)
class FusedGated:
    """A gated MLP's plan: ``forward(x)`` = down(between(act(gate(x)) · up(x))) with the product fused
    (``split``: the two halves of one gate_up(x)), or, for ``entry`` "_apply_gate" (MoE experts), the fused
    product of gate_up's halves."""

    activation: str
    entry: str
    gate: str
    up: str
    down: str
    split: str
    between: str
    kind = "gated"

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.entry == "_apply_gate":
            return self._halves_product(x)
        if self.split:
            m = self._halves_product(getattr(module, self.gate)(x))
        else:
            m = _PRODUCTS[self.activation](getattr(module, self.gate)(x), getattr(module, self.up)(x))
        return getattr(module, self.down)(getattr(module, self.between)(m) if self.between else m)

    def _halves_product(self, gate_up: torch.Tensor) -> torch.Tensor:
        a, b = gate_up.chunk(2, dim=-1)
        a, b = (a, b) if self.split == "gate_first" else (b, a)
        return _PRODUCTS[self.activation](a, b)


@dataclass(frozen=True)
class InvertedNorm:
    """An RMSNorm's plan: ``forward(x)`` = ``actpatch.functional.rms_norm`` (keeps x and 1/rms)."""

    variant: str
    eps_attr: str
    entry = "forward"
    kind = "norm"

    def __call__(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, module.weight, getattr(module, self.eps_attr), self.variant)


def _patch(model: nn.Module, site: Site, parts: object) -> None:
    if site.kind == "gated":
        in_place.install(model.get_submodule(site.path), FusedGated(site.activation, **asdict(parts)))
    elif site.kind == "norm":
        in_place.install(model.get_submodule(site.path), InvertedNorm(**asdict(parts)))
    else:
        _swap(model, site.path, site.activation)


def _unpatch(model: nn.Module, path: str, module: nn.Module) -> None:
    if in_place.is_patched(module):
        in_place.uninstall(module)
    else:
        _set(model, path, module.__dict__[_ORIGINAL])


def _kind(module: nn.Module) -> str:
    """The site kind of a patched module."""
    plan = in_place.plan_of(module)
    if plan is not None:
        return plan.kind
    return "dropout" if isinstance(module, PackedDropout) else "activation"


def _swap(model: nn.Module, path: str, activation: str) -> None:
    original = model.get_submodule(path)
    formula = None if activation == "dropout" or runs_torch_op(original, activation) else original
    replacement = _REPLACEMENTS[activation](original, formula)
    replacement.train(original.training)
    replacement.__dict__[_ORIGINAL] = original  # not a submodule: state_dict and paths stay the same
    _set(model, path, replacement)


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent._modules[name] = module


@contextlib.contextmanager
def _originals_restored(model: nn.Module) -> Iterator[dict[str, str]]:
    """Originals in place while probing (so the evidence is the same), replacements put back after;
    yields the site kind of each patched path."""
    patched = patched_modules(model)
    plans = {path: in_place.plan_of(m) for path, m in patched.items()}
    kinds = {path: _kind(m) for path, m in patched.items()}
    for path, module in patched.items():
        _unpatch(model, path, module)
    try:
        yield kinds
    finally:
        for path, module in patched.items():
            if plans[path] is not None:
                in_place.install(module, plans[path])
            else:
                _set(model, path, module)


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
