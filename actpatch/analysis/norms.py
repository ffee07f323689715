"""RMSNorm modules, recognised by value, and what keeping x and 1/rms instead of float32 copies frees.

A candidate is a leaf module whose only parameter is a 1-D ``weight``, with no buffers, and exactly one
float attribute whose name contains "eps" (``variance_epsilon``, ``eps``).  It is an RMSNorm actpatch can
replace (``actpatch.kernels.rms_norm``) when its output equals one variant's bitwise on random inputs
in float32, bfloat16 and float16 with weights of the same dtype, and in bfloat16 with float32 weights
(autocast): the first variant matching all four (the class and its name are never read).  The check
runs on the module's own device (CPU for a model on meta), where the kernels it runs are the ones it
will train with.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..kernels import rms_norm
from .memory import Bytes
from .probe import Call, ProbeResult

_CHECKS = (
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
)


@dataclass(frozen=True)
class NormParts:
    """What a patched RMSNorm computes: the ``rms_norm`` variant and the attribute holding its eps."""

    variant: str
    eps_attr: str


def candidates(model: nn.Module) -> dict[int, tuple[str, str]]:
    """id(module) -> (path, eps attribute) for every module shaped like an RMSNorm."""
    out = {}
    for path, m in model.named_modules():
        params = list(m.named_parameters(recurse=False))
        if next(m.children(), None) is not None or next(m.buffers(), None) is not None:
            continue
        if len(params) != 1 or params[0][0] != "weight" or params[0][1].dim() != 1:
            continue
        eps = [k for k, v in vars(m).items() if "eps" in k.lower() and isinstance(v, float)]
        if len(eps) == 1:
            out[id(m)] = (path, eps[0])
    return out


def variant_of(module: nn.Module, eps_attr: str) -> str | None:
    """The rms_norm variant ``module`` computes bitwise, or None (also when its forward fails)."""
    hidden = module.weight.shape[0]
    eps = getattr(module, eps_attr)
    device = "cpu" if module.weight.is_meta else module.weight.device
    gen = torch.Generator().manual_seed(0)
    x64 = (torch.randn(3, 2, hidden, generator=gen, dtype=torch.float64) * 3).to(device)
    w64 = (1 + torch.randn(hidden, generator=gen, dtype=torch.float64) / 4).to(device)
    outputs = []
    # the class's forward on a twin object: the module itself (FSDP's parameters, hooks) is never touched
    twin = object.__new__(type(module))
    twin.__dict__ = {k: v for k, v in module.__dict__.items() if k != "forward"} | {"_parameters": {}}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for x_dtype, w_dtype in _CHECKS:
                x, w = x64.to(x_dtype), w64.to(w_dtype)
                twin._parameters["weight"] = w
                outputs.append((x, w, type(module).forward(twin, x)))
    except Exception:  # a forward that does not run on plain tensors: not recognised
        return None
    for variant in rms_norm.VARIANTS:
        if all(_same(y, rms_norm.forward(x, w, eps, variant)[0]) for x, w, y in outputs):
            return variant
    return None


def _same(a: object, b: torch.Tensor) -> bool:
    return isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def gain(probe: ProbeResult, call: Call) -> Bytes:
    """Bytes freed by one call: what its own ops saved that nobody else keeps (other than x), less what
    the replacement keeps: x (unless it is saved anyway) and 4 bytes of 1/rms per row."""
    freed = probe.freed_by(call, frozenset({call.input_storage}))
    rows = call.numel // call.module.weight.shape[0]
    x_kept = any(s.storage == call.input_storage for s in probe.saved)
    x_bytes = 0 if x_kept else call.input_nbytes
    added = Bytes(x_bytes, 4.0 * rows) if call.input_scalable else Bytes(0.0, x_bytes + 4.0 * rows)
    return Bytes(freed.scalable - added.scalable, freed.fixed - added.fixed)
