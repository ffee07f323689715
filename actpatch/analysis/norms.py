"""Norm modules, recognised by value, and what each way of keeping less frees.

A candidate is a leaf module without buffers whose parameters are a 1-D ``weight`` and/or a 1-D ``bias`` (or
none, with a one-dim ``normalized_shape``; or one 1-D parameter of another name, torchtune's ``scale``, taken
as the weight where ``normalized_shape`` gives its size), with at most one attribute whose name contains
"eps" holding a float (or None: ``nn.RMSNorm``'s default; a module holding none, as OLMo's LayerNorm, is
tried with the usual constants ``EPS_GUESSES``).  Its *form* is the first whose output equals the module's
bitwise on random inputs (the class and its name are never read):

    "llama", "t5", "gemma",  an RMSNorm as ``actpatch.kernels.rms_norm`` computes it (weight only; litgpt's,
    "litgpt", "tune"         and torchtune's ``F.rms_norm`` on x.float() cast back), checked in float32,
                             bfloat16 and float16 with weights of the same dtype, and in bfloat16 with
                             float32 weights (autocast)
    "torch"                  ``F.rms_norm`` (``nn.RMSNorm``, torchtitan's; weight only), same-dtype checks
    "layer"                  ``F.layer_norm`` over the last dim (``nn.LayerNorm`` and the families' own
                             classes; weight and bias, either or neither), same-dtype checks

"torch" is tried only for a forward calling torch's ``rms_norm`` on x, "tune" for one calling it on x cast to
another dtype, the others for one calling none: on the CPU all three round alike, on CUDA they differ.  The
check runs on the module's own device (CPU for a model on meta), where the kernels it runs are the ones it
will train with.

A norm computed by a function inside another module's forward (``F.layer_norm``, ``F.rms_norm``) is no
module to replace: :func:`functional_calls` names those calls, reported and left alone.

A norm may keep its *output* (``actpatch.kernels.norm_output``: y, shared with the later op that saves it,
and 4 bytes of 1/σ a row) or, an RMSNorm of a form ``actpatch.kernels.rms_norm`` computes, its *input*
(x and 1/rms); :func:`keeps` says which a call allows and :func:`gain` what it frees.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..kernels import norm_output, rms_norm
from .evidence import Evidence
from .memory import Bytes
from .probe import Call, ProbeResult

_CHECKS = (
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
)
RMS_FORMS = norm_output.VARIANTS
EPS_GUESSES = (1e-5, 1e-6, 1e-12)
KEEPS_INPUT = rms_norm.VARIANTS  # the forms whose replacement can keep x and 1/rms
FUNCTIONAL_NORMS = ("layer_norm", "rms_norm")  # torch functions computing a norm, by name


@dataclass(frozen=True)
class NormParts:
    """What a patched norm computes and keeps: its form, the attribute holding its eps ("": the constant
    ``eps``), "output" or "input", and the name of its weight parameter."""

    form: str
    eps_attr: str
    keeps: str
    eps: float | None = None
    weight: str = "weight"


def candidates(model: nn.Module) -> dict[int, tuple[str, str]]:
    """id(module) -> (path, eps attribute, or "" for none) for every module shaped like a norm."""
    out = {}
    for path, m in model.named_modules():
        if next(m.children(), None) is not None or next(m.buffers(), None) is not None:
            continue
        if _width(m) is None:
            continue
        eps = [k for k, v in vars(m).items() if "eps" in k.lower() and (isinstance(v, float) or v is None)]
        if len(eps) <= 1:
            out[id(m)] = (path, eps[0] if eps else "")
    return out


def roles(m: nn.Module) -> dict[str, str]:
    """Role ("weight", "bias") -> the name of the parameter playing it: ``weight`` and ``bias`` by name, or a
    lone parameter of another name as the weight where ``normalized_shape`` gives its size; {} when the
    parameters are neither."""
    named = dict(m.named_parameters(recurse=False))
    if set(named) <= {"weight", "bias"}:
        return {n: n for n in named}
    shape = getattr(m, "normalized_shape", None)
    if len(named) == 1 and isinstance(shape, tuple | list):
        name, p = next(iter(named.items()))
        if tuple(p.shape) == tuple(shape):
            return {"weight": name}
    return {}


def weight_name(m: nn.Module) -> str:
    """The name of the module's weight parameter ("weight" when it has none)."""
    return roles(m).get("weight", "weight")


def _width(m: nn.Module) -> int | None:
    """The normalised width of a norm-shaped module: its 1-D parameters' (weight, bias, of one size) or its
    one-dim ``normalized_shape``; None when it is not norm-shaped."""
    named = dict(m.named_parameters(recurse=False))
    params = {role: named[name] for role, name in roles(m).items()}
    if len(params) != len(named) or any(p.dim() != 1 for p in params.values()):
        return None
    sizes = {p.shape[0] for p in params.values()}
    shape = getattr(m, "normalized_shape", None)
    if not params and isinstance(shape, tuple | list) and len(shape) == 1 and isinstance(shape[0], int):
        sizes = {shape[0]}
    return sizes.pop() if len(sizes) == 1 else None


def variant_of(module: nn.Module, eps_attr: str) -> str | None:
    """The form ``module`` computes bitwise, or None (also when its forward fails)."""
    found = recognise(module, eps_attr)
    return found and found[0]


def recognise(module: nn.Module, eps_attr: str) -> tuple[str, float | None] | None:
    """(form, eps) of what ``module`` computes bitwise (eps: its attribute's, or the guess that matched),
    or None (also when its forward fails).  The test inputs are fixed, not the module's weights: the answer
    is the same for every module of one class, device, width and settings (cached so: an 80-layer model's
    161 norms are recognised once)."""
    width, names = _width(module), roles(module)
    first = next(module.parameters(recurse=False), None)
    device = "cpu" if first is None or first.is_meta else first.device
    settings = tuple(
        sorted((k, v) for k, v in vars(module).items() if isinstance(v, int | float | str | tuple))
    )
    key = (
        type(module),
        type(module).forward,
        str(device),
        width,
        tuple(sorted(names.items())),
        eps_attr,
        settings,
        tuple(module._buffers),
    )
    if key not in _RECOGNISED:
        _RECOGNISED[key] = _recognise(module, eps_attr, width, names, device)
    return _RECOGNISED[key]


_RECOGNISED: dict[tuple, tuple[str, float | None] | None] = {}


def _recognise(
    module: nn.Module, eps_attr: str, width: int | None, names: dict[str, str], device: object
) -> tuple[str, float | None] | None:
    gen = torch.Generator().manual_seed(0)
    x64 = (torch.randn(3, 2, width, generator=gen, dtype=torch.float64) * 3 + 0.5).to(device)
    p64 = {r: (1 + torch.randn(width, generator=gen, dtype=torch.float64) / 4).to(device) for r in names}
    outputs = []
    # the class's forward on a twin object: the module itself (FSDP's parameters, hooks) is never touched
    twin = object.__new__(type(module))
    twin.__dict__ = {k: v for k, v in module.__dict__.items() if k != "forward"}
    twin._parameters = dict(module._parameters)  # None entries too (nn.LayerNorm without affine)
    with torch.no_grad(), warnings.catch_warnings(), _Called() as called:
        warnings.simplefilter("ignore")
        for x_dtype, w_dtype in _CHECKS:
            x, ps = x64.to(x_dtype), {r: p.to(w_dtype) for r, p in p64.items()}
            twin._parameters.update({names[r]: p for r, p in ps.items()})
            called.x_dtype = x_dtype
            outputs.append((x, ps, _run(module, twin, x)))
    for eps in (getattr(module, eps_attr),) if eps_attr else EPS_GUESSES:
        for form in (*called.rms_forms(), "layer"):
            checks = outputs[:3] if form in ("torch", "layer") else outputs
            if _applies(form, set(names), eps) and _matches(form, eps, checks):
                return form, eps
    return None


def _matches(form: str, eps: float | None, checks: list) -> bool:
    """Whether ``form`` gives each check's output bitwise (False where it fails on those inputs)."""
    try:
        return all(_same(y, _forward(form, x, ps, eps)) for x, ps, y in checks)
    except RuntimeError:  # a device's op refusing these dtypes
        return False


class _Called(TorchFunctionMode):
    """Whether a forward calls torch's ``rms_norm``, and on what: x's own dtype (``x_dtype``, set before each
    run) or another."""

    def __init__(self) -> None:
        super().__init__()
        self.x_dtype: torch.dtype | None = None
        self.given: set[tuple[torch.dtype | None, torch.dtype]] = set()  # (x's dtype, rms_norm's input's)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        x = args[0] if args else (kwargs or {}).get("input")
        if getattr(func, "__name__", "") == "rms_norm" and isinstance(x, torch.Tensor):
            self.given.add((self.x_dtype, x.dtype))
        return func(*args, **(kwargs or {}))

    def rms_forms(self) -> tuple[str, ...]:
        """The RMSNorm forms to try: "torch" for ``rms_norm`` on x itself, "tune" on x cast to another
        dtype, the forms written with torch's elementwise ops where it calls no ``rms_norm``."""
        if not self.given:
            return tuple(f for f in RMS_FORMS if f not in ("torch", "tune"))
        return ("torch",) if all(a == b for a, b in self.given) else ("tune",)


def _run(module: nn.Module, twin: nn.Module, x: torch.Tensor) -> object:
    """The class's forward on the twin, or None where it fails (on plain tensors, or in these dtypes: CUDA's
    LayerNorm refuses a float32 weight with bfloat16 x, which only the RMSNorm forms check)."""
    try:
        return type(module).forward(twin, x)
    except Exception:
        return None


def _applies(form: str, params: set[str], eps: float | None) -> bool:
    if form == "layer":
        return eps is not None
    return params == {"weight"} and (eps is not None or form == "torch")


def _forward(form: str, x: torch.Tensor, ps: dict[str, torch.Tensor], eps: float | None) -> torch.Tensor:
    if form == "layer":
        return norm_output.layer_norm_forward(x, ps.get("weight"), ps.get("bias"), eps)[0]
    return norm_output.rms_norm_forward(x, ps["weight"], eps, form)[0]


def _same(a: object, b: torch.Tensor) -> bool:
    return isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def keeps(evidence: Evidence, calls: list[Call], form: str, held: frozenset[int] = frozenset()) -> str | None:
    """What the norm of these calls keeps: "output" when a later op saves each call's output (that very
    storage: :func:`output_saved`) and nothing outside the call saves its input, nor keeps it (``held``:
    the storages other patched sites keep themselves, an inverted activation's output); else "input" for a
    form that can; else None."""

    def input_kept(c: Call) -> bool:
        group = {id(g) for g in input_group(evidence.probe, c)}
        outside = evidence.outside(c.input_storage, c)
        return c.input_storage in held or any(not s.inside & group for s in outside)

    if calls and all(output_saved(evidence.probe, c) and not input_kept(c) for c in calls):
        return "output"
    return "input" if form in KEEPS_INPUT else None


def input_group(probe: ProbeResult, call: Call) -> list[Call]:
    """The norm calls reading ``call``'s input whose outputs a later op saves, in call order (GPT-NeoX's and
    Pythia's parallel residual: ln_1(x) and ln_2(x)): keeping their outputs together frees x, which each
    alone would leave to the others.  Each is credited an equal share of x (:func:`gain`); one left keeping
    its input for another reason (a weight unsafe to divide by, include/exclude) leaves x kept, and the
    projection then counts the others' shares too many."""
    return [c for c in _norm_calls(probe) if c.input_storage == call.input_storage and output_saved(probe, c)]


def output_saved(probe: ProbeResult, call: Call) -> bool:
    """Whether an op outside ``call`` and outside every other watched module (a norm that may come to keep
    its own output instead of this input, BLOOM's and CLIP's first norms feeding the next) saves its
    output."""
    watched = {id(c) for c in _norm_calls(probe)}
    return any(s.storage == call.output_storage and not (s.inside & watched) for s in probe.saved)


def _norm_calls(probe: ProbeResult) -> list[Call]:
    """The watched calls of modules that may be norms: not the Linears watched for their casts
    (:mod:`actpatch.analysis.casts`), which save a norm's output as any later op does."""
    return [c for c in probe.watched_calls if not isinstance(c.module, nn.Linear)]


def gain(probe: ProbeResult, call: Call, kept: str) -> Bytes:
    """Bytes freed by one call: what its own ops saved that nobody else keeps, less what the replacement
    keeps: 4 bytes of 1/σ per row, and (keeping its input) x unless it is saved anyway."""
    rows = call.numel // _width(call.module)
    if kept == "output":
        freed = probe.freed_by(call) + _shared_input(probe, call)
        return Bytes(freed.scalable, freed.fixed - 4.0 * rows)
    freed = probe.freed_by(call, frozenset({call.input_storage}))
    x_kept = any(s.storage == call.input_storage for s in probe.saved)
    x_bytes = 0 if x_kept else call.input_nbytes
    added = Bytes(x_bytes, 4.0 * rows) if call.input_scalable else Bytes(0.0, x_bytes + 4.0 * rows)
    return Bytes(freed.scalable - added.scalable, freed.fixed - added.fixed)


def _shared_input(probe: ProbeResult, call: Call) -> Bytes:
    """A share of x's bytes for each call of an :func:`input_group` of several, which alone keep x: freed
    when they all keep their outputs, counted once over the group."""
    group = input_group(probe, call)
    ids = {id(c) for c in group}
    savers = [s for s in probe.saved if s.storage == call.input_storage]
    if len(group) < 2 or not savers or any(not s.inside & ids for s in savers):
        return Bytes()
    share = savers[0].nbytes / len(group)
    return Bytes(share, 0.0) if savers[0].scalable else Bytes(0.0, share)


def functional_calls(probe: ProbeResult, modules: set[str]) -> list[tuple[str, str]]:
    """(site, function) for each torch function computing a norm in the forward of a module not in
    ``modules`` (the norm modules already sites): site "<module path>:<function>", as the probe names
    functional activations (one site for every call of that function there)."""
    found = {
        (f"{path}:{event.what}", event.what)
        for path, events in probe.events.items()
        if path not in modules
        for event in events
        if not event.module and event.what in FUNCTIONAL_NORMS
    }
    return sorted(found)
