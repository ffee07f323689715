"""Liger-Kernel's fused linear cross entropy on the meta device, for dry runs: its kernels do not run there.

Liger's ``LigerFusedLinearCrossEntropyFunction`` computes the loss and the gradients of its input x and
of the head's weight W in the forward, chunk by chunk, and saves those two gradients (``zeros_like(x)``,
``zeros_like(W)``, filled); it keeps no logits.  Within :class:`MetaFusedLoss` the model's own head and
loss run as that: the Linear with the output embeddings' weight computes its logits without autograd
(nothing saved), and the cross entropy of logits of that width is a function saving ``zeros_like(x)`` and
``zeros_like(W)`` — what a probe under Liger's model sees, with the model's eager loss head written as it
is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode


class MetaFusedLoss(TorchFunctionMode):
    """The head ``weight``'s Linear and the cross entropy after it, as Liger's fused linear cross entropy
    keeps them (see the module docstring)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight
        self.input: torch.Tensor | None = None  # the head's input, from its last call

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "linear" and len(args) > 1 and args[1] is self.weight:
            self.input = args[0]
            with torch.no_grad():
                return func(*args, **kwargs)
        if name == "cross_entropy" and self.input is not None and args[0].shape[-1] == self.weight.shape[0]:
            return _FusedLoss.apply(self.input, self.weight)
        return func(*args, **kwargs)


class _FusedLoss(torch.autograd.Function):
    """Saves what Liger's fused linear cross entropy saves: the gradients of its input and weight."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(torch.zeros_like(x), torch.zeros_like(weight))
        return x.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad, grad_weight * grad
