"""Liger-Kernel: take over the Liger modules where actpatch keeps less, and name what Liger keeps.

Liger swaps classes (``LlamaMLP`` -> ``LigerSwiGLUMLP``, ``LlamaRMSNorm`` -> ``LigerRMSNorm``) or binds its
``forward`` on instances (``apply_liger_kernel_to_*(model=...)``), and replaces module-level functions
(RoPE) and the causal LM's ``forward`` (fused linear cross entropy).  Per element of an MLP of width n:

    LigerSwiGLUMLP   keeps gate, up (its Triton kernel's inputs) and m = silu(gate) · up (down's input)
    actpatch gated   keeps m and gate (+ 2 bits): one n-sized tensor fewer
    LigerRMSNorm     keeps x and 1/rms: what actpatch's norm keeping its *input* keeps, and more than
                     one keeping its *output* (shared with the Linear after it, + 1/σ per row)

While :func:`actpatch.analyze` probes, :func:`eager_view` gives each Liger SwiGLU/GeGLU MLP and RMSNorm the
eager forward of the module Liger replaced (``act_fn`` child included), so the site kinds decide on them by
evidence like on any model; :func:`settle` then keeps actpatch's decision where it keeps less (a fused
gated MLP, a norm keeping its output) and leaves the rest to Liger, with the reason, and lists every other
Liger module, forward and function as a site of kind "liger", not patched.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..kernels import rms_norm
from ..report import PatchReport, Projection, Site

_GATED = {"LigerSwiGLUMLP": nn.SiLU, "LigerGEGLUMLP": lambda: nn.GELU(approximate="tanh")}
_NORM_FORMS = {("llama", 0.0): "llama", ("gemma", 1.0): "gemma"}  # Liger's (casting_mode, offset) -> form
FUSED = "fused by Liger-Kernel ({}): act(gate) * up runs in one Triton kernel"
NORM_KEPT = "kept by Liger-Kernel ({}): it keeps x and 1/rms, as actpatch's norm keeping its input would"
PRODUCT_UNSAVED = "left to Liger-Kernel ({}): no later op saves the product; actpatch would keep no less"
OWNED = "Liger-Kernel's own kernel, kept: actpatch has no site keeping less here"


@dataclass(frozen=True)
class Viewed:
    """A Liger module seen as eager while probing: its path, Liger's name for it, and the activation
    child added for the view ("" when it has its own ``act_fn``, as after Liger's instance patch)."""

    path: str
    name: str
    added: str = ""


def _from_liger(obj: object) -> bool:
    return (getattr(obj, "__module__", None) or "").startswith("liger_kernel")


def _liger_forward(module: nn.Module) -> Any:
    """The function ``module`` runs as its forward (an instance's own, else its class's)."""
    fwd = module.__dict__.get("forward", type(module).forward)
    return getattr(fwd, "__func__", fwd)


def _liger_name(module: nn.Module) -> str | None:
    """Liger's name for a module running a forward from Liger-Kernel (its class's, or one bound on the
    instance: Liger rebinds ``_get_name`` to its class name); None for others and those actpatch took over
    (their class's forward is actpatch's)."""
    return module._get_name() if _from_liger(_liger_forward(module)) else None


def liger_fused_modules(model: nn.Module) -> dict[str, str]:
    """Module path -> Liger's name, for every module running a forward Liger-Kernel gave it."""
    named = ((path, _liger_name(m)) for path, m in model.named_modules())
    return {path: name for path, name in named if name is not None}


def _gated_forward(self: nn.Module, x: Any) -> Any:
    """The eager gated MLP Liger replaced: down(act(gate(x)) · up(x))."""
    return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _norm_forward(self: nn.Module, x: Any) -> Any:
    """The eager RMSNorm Liger replaced (Hugging Face's Llama or Gemma formula)."""
    return rms_norm.forward(x, self.weight, self.variance_epsilon, self._actpatch_form)[0]


def _norm_form(module: nn.Module) -> str | None:
    key = (getattr(module, "casting_mode", None), getattr(module, "offset", None))
    return _NORM_FORMS.get(key) if getattr(module, "weight", None) is not None else None


def _eager_class(module: nn.Module, name: str) -> type | None:
    """The class ``module`` is seen as while probing: its own after an instance patch of a transformers
    class (whose forward is the eager one), a subclass with the eager forward after a class swap; None
    when Liger's is kept as it is."""
    cls = type(module)
    if not _from_liger(cls.forward):
        return cls if name in _GATED or name.startswith("LigerRMSNorm") else None
    if name in _GATED:
        return _twin(cls, "")
    form = _norm_form(module) if name.startswith("LigerRMSNorm") else None
    return None if form is None else _twin(cls, form)


@functools.cache
def _twin(cls: type, form: str) -> type:
    """``cls`` with the eager forward: the gated MLP's (``form`` ""), or the RMSNorm's of that form."""
    namespace = {"forward": _norm_forward, "_actpatch_form": form} if form else {"forward": _gated_forward}
    return type(cls.__name__, (cls,), namespace)


@contextlib.contextmanager
def eager_view(model: nn.Module) -> Iterator[list[Viewed]]:
    """Liger's SwiGLU/GeGLU MLPs and RMSNorms computing as the eager modules they replaced, for the
    duration of the block (each module's class, instance ``forward`` and children restored after); yields
    what it changed."""
    viewed, undo = [], []
    for path, module in model.named_modules():
        name = _liger_name(module)
        cls = _eager_class(module, name) if name else None
        if cls is None:
            continue
        undo.append((module, type(module), module.__dict__.pop("forward", None)))
        module.__class__ = cls
        added = ""
        if name in _GATED and "act_fn" not in module._modules:
            module._modules["act_fn"], added = _GATED[name](), "act_fn"
        viewed.append(Viewed(path, name, added))
    try:
        yield viewed
    finally:
        for (module, cls, forward), v in zip(undo, viewed, strict=True):
            module.__class__ = cls
            if forward is not None:
                module.__dict__["forward"] = forward
            if v.added:
                del module._modules[v.added]


def settle(report: PatchReport, model: nn.Module, viewed: list[Viewed]) -> PatchReport:
    """Keep actpatch's decisions on the viewed Liger modules where it keeps less than Liger (a fused gated
    MLP, a norm keeping its output), leave the rest to Liger (not patched, with the reason; the projection
    adds back what they would have freed), and list what else Liger owns (kind "liger").  In place."""
    back = 0
    for site in report.sites:
        owner = next((v for v in viewed if _under(site.path, v.path)), None)
        if owner is None:
            continue
        was = site.saved_bytes_per_token if site.patched else 0
        _leave_to_liger(site, owner)
        back += 0 if site.patched else was
    p = report.projection
    after = p.activation_bytes_after + back * p.batch_size * p.seq_len
    report.projection = Projection(p.batch_size, p.seq_len, p.dtype, p.activation_bytes_before, after)
    listed = [s.path for s in report.sites]
    kept = {p: what for p, what in liger_owned(model).items() if not any(_under(s, p) for s in listed)}
    report.sites += [Site(p, what, None, False, OWNED, kind="liger") for p, what in kept.items()]
    return report


def _leave_to_liger(site: Site, owner: Viewed) -> None:
    """Decide one site of a viewed module: actpatch's where it keeps less, else Liger's (a Linear sharing a
    cast stays actpatch's: Liger's forward calls it as a module all the same)."""
    if site.kind == "cast":
        return
    if owner.added and site.path.startswith(f"{owner.path}.{owner.added}"):
        site.path = f"{owner.path}:{owner.name}"  # the view's act_fn is gone: the site is the fused kernel
    gated_less = site.kind == "gated" and site.consumer is not None  # Liger keeps gate, up and the product
    less = gated_less or (site.kind, site.keeps) == ("norm", "output")
    if less or (site.reason or "").startswith("fused into the gated product"):
        if not site.patched and site.kind != "activation":
            site.reason = f"left to Liger-Kernel ({owner.name}): {site.reason}"
        return
    if site.kind == "gated":
        reason = PRODUCT_UNSAVED.format(owner.name)
    elif site.kind == "norm":
        reason = NORM_KEPT.format(owner.name) if site.patched else f"left to Liger-Kernel: {site.reason}"
    else:
        reason = FUSED.format(owner.name)
    site.patched, site.reason, site.saved_bytes_per_token, site.keeps = False, reason, 0, ""


def _under(path: str, module_path: str) -> bool:
    """Whether a site ``path`` is the module at ``module_path`` or inside it."""
    return path == module_path or path.startswith((module_path + ".", module_path + ":"))


def liger_owned(model: nn.Module) -> dict[str, str]:
    """What Liger-Kernel runs in ``model``: "path" -> the Liger module there, "Class:forward" or
    "path:forward" -> a Liger forward given to a transformers class (the causal LM's fused linear cross
    entropy), "python.module.function" -> a function Liger replaced there (RoPE, cross entropy)."""
    out = {}
    for path, name in liger_fused_modules(model).items():
        module = model.get_submodule(path)
        if _from_liger(type(module)) or "_get_name" in module.__dict__:
            out[path] = name
        else:
            out[f"{path or type(module).__name__}:forward"] = _liger_forward(module).__name__
    namespaces = {sys.modules.get(type(m).__module__) for m in model.modules()} | {nn.functional}
    for ns in namespaces - {None}:
        if ns.__name__.startswith("liger_kernel"):
            continue
        for attr, value in vars(ns).items():
            if isinstance(value, types.FunctionType) and _from_liger(value):
                out[f"{ns.__name__}.{attr}"] = value.__name__
    return out


__all__ = ["eager_view", "liger_fused_modules", "liger_owned", "settle"]
