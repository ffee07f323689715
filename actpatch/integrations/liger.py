"""Liger-Kernel: find the modules Liger already fused, and say so in a PatchReport.

Liger swaps classes (``LlamaMLP`` -> ``LigerSwiGLUMLP``) or rebinds ``forward`` on instances
(``apply_liger_kernel_to_*(model=...)``).  A fused SwiGLU/GeGLU MLP computes act(gate) * up inside one
Triton kernel, keeping gate and up for backward; there is no activation module left to swap (or, after an
instance patch, an ``act_fn`` that never runs).  actpatch leaves those sites to Liger:
:func:`annotate_report` marks them ``patched=False`` with the reason "fused by Liger-Kernel".
"""

from __future__ import annotations

from typing import Any

from torch import nn

_FUSED_ACT = {"LigerSwiGLUMLP": "silu", "LigerGEGLUMLP": "gelu_tanh", "LigerPhi3SwiGLUMLP": "silu"}


def _liger_name(module: nn.Module) -> str | None:
    cls = type(module)
    if cls.__module__.startswith("liger_kernel"):
        return cls.__name__
    fwd = module.__dict__.get("forward")
    func = getattr(fwd, "__func__", fwd)
    if func is not None and getattr(func, "__module__", "").startswith("liger_kernel"):
        return module._get_name()  # Liger rebinds _get_name to its class name
    return None


def liger_fused_modules(model: nn.Module) -> dict[str, str]:
    """Module path -> Liger class name, for every module whose class or forward comes from Liger-Kernel."""
    out = {}
    for path, module in model.named_modules():
        name = _liger_name(module)
        if name is not None:
            out[path] = name
    return out


def annotate_report(report: Any, model: nn.Module) -> Any:
    """Mark the activation sites inside Liger-fused MLPs in ``report`` (in place; also returned).

    A site already listed under such an MLP (an ``act_fn`` left behind by an instance patch) gets
    ``patched=False`` and the Liger reason; a fused MLP with no listed site gets a new entry
    ``"<mlp path>:<Liger class>"`` so the report shows every activation, fused or not.
    """
    from ..report import Site

    for path, name in liger_fused_modules(model).items():
        if name not in _FUSED_ACT:
            continue
        reason = f"fused by Liger-Kernel ({name}): act(gate) * up runs in one Triton kernel"
        inside = [s for s in report.sites if s.path.startswith(path + ".") or s.path.startswith(path + ":")]
        for s in inside:
            if s.patched:
                continue  # actpatch's evidence says its swap is live: the act_fn does run
            s.reason, s.saved_bytes_per_token = reason, 0
        if not inside:
            report.sites.append(Site(f"{path}:{name}", _FUSED_ACT[name], None, False, reason, 0))
    return report


__all__ = ["annotate_report", "liger_fused_modules"]
