"""Autograd-aware inverted activations and gated products.

Each function returns exactly what its torch counterpart returns.  When a gradient will be taken
(grad mode on, x requires grad, x float32/bfloat16/float16) autograd keeps only the returned output y
and ceil(n/8) bytes of branch bits [x >= x*]; the backward computes f'(x) from them.  Otherwise
(no grad, inference_mode, float64) the plain torch op runs and nothing extra is computed or kept.

``formula=``: an elementwise module or function computing the same activation with its own rounding (a
Python formula such as GPT-2's ``gelu_new``): y is then exactly its output (16-bit: read from a table of its
output at every value, and g from the minimax table of its own (branch, y) classes,
``lookup.backward_table_of``; otherwise computed by it, without grad), inverted as above.

``silu_mul(gate, up)`` and ``gelu_mul(gate, up)`` return act(gate) * up (torch's two ops, bitwise) and
keep the product plus, per element, the gate (or up where act(gate) is ~0) and two bits
(``actpatch.kernels.gated``), for gate and up of one shape and dtype; otherwise the plain ops run.

``rms_norm(x, weight, eps, variant)`` returns a Hugging Face RMSNorm's output bitwise and keeps x and
1/rms instead of float32 copies (``actpatch.kernels.rms_norm``).

``dropout(x, p, training)`` returns ``F.dropout(x, p, training)`` bitwise (the same random draws) and keeps
its mask as ceil(n/8) bytes of bits instead of a byte (CUDA) or a noise value (CPU) per element; its
gradient is torch's, bitwise (``actpatch.kernels.dropout``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
import torch.nn.functional as F

from .activations import ACTIVATIONS
from .activations.sigmoid_gated import quick_gelu_forward
from .kernels import gated, lookup, ops
from .kernels import rms_norm as _rms_norm
from .kernels.bits import pack_bits
from .kernels.ops import GATED_OPS, OPS, dropout_backward_op, dropout_op, rms_norm_backward_op, rms_norm_op

INVERTIBLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class ActpatchInverted(torch.autograd.Function):
    """actpatch::<name> without the dispatcher (eager mode): the same implementations, the same saves;
    with a 16-bit forward ``table`` (a formula's), y is read from it."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, name: str, tables: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        y, bits = ops.activation_forward(name, x, tables and tables[0])
        ctx.save_for_backward(y, bits)
        ctx.name, ctx.g_table = name, tables and tables[1]
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        y, bits = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the custom op, whose own backward says why it cannot
            return OPS[ctx.name][1](dy, y, bits), None, None
        return ops.activation_backward(ctx.name, dy, y, bits, ctx.g_table), None, None


class ActpatchGiven(torch.autograd.Function):
    """An inverted activation whose y the caller computed (a formula's, without grad): keeps y and the bits
    [x >= x*]; the backward is actpatch::<name>'s."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
        bits = pack_bits(x.float() >= ACTIVATIONS[name].x_star)
        ctx.save_for_backward(y, bits)
        ctx.name = name
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        y, bits = ctx.saved_tensors
        if torch.is_grad_enabled():
            return OPS[ctx.name][1](dy, y, bits), None, None
        return ops.activation_backward(ctx.name, dy, y, bits), None, None


class ActpatchGated(torch.autograd.Function):
    """actpatch::<name>_mul without the dispatcher (eager mode)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, name: str) -> torch.Tensor:
        m, k, bits = ops.gated_forward(name, a, b)
        ctx.save_for_backward(m, k, bits)
        ctx.name = name
        return m

    @staticmethod
    def backward(ctx, dm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        saved = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (*GATED_OPS[ctx.name][1](dm, *saved), None)
        return (*ops.gated_backward(ctx.name, dm, *saved), None)


class ActpatchRMSNorm(torch.autograd.Function):
    """actpatch::rms_norm without the dispatcher (eager mode): keeps x, the weight and r = 1/rms."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, eps: float, variant: str) -> torch.Tensor:
        y, r = _rms_norm.forward(x, w, eps, variant)
        ctx.save_for_backward(x, w, r)
        ctx.variant = variant
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        x, w, r = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (*rms_norm_backward_op(dy, x, w, r, ctx.variant), None, None)
        return (*ops.rms_norm_backward(dy, x, w, r, ctx.variant), None, None)


class ActpatchDropout(torch.autograd.Function):
    """actpatch::dropout without the dispatcher (eager mode): keeps the mask's bits."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        y, bits = ops.dropout_forward(x, p)
        ctx.save_for_backward(bits)
        ctx.p = p
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None]:
        (bits,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            return dropout_backward_op(dy, bits, ctx.p), None
        return ops.dropout_backward(dy, bits, ctx.p), None


Formula = Callable[[torch.Tensor], torch.Tensor]


def _inverted(name: str, x: torch.Tensor, plain: Formula, formula: Formula | None = None) -> torch.Tensor:
    if not (x.requires_grad and torch.is_grad_enabled() and x.dtype in INVERTIBLE_DTYPES):
        return plain(x) if formula is None else formula(x)
    if formula is None:
        if torch.compiler.is_compiling():  # one opaque op in the graph
            return OPS[name][0](x)[0]
        return ActpatchInverted.apply(x, name)
    if x.dtype in lookup.DTYPES and not torch.compiler.is_compiling():
        key = formula_key(formula)
        tables = (
            lookup.table_of(formula, key, x.dtype, x.device),
            lookup.backward_table_of(formula, key, ACTIVATIONS[name], x.dtype, x.device),
        )
        return ActpatchInverted.apply(x, name, tables)
    with torch.no_grad():
        y = formula(x)
    return ActpatchGiven.apply(x, y, name)


def formula_key(formula: Formula) -> Hashable:
    """What identifies an elementwise formula's output: a module's class and its plain settings (``eps``,
    ``min``...), or the function itself."""
    if not isinstance(formula, torch.nn.Module):
        return formula
    settings = (
        (k, v) for k, v in vars(formula).items() if isinstance(v, int | float | str) and not k.startswith("_")
    )
    return type(formula), tuple(sorted(settings))


def gelu(x: torch.Tensor, approximate: str = "none", *, formula: Formula | None = None) -> torch.Tensor:
    """GELU, x Φ(x) (``approximate="none"``) or 0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³))) (``"tanh"``)."""
    if approximate == "none":
        return _inverted("gelu", x, F.gelu, formula)
    if approximate == "tanh":
        return _inverted("gelu_tanh", x, ACTIVATIONS["gelu_tanh"].forward, formula)
    raise ValueError(f"actpatch.functional.gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


def silu(x: torch.Tensor, *, formula: Formula | None = None) -> torch.Tensor:
    """SiLU / Swish, x σ(x)."""
    return _inverted("silu", x, F.silu, formula)


def quick_gelu(x: torch.Tensor, *, formula: Formula | None = None) -> torch.Tensor:
    """QuickGELU, x σ(1.702 x) (CLIP's activation)."""
    return _inverted("quick_gelu", x, quick_gelu_forward, formula)


def _gated(name: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if (
        (gate.requires_grad or up.requires_grad)
        and torch.is_grad_enabled()
        and gate.dtype in INVERTIBLE_DTYPES
        and gate.dtype == up.dtype
        and gate.shape == up.shape
        and gate.device == up.device
    ):
        if torch.compiler.is_compiling():
            return GATED_OPS[name][0](gate, up)[0]
        return ActpatchGated.apply(gate, up, name)
    return gated.act_forward(name, gate) * up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's product F.silu(gate) * up."""
    return _gated("silu", gate, up)


def gelu_mul(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GeGLU's product F.gelu(gate, approximate=approximate) * up."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu_mul: approximate is 'none' or 'tanh', got {approximate!r}")
    return _gated("gelu" if approximate == "none" else "gelu_tanh", gate, up)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, variant: str = "llama") -> torch.Tensor:
    """RMSNorm as Hugging Face computes it, bitwise: ``variant`` "llama" w · (x̂).to(x.dtype), "t5"
    w · x̂ cast to w's dtype when half, "gemma" (x̂ · (1 + w)).to(x.dtype), with x̂ = x / rms(x) in float32."""
    if variant not in _rms_norm.VARIANTS:
        raise ValueError(f"rms_norm: variant is one of {', '.join(_rms_norm.VARIANTS)}, got {variant!r}")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad) and x.is_floating_point():
        if torch.compiler.is_compiling():
            return rms_norm_op(x, weight, float(eps), variant)[0]
        return ActpatchRMSNorm.apply(x, weight, float(eps), variant)
    return _rms_norm.forward(x, weight, eps, variant)[0]


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True) -> torch.Tensor:
    """Dropout: each element zeroed with probability p, the rest scaled by 1 / (1 - p), as ``F.dropout``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if training and 0.0 < p < 1.0 and x.numel() and x.requires_grad and torch.is_grad_enabled():
        if torch.compiler.is_compiling():
            return dropout_op(x, float(p))[0]
        return ActpatchDropout.apply(x, float(p))
    return F.dropout(x, p, training)
