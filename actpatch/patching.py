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
A fused gated MLP or a patched RMSNorm keeps its class, children and parameters; only an instance
``forward`` is added (and removed by :func:`unpatch_model`); under accelerate's hooks (``device_map``)
the hooked ``_old_forward`` is replaced instead, and restored.
Patching twice changes nothing: sites already patched keep their replacement; patch_model only adds
patches (call unpatch_model to start over).  For :func:`analyze`, ``Site.patched`` says whether
patch_model would leave the site patched.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Iterator

import torch
from torch import nn

from . import functional as F
from .analysis.walker import walk
from .nn import InvertedGELU, InvertedQuickGELU, InvertedSiLU, PackedDropout
from .report import PatchReport

_ORIGINAL = "_actpatch_original"
_FORWARD = "_actpatch_forward"  # on a gated MLP or RMSNorm patched in place: (kind, parts, activation)
_REPLACED = "_actpatch_replaced"  # and the instance method its forward took the place of, if any
_PRODUCTS = {
    "silu": F.silu_mul,
    "gelu": F.gelu_mul,
    "gelu_tanh": functools.partial(F.gelu_mul, approximate="tanh"),
}

_REPLACEMENTS = {  # activation -> replacement of the original module
    "gelu": lambda _: InvertedGELU("none"),
    "gelu_tanh": lambda _: InvertedGELU("tanh"),
    "silu": lambda _: InvertedSiLU(),
    "quick_gelu": lambda _: InvertedQuickGELU(),
    "dropout": lambda original: PackedDropout(original.p),
}


def analyze(
    model: nn.Module,
    *,
    batch_size: int = 1,
    seq_len: int = 512,
    dtype: torch.dtype | str | None = None,
    example_inputs: object = None,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    gated: bool = True,
    norms: bool = True,
    dropouts: bool = False,
) -> PatchReport:
    """Find the sites of ``model`` (activations, gated MLPs, RMSNorms, dropouts) and project the memory
    patching saves; changes nothing."""
    _check_module(model)
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    with _originals_restored(model) as patched_now:
        return walk(
            model,
            batch_size=batch_size,
            seq_len=seq_len,
            dtype=_as_dtype(dtype),
            example_inputs=example_inputs,
            include=include,
            exclude=exclude,
            already_patched=patched_now,
            gated=gated,
            norms=norms,
            dropouts=dropouts,
        )


def patch_model(
    model: nn.Module,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
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
    for site in report.patched_sites:
        if site.path in current:
            continue
        if site.kind in ("gated", "norm"):
            _set_forward(model.get_submodule(site.path), site.kind, report.parts[site.path], site.activation)
        else:
            _swap(model, site.path, site.activation)
    return report


def unpatch_model(model: nn.Module) -> list[str]:
    """Put every original activation module (and gated MLP or RMSNorm forward) back; returns the paths
    restored."""
    _check_module(model)
    patched = patched_modules(model)
    for path, module in patched.items():
        if _FORWARD in module.__dict__:
            _unset_forward(module)
        else:
            _set(model, path, module.__dict__[_ORIGINAL])
    return list(patched)


def patched_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Module path -> replacement (or the gated MLP or RMSNorm patched in place), for every site patched
    by actpatch."""
    return {path: m for path, m in model.named_modules() if _ORIGINAL in m.__dict__ or _FORWARD in m.__dict__}


def original_module(module: nn.Module) -> nn.Module | None:
    """The module a replacement stands in for (None if ``module`` is not a replacement)."""
    return module.__dict__.get(_ORIGINAL)


def _swap(model: nn.Module, path: str, activation: str) -> None:
    original = model.get_submodule(path)
    replacement = _REPLACEMENTS[activation](original)
    replacement.train(original.training)
    replacement.__dict__[_ORIGINAL] = original  # not a submodule: state_dict and paths stay the same
    _set(model, path, replacement)


def _set_forward(module: nn.Module, kind: str, parts: tuple, activation: str) -> None:
    """An instance method for ``module``: a gated MLP's ``forward`` computes down(act(gate(x)) * up(x)) with
    the product fused (``split``: the two halves of one gate_up(x); ``between``: down(between(product))),
    MoE experts' ``_apply_gate(gate_up)`` the fused product of its halves, an RMSNorm's ``forward``
    ``actpatch.functional.rms_norm``.  The class, its parameters and state_dict are untouched."""
    module.__dict__[_FORWARD] = (kind, parts, activation)
    if kind == "norm":
        entry, method = "forward", _norm_forward
    else:
        entry = parts[0]
        method = _gated_forward if entry == "forward" else _gated_apply_gate
    attr = _hooked(module, entry)
    if attr in module.__dict__:
        module.__dict__[_REPLACED] = module.__dict__[attr]
    setattr(module, attr, types.MethodType(method, module))


def _hooked(module: nn.Module, entry: str) -> str:
    """The attribute a replacement of ``entry`` goes to: accelerate's hooks (``device_map``, offloading)
    wrap ``forward`` in an instance ``forward`` that moves tensors and calls ``_old_forward``; that one is
    replaced, so the hook keeps working."""
    if entry == "forward" and "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__:
        return "_old_forward"
    return entry


def _norm_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    _, (variant, eps_attr), _ = self.__dict__[_FORWARD]
    return F.rms_norm(x, self.weight, getattr(self, eps_attr), variant)


def _gated_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    _, (_, gate, up, down, split, between), activation = self.__dict__[_FORWARD]
    if split:
        m = _halves_product(getattr(self, gate)(x), split, activation)
    else:
        m = _PRODUCTS[activation](getattr(self, gate)(x), getattr(self, up)(x))
    return getattr(self, down)(getattr(self, between)(m) if between else m)


def _gated_apply_gate(self: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    _, (_, _, _, _, split, _), activation = self.__dict__[_FORWARD]
    return _halves_product(gate_up, split, activation)


def _halves_product(gate_up: torch.Tensor, split: str, activation: str) -> torch.Tensor:
    a, b = gate_up.chunk(2, dim=-1)
    a, b = (a, b) if split == "gate_first" else (b, a)
    return _PRODUCTS[activation](a, b)


def _unset_forward(module: nn.Module) -> None:
    kind, parts, _ = module.__dict__.pop(_FORWARD)
    entry = parts[0] if kind == "gated" else "forward"
    attr = _hooked(module, entry)
    if _REPLACED in module.__dict__:
        module.__dict__[attr] = module.__dict__.pop(_REPLACED)
    elif attr != entry:  # hooks added after patching took the patched method for the original
        module.__dict__[attr] = getattr(type(module), entry).__get__(module)
    else:
        del module.__dict__[attr]


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent._modules[name] = module


@contextlib.contextmanager
def _originals_restored(model: nn.Module) -> Iterator[set[str]]:
    """Originals in place while probing (so the evidence is the same), replacements put back after."""
    patched = patched_modules(model)
    fused = {path: m.__dict__[_FORWARD] for path, m in patched.items() if _FORWARD in m.__dict__}
    for path, module in patched.items():
        if path in fused:
            _unset_forward(module)
        else:
            _set(model, path, module.__dict__[_ORIGINAL])
    try:
        yield set(patched)
    finally:
        for path, module in patched.items():
            if path in fused:
                _set_forward(module, *fused[path])
            else:
                _set(model, path, module)


def _check_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"actpatch expects a torch.nn.Module, got {type(model).__name__}")


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value
