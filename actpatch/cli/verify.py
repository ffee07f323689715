"""``--verify``: one forward/backward on a small random batch, original against patched.

Library code (no typer/rich); it lives here because only the CLI uses it so far.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

# Tolerances per dtype: the forward is exact up to rounding, the backward is approximated.
TOLERANCES = {
    torch.float32: (1e-4, 1e-2),
    torch.bfloat16: (5e-2, 1e-1),
    torch.float16: (1e-2, 5e-2),
}


class VerifyError(Exception):
    """The patched model could not be run, or its outputs/gradients are not finite."""


@dataclass
class VerifyResult:
    """Differences between the original and the patched model on one random batch.

    ``*_rel``: ‖patched − original‖ / ‖original‖ over the whole output / all gradients.
    """

    batch_size: int
    seq_len: int
    dtype: str
    output_max_abs_diff: float
    output_rel: float
    grad_max_abs_diff: float
    grad_rel: float
    n_grads: int
    output_tol: float
    grad_tol: float

    @property
    def ok(self) -> bool:
        values = (self.output_rel, self.grad_rel)
        finite = all(v == v and v != float("inf") for v in values)
        return finite and self.output_rel <= self.output_tol and self.grad_rel <= self.grad_tol

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def random_inputs(model: torch.nn.Module, batch_size: int, seq_len: int) -> tuple[tuple, dict[str, Any]]:
    """A random batch the model accepts (actpatch.analysis.inputs), without labels: the output is compared."""
    from ..analysis.inputs import input_spec

    try:
        spec = input_spec(model)
        seq = min(seq_len, spec.max_seq or seq_len)
        args, kwargs = spec.make(batch_size, seq)
    except (TypeError, ValueError) as e:
        raise VerifyError(f"cannot make a random batch for {type(model).__name__}: {e}") from e
    kwargs = dict(kwargs)
    kwargs.pop("labels", None)  # encoder-decoders get decoder_input_ids from input_spec
    kwargs.pop("return_loss", None)
    return args, kwargs


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if hasattr(out, "values") else out
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
    raise VerifyError("the model returned no floating-point tensor to compare")


def _run(
    model: torch.nn.Module, inputs: tuple[tuple, dict[str, Any]], seed: int
) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    args, kwargs = inputs
    with torch.enable_grad():
        out = _first_tensor(model(*args, **kwargs))
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out.device)
        (out.float() * weight).sum().backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach().float(), grads


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0


def verify(
    model: torch.nn.Module,
    patch: Callable[[torch.nn.Module], Any],
    *,
    batch_size: int = 2,
    seq_len: int = 16,
    seed: int = 0,
) -> tuple[VerifyResult, Any]:
    """Run ``model`` before and after ``patch(model)`` on one random batch; returns (result, patch's value).

    Dropout is off during both runs (eval mode; gradients still flow); the training mode is restored.
    """
    dtype = next(model.parameters()).dtype
    inputs = random_inputs(model, batch_size, seq_len)
    was_training = model.training
    try:
        model.eval()
        try:
            ref_out, ref_grads = _run(model, inputs, seed)
        except Exception as e:
            raise VerifyError(f"the original model failed on a random batch: {e}") from e
        patched = patch(model)
        model.eval()
        try:
            out, grads = _run(model, inputs, seed)
        except Exception as e:
            raise VerifyError(f"the patched model failed on a random batch: {e}") from e
    finally:
        model.train(was_training)
    common = [n for n in ref_grads if n in grads]
    if not common or set(ref_grads) != set(grads):
        raise VerifyError("the patched model's gradients do not reach the same parameters")
    num = sum(float((grads[n] - ref_grads[n]).pow(2).sum()) for n in common) ** 0.5
    den = sum(float(ref_grads[n].pow(2).sum()) for n in common) ** 0.5
    out_tol, grad_tol = TOLERANCES.get(dtype, TOLERANCES[torch.float32])
    result = VerifyResult(
        batch_size=batch_size,
        seq_len=seq_len,
        dtype=str(dtype).removeprefix("torch."),
        output_max_abs_diff=_max_abs(out, ref_out),
        output_rel=float((out - ref_out).norm() / ref_out.norm().clamp_min(1e-30)),
        grad_max_abs_diff=max(_max_abs(grads[n], ref_grads[n]) for n in common),
        grad_rel=num / max(den, 1e-30),
        n_grads=len(common),
        output_tol=out_tol,
        grad_tol=grad_tol,
    )
    return result, patched


__all__ = ["TOLERANCES", "VerifyError", "VerifyResult", "random_inputs", "verify"]
