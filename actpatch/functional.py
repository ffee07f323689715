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
``silu_mul_halves(gate_up)`` and ``gelu_mul_halves(gate_up)`` are the same products of the two halves of
gate_up's last dimension (Phi-3's ``gate_up_proj(x).chunk(2, -1)``, the ``_apply_gate`` of transformers' MoE
experts), read where they lie, with d(gate_up) computed as one tensor.

``rms_norm(x, weight, eps, variant)`` returns a Hugging Face RMSNorm's output bitwise and keeps x and
1/rms instead of float32 copies (``actpatch.kernels.rms_norm``).

``rms_norm_from_output(x, weight, eps, variant)`` (variant also "torch": ``F.rms_norm``) and
``layer_norm(x, normalized_shape, weight, bias, eps)`` (``F.layer_norm``) return the norm's output bitwise and
keep that output (shared with the Linear after it) and 1/σ, where the weight allows dividing by it
(``actpatch.kernels.norm_output.keeps_output``); otherwise they keep the input as ``rms_norm`` / torch does.

``dropout(x, p, training)`` returns ``F.dropout(x, p, training)`` bitwise (the same random draws) and keeps
its mask as ceil(n/8) bytes of bits instead of a byte (CUDA) or a noise value (CPU) per element; its
gradient is torch's, bitwise (``actpatch.kernels.dropout``).

``autocast_input(x)`` returns x as autocast casts it for a lower-precision op (``linear``, ``matmul``) on x's
device, and the same cast, bitwise and in the same storage, to every op given the same x (the same tensor
object, not modified in place since): eager autocast casts x once per op, and each op keeps its own copy
for backward (q, k and v projections of one hidden state: three).  Each call is a node of its own whose
backward casts the gradient back to x's dtype, as autograd's own cast does, so the gradients summed into x
are eager's, bitwise.  Outside autocast, without grad, under torch.compile (which merges the casts itself)
or a torch.func transform, x is returned as it is (the op then casts it as usual).

``relu_squared(x)`` returns ``torch.square(F.relu(x))`` bitwise and keeps only its output y (shared with the
Linear after it) where eager keeps relu's output too; its gradient, from r = √y rounded to x's dtype, is
eager's bitwise wherever y is a normal number (``actpatch.kernels.relu_squared``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.utils.weak import WeakIdKeyDictionary

from .activations import ACTIVATIONS
from .activations.sigmoid_gated import QUICK_GELU_SCALE, quick_gelu_forward
from .kernels import gated, lookup, norm_output, ops
from .kernels import rms_norm as _rms_norm
from .kernels.bits import pack_bits
from .kernels.ops import (
    DOUBLE_BACKWARD_ERROR,
    GATED_HALVES_OPS,
    GATED_OPS,
    OPS,
    dropout_op,
    layer_norm_keep_output_backward_op,
    relu_squared_op,
    rms_norm_backward_op,
    rms_norm_keep_output_backward_op,
)

INVERTIBLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _act_jvp(name: str, x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Forward-mode AD of the plain activation, f'(x)·ẋ, by torch's own formulas (derivative kernels)."""
    if name == "quick_gelu":  # x σ(c x): ẋ σ + x σ'(c x) c ẋ
        sig = torch.sigmoid(QUICK_GELU_SCALE * x)
        return dx * sig + torch.ops.aten.sigmoid_backward(QUICK_GELU_SCALE * dx, sig) * x
    return gated.act_backward(name, dx, x)


class ActpatchBackward(torch.autograd.Function):
    """A patched op's backward ``fn(*args)`` where a graph of it is built (create_graph; torch.func.grad
    always builds one): differentiating it again, in either mode, raises ``DOUBLE_BACKWARD_ERROR``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(fn: Callable, *args):
        return fn(*args)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)

    jvp = backward


class ActpatchDropoutGrad(torch.autograd.Function):
    """Dropout's gradient dx = D(dy) = m · dy / (1 - p) from the kept bits: linear, so its derivative (either
    mode, any order) is D again, as torch's dropout's."""

    generate_vmap_rule = True

    @staticmethod
    def forward(dy: torch.Tensor, bits: torch.Tensor, p: float) -> torch.Tensor:
        return ops.dropout_backward(dy, bits, p)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, bits, ctx.p = inputs
        ctx.save_for_backward(bits)
        ctx.save_for_forward(bits)

    @staticmethod
    def backward(ctx, ddx: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ActpatchDropoutGrad.apply(ddx, ctx.saved_tensors[0], ctx.p), None, None

    @staticmethod
    def jvp(ctx, ddy: torch.Tensor, _bits, _p) -> torch.Tensor:
        return ActpatchDropoutGrad.apply(ddy, ctx.saved_tensors[0], ctx.p)


class ActpatchInverted(torch.autograd.Function):
    """actpatch::<name> without the dispatcher (eager mode): the same implementations, the same saves;
    with 16-bit ``tables`` (a formula's forward and backward tables), y and g are read from them.

    torch.func: forward and backward are batched by vmap (``generate_vmap_rule``; batched tensors run the
    pure-PyTorch reference); jvp is torch's f'(x)·ẋ, from x kept for forward AD only."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor, name: str, tables: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.activation_forward(name, x, tables and tables[0])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, ctx.name, tables = inputs
        ctx.g_table = tables and tables[1]
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(*output)
        ctx.save_for_forward(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor, _dbits) -> tuple[torch.Tensor, None, None]:
        y, bits = ctx.saved_tensors
        args = (ctx.name, dy, y, bits, ctx.g_table)
        if torch.is_grad_enabled():  # create_graph: a backward whose own backward says why it cannot
            return ActpatchBackward.apply(ops.activation_backward, *args), None, None
        return ops.activation_backward(*args), None, None

    @staticmethod
    def jvp(ctx, dx: torch.Tensor, *_) -> tuple[torch.Tensor, None]:
        return _act_jvp(ctx.name, *ctx.saved_tensors, dx), None


class ActpatchGiven(ActpatchInverted):
    """An inverted activation whose y the caller computed (a formula's, without grad): keeps y and the bits
    [x >= x*]; backward, vmap and jvp are ``ActpatchInverted``'s."""

    @staticmethod
    def forward(x: torch.Tensor, y: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return y.view_as(y), pack_bits(x.float() >= ACTIVATIONS[name].x_star)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, _, ctx.name = inputs
        ctx.g_table = None
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(*output)
        ctx.save_for_forward(x)


class CompiledGiven(torch.autograd.Function):
    """``ActpatchGiven`` for torch.compile: Dynamo traces an autograd.Function with no custom jvp, so its
    forward (the bits) fuses with the formula, and its backward is the custom op ``actpatch::<name>_backward``
    (a fake implementation for the compiler, the Triton kernel at run time)."""

    @staticmethod
    def forward(x: torch.Tensor, y: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return y.view_as(y), pack_bits(x.float() >= ACTIVATIONS[name].x_star)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.name = inputs[2]
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(*output)

    @staticmethod
    def backward(ctx, dy: torch.Tensor, _dbits) -> tuple[torch.Tensor, None, None]:
        return OPS[ctx.name][1](dy, *ctx.saved_tensors), None, None


class ActpatchGated(torch.autograd.Function):
    """actpatch::<name>_mul without the dispatcher (eager mode); torch.func as ``ActpatchInverted``
    (jvp: torch's act'(a)·ȧ·b + act(a)·ḃ)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        a: torch.Tensor, b: torch.Tensor, name: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return ops.gated_forward(name, a, b)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        a, b, ctx.name = inputs
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(*output)
        ctx.save_for_forward(a, b)

    @staticmethod
    def backward(ctx, dm: torch.Tensor, _dk=None, _dbits=None) -> tuple[torch.Tensor, torch.Tensor, None]:
        saved = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (*ActpatchBackward.apply(ops.gated_backward, ctx.name, dm, *saved), None)
        return (*ops.gated_backward(ctx.name, dm, *saved), None)

    @staticmethod
    def jvp(ctx, da: torch.Tensor | None, db: torch.Tensor | None, _) -> tuple[torch.Tensor, None, None]:
        """ṁ = act'(a)·ȧ·b + act(a)·ḃ, torch's formulas (a tangent of None is zero)."""
        a, b = ctx.saved_tensors
        dm = torch.zeros_like(b) if da is None else _act_jvp(ctx.name, a, da) * b
        return dm if db is None else dm + gated.act_forward(ctx.name, a) * db, None, None


class ActpatchGatedHalves(torch.autograd.Function):
    """actpatch::<name>_mul_halves without the dispatcher (eager mode); torch.func as ``ActpatchGated``
    (jvp: the tangents ȧ, ḃ are the halves of gate_up's)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        gate_up: torch.Tensor, name: str, gate_first: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return ops.gated_halves_forward(name, gate_up, gate_first)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        gate_up, ctx.name, ctx.gate_first = inputs
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(*output)
        ctx.save_for_forward(gate_up)

    @staticmethod
    def backward(ctx, dm: torch.Tensor, _dk, _dbits) -> tuple[torch.Tensor, None, None]:
        args = (ctx.name, dm, *ctx.saved_tensors, ctx.gate_first)
        if torch.is_grad_enabled():
            return ActpatchBackward.apply(ops.gated_halves_backward, *args), None, None
        return ops.gated_halves_backward(*args), None, None

    @staticmethod
    def jvp(ctx, d_gate_up: torch.Tensor, _name, _gate_first) -> tuple[torch.Tensor, None, None]:
        """ṁ = act'(a)·ȧ·b + act(a)·ḃ, (ȧ, ḃ) the halves of gate_up's tangent."""
        (gate_up,) = ctx.saved_tensors
        a, b = gated.halves(gate_up, ctx.gate_first)
        da, db = gated.halves(d_gate_up, ctx.gate_first)
        return _act_jvp(ctx.name, a, da) * b + gated.act_forward(ctx.name, a) * db, None, None


class ActpatchRMSNorm(torch.autograd.Function):
    """actpatch::rms_norm without the dispatcher (eager mode): keeps x, the weight and r = 1/rms;
    torch.func as ``ActpatchInverted`` (jvp: torch's, of the module's ops)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor, w: torch.Tensor, eps: float, variant: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _rms_norm.forward(x, w, eps, variant)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, w, ctx.eps, ctx.variant = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, w, output[1])
        ctx.save_for_forward(x, w, output[1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor, _dr=None) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        x, w, r = ctx.saved_tensors
        if torch.is_grad_enabled():
            return (*ActpatchBackward.apply(ops.rms_norm_backward, dy, x, w, r, ctx.variant), None, None)
        return (*ops.rms_norm_backward(dy, x, w, r, ctx.variant), None, None)

    @staticmethod
    def jvp(
        ctx, dx: torch.Tensor | None, dw: torch.Tensor | None, _eps, _variant
    ) -> tuple[torch.Tensor, None]:
        return _rms_norm.jvp(*ctx.saved_tensors, dx, dw, ctx.variant), None


class ActpatchRMSNormFromOutput(torch.autograd.Function):
    """actpatch::rms_norm_keep_output without the dispatcher (eager mode): keeps the output y, the weight and
    r = 1/rms; torch.func as ``ActpatchInverted`` (jvp: torch's, from x kept for forward AD only)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor, w: torch.Tensor, eps: float | None, variant: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return norm_output.rms_norm_forward(x, w, eps, variant)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, w, _, ctx.variant = inputs
        ctx.x_dtype = x.dtype
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[0], w, output[1])
        ctx.save_for_forward(x, w, output[1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor, _dr=None) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        args = (dy, *ctx.saved_tensors, ctx.variant, ctx.x_dtype)
        if torch.is_grad_enabled():
            return (*ActpatchBackward.apply(ops.rms_norm_output_backward, *args), None, None)
        return (*ops.rms_norm_output_backward(*args), None, None)

    @staticmethod
    def jvp(
        ctx, dx: torch.Tensor | None, dw: torch.Tensor | None, _eps, _variant
    ) -> tuple[torch.Tensor, None]:
        return _rms_norm.jvp(*ctx.saved_tensors, dx, dw, ctx.variant), None


class ActpatchLayerNorm(torch.autograd.Function):
    """actpatch::layer_norm_keep_output without the dispatcher (eager mode): keeps the output y, w, b and
    rstd = 1/σ; torch.func as ``ActpatchInverted`` (jvp from x kept for forward AD only)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return norm_output.layer_norm_forward(x, w, b, eps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, w, b, _ = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[0], w, b, output[1])
        ctx.save_for_forward(x, w, output[1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor, _drstd=None) -> tuple:
        args = (dy, *ctx.saved_tensors)
        if torch.is_grad_enabled():
            return (*ActpatchBackward.apply(ops.layer_norm_output_backward, *args), None)
        return (*ops.layer_norm_output_backward(*args), None)

    @staticmethod
    def jvp(ctx, dx, dw, db, _eps) -> tuple[torch.Tensor, None]:
        return norm_output.layer_norm_jvp(*ctx.saved_tensors, dx, dw, db), None


class ActpatchReLUSquared(torch.autograd.Function):
    """actpatch::relu_squared without the dispatcher (eager mode): keeps y alone; torch.func as
    ``ActpatchInverted`` (jvp: torch's 2 r · ṙ, ṙ = ẋ where r = relu(x) > 0; x kept for forward AD only)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return ops.relu_squared_forward(x)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(output)
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            return ActpatchBackward.apply(ops.relu_squared_backward, dy, y)
        return ops.relu_squared_backward(dy, y)

    @staticmethod
    def jvp(ctx, dx: torch.Tensor) -> torch.Tensor:
        r = F.relu(ctx.saved_tensors[0])
        return torch.where(r > 0, dx, 0.0) * (2 * r)


class ActpatchDropout(torch.autograd.Function):
    """actpatch::dropout without the dispatcher (eager mode): keeps the mask's bits.  Under vmap, the mask
    is drawn as torch's dropout draws it there: vmap's ``randomness`` decides ("error" raises, "different"
    one mask per sample, "same" one mask for all); jvp is the same linear map as the backward, m·ẋ/(1-p)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.dropout_forward(x, p)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.p = inputs[1]
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])
        ctx.save_for_forward(output[1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor, _dbits=None) -> tuple[torch.Tensor, None]:
        (bits,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            return ActpatchDropoutGrad.apply(dy, bits, ctx.p), None
        return ops.dropout_backward(dy, bits, ctx.p), None

    @staticmethod
    def jvp(ctx, dx: torch.Tensor, _p) -> tuple[torch.Tensor, None]:
        return ActpatchDropoutGrad.apply(dx, ctx.saved_tensors[0], ctx.p), None


Formula = Callable[[torch.Tensor], torch.Tensor]


def _transformed(*tensors: torch.Tensor | None) -> bool:
    """Whether a torch.func transform (vmap, grad, jvp), forward-mode AD, or a tensor of one (wrapped) is at
    play for ``tensors``: then the Functions above run; otherwise their lean twins below (one output, a
    forward that saves what it needs itself: half the CPU time per call, ``benchmarks/call_overhead.py``)."""
    if _transforms_active() or forward_ad._current_level >= 0:
        return True
    for t in tensors:  # noqa: SIM110  (a loop: no generator object per call)
        if t is not None and _wrapped(t):
            return True
    return False


_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_transforms_active = torch._C._are_functorch_transforms_active


def _eager(cls: type[torch.autograd.Function]) -> type[torch.autograd.Function]:
    """``cls.apply`` becomes autograd's own (C) apply, and its backward node's ``apply`` ``cls.backward``
    itself, without ``Function.apply``'s and ``BackwardCFunction.apply``'s Python wrappers (which, with no
    torch.func transform active and only ``backward`` defined, only pass the arguments on): 1.4 µs less CPU
    time per call, where an autograd.Function that launches nothing costs about torch's op's.  The twins
    run with no transform active only (``_transformed``)."""
    cls.apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, cls)
    cls._backward_cls.apply = cls.backward
    return cls


@_eager
class ActpatchEagerInverted(torch.autograd.Function):
    """``ActpatchInverted`` outside torch.func: the same saves and backward, through the calls resolved for
    x's dtype and device (``ops.activation_calls``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, name: str, tables: tuple[torch.Tensor, torch.Tensor] | None):
        forward, ctx.dx_of = ops.activation_calls(name, x)
        y, bits = forward(x, tables and tables[0])
        ctx.save_for_backward(y, bits)
        ctx.g_table = tables and tables[1]
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        y, bits = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: a backward whose own backward says why it cannot
            return ActpatchBackward.apply(ctx.dx_of, dy, y, bits, ctx.g_table), None, None
        return ctx.dx_of(dy, y, bits, ctx.g_table), None, None


@_eager
class ActpatchEagerGated(torch.autograd.Function):
    """``ActpatchGated`` outside torch.func."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, name: str) -> torch.Tensor:
        m, k, bits = ops.gated_forward(name, a, b)
        ctx.save_for_backward(m, k, bits)
        ctx.name = name
        return m

    backward = staticmethod(ActpatchGated.backward)


@_eager
class ActpatchEagerGatedHalves(torch.autograd.Function):
    """``ActpatchGatedHalves`` outside torch.func."""

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, name: str, gate_first: bool) -> torch.Tensor:
        m, k, bits = ops.gated_halves_forward(name, gate_up, gate_first)
        ctx.save_for_backward(m, k, bits)
        ctx.name, ctx.gate_first = name, gate_first
        return m

    @staticmethod
    def backward(ctx, dm: torch.Tensor):
        return ActpatchGatedHalves.backward(ctx, dm, None, None)


@_eager
class ActpatchEagerRMSNorm(torch.autograd.Function):
    """``ActpatchRMSNorm`` outside torch.func."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, eps: float, variant: str) -> torch.Tensor:
        y, r = _rms_norm.forward(x, w, eps, variant)
        ctx.save_for_backward(x, w, r)
        ctx.variant = variant
        return y

    backward = staticmethod(ActpatchRMSNorm.backward)


@_eager
class ActpatchEagerRMSNormFromOutput(torch.autograd.Function):
    """``ActpatchRMSNormFromOutput`` outside torch.func."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, eps: float | None, variant: str) -> torch.Tensor:
        y, r = norm_output.rms_norm_forward(x, w, eps, variant)
        ctx.save_for_backward(y, w, r)
        ctx.variant, ctx.x_dtype = variant, x.dtype
        return y

    backward = staticmethod(ActpatchRMSNormFromOutput.backward)


@_eager
class ActpatchEagerLayerNorm(torch.autograd.Function):
    """``ActpatchLayerNorm`` outside torch.func."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float
    ) -> torch.Tensor:
        y, rstd = norm_output.layer_norm_forward(x, w, b, eps)
        ctx.save_for_backward(y, w, b, rstd)
        return y

    backward = staticmethod(ActpatchLayerNorm.backward)


class ActpatchCompiledRMSNorm(torch.autograd.Function):
    """``ActpatchEagerRMSNorm`` under torch.compile: the forward traced (fused with its neighbours by the
    compiler), the backward the custom op actpatch::rms_norm_backward from x, w and r."""

    forward = staticmethod(ActpatchEagerRMSNorm.forward)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        dx, dw = rms_norm_backward_op(dy, *ctx.saved_tensors, ctx.variant)
        return dx, dw, None, None


class ActpatchCompiledRMSNormFromOutput(torch.autograd.Function):
    """``ActpatchEagerRMSNormFromOutput`` under torch.compile: the forward is traced, so the compiler fuses it
    with its neighbours as it fuses the module's own; the backward is the custom op
    actpatch::rms_norm_keep_output_backward, from y, w and r, which the partition keeps."""

    forward = staticmethod(ActpatchEagerRMSNormFromOutput.forward)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        dx, dw = rms_norm_keep_output_backward_op(dy, *ctx.saved_tensors, ctx.variant, ctx.x_dtype)
        return dx, dw, None, None


class ActpatchCompiledLayerNorm(torch.autograd.Function):
    """``ActpatchEagerLayerNorm`` under torch.compile: the forward traced, the backward the custom op
    actpatch::layer_norm_keep_output_backward from y, w, b and rstd."""

    forward = staticmethod(ActpatchEagerLayerNorm.forward)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple:
        y, w, b, rstd = ctx.saved_tensors
        dx, dw, db = layer_norm_keep_output_backward_op(dy, y, w, b, rstd)
        return dx, None if w is None else dw, None if b is None else db, None


@_eager
class ActpatchEagerDropout(torch.autograd.Function):
    """``ActpatchDropout`` outside torch.func."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        y, bits = ops.dropout_forward(x, p)
        ctx.save_for_backward(bits)
        ctx.p = p
        return y

    backward = staticmethod(ActpatchDropout.backward)


@_eager
class ActpatchEagerReLUSquared(torch.autograd.Function):
    """``ActpatchReLUSquared`` outside torch.func."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = ops.relu_squared_forward(x)
        ctx.save_for_backward(y)
        return y

    backward = staticmethod(ActpatchReLUSquared.backward)


def _inverted(name: str, x: torch.Tensor, plain: Formula, formula: Formula | None = None) -> torch.Tensor:
    if not (x.requires_grad and torch.is_grad_enabled() and x.dtype in INVERTIBLE_DTYPES):
        return plain(x) if formula is None else formula(x)
    if formula is None:
        if torch.compiler.is_compiling():  # one opaque op in the graph
            return OPS[name][0](x)[0]
        if _transformed(x):
            return ActpatchInverted.apply(x, name, None)[0]
        return ActpatchEagerInverted.apply(x, name, None)
    if x.dtype in lookup.DTYPES and not torch.compiler.is_compiling():
        key = formula_key(formula)
        tables = (
            lookup.table_of(formula, key, x.dtype, x.device),
            lookup.backward_table_of(formula, key, ACTIVATIONS[name], x.dtype, x.device),
        )
        if _transformed(x):
            return ActpatchInverted.apply(x, name, tables)[0]
        return ActpatchEagerInverted.apply(x, name, tables)
    with torch.no_grad():
        y = formula(x)
    if torch.compiler.is_compiling():  # the compiler fuses the formula and the bits
        return CompiledGiven.apply(x, y, name)[0]
    return ActpatchGiven.apply(x, y, name)[0]


def formula_key(formula: Formula) -> Hashable:
    """What identifies an elementwise formula's output: a module's class and its plain settings (``eps``,
    ``min``...), read at its first call (kept per object, off the per-call path), or the function itself."""
    if not isinstance(formula, torch.nn.Module):
        return formula
    key = _FORMULA_KEYS.get(formula)
    if key is None:
        settings = (
            (k, v)
            for k, v in vars(formula).items()
            if isinstance(v, int | float | str) and not k.startswith("_")
        )
        key = _FORMULA_KEYS[formula] = type(formula), tuple(sorted(settings))
    return key


_FORMULA_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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


def relu_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU, y = relu(x)² (Primer's ReLU², transformers' ``ReLUSquaredActivation``), bitwise
    ``torch.square(F.relu(x))``.

    When a gradient will be taken (grad mode on, x requires grad, float32/bfloat16/float16 x) autograd keeps
    y alone, where eager keeps r = relu(x) as well, and the backward recovers r̂ = √y rounded to x's dtype,
    dx = dy · (2 r̂) (0 where y = 0: x <= 0 needs no branch bit).  √(fl(r²)) rounds back to r in binary
    floating point, so r̂ = r and dx is eager's gradient bitwise wherever y is a normal number (r >= 1.1e-19
    in float32/bf16, r >= 2⁻⁷ in fp16) and finite.  Below, y keeps too few digits: |dx − 2 r dy| <=
    √(2 s) |dy| (s: the dtype's smallest subnormal; fp16 3.5e-4 |dy|, else under 1e-19 |dy|).  y = inf
    takes r̂ = √(the dtype's largest value): finite dx.  Otherwise (no grad, float64) the plain torch ops run.
    """
    if not (x.requires_grad and torch.is_grad_enabled() and x.dtype in INVERTIBLE_DTYPES):
        return torch.square(F.relu(x))
    if torch.compiler.is_compiling():  # one opaque op in the graph
        return relu_squared_op(x)
    if _transformed(x):
        return ActpatchReLUSquared.apply(x)
    return ActpatchEagerReLUSquared.apply(x)


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
        if _transformed(gate, up):
            return ActpatchGated.apply(gate, up, name)[0]
        return ActpatchEagerGated.apply(gate, up, name)
    return gated.act_forward(name, gate) * up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's product F.silu(gate) * up."""
    return _gated("silu", gate, up)


def gelu_mul(gate: torch.Tensor, up: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GeGLU's product F.gelu(gate, approximate=approximate) * up."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu_mul: approximate is 'none' or 'tanh', got {approximate!r}")
    return _gated("gelu" if approximate == "none" else "gelu_tanh", gate, up)


def _gated_halves(name: str, gate_up: torch.Tensor, gate_first: bool) -> torch.Tensor:
    if (
        gate_up.requires_grad
        and torch.is_grad_enabled()
        and gate_up.dtype in INVERTIBLE_DTYPES
        and gate_up.dim() > 0
        and gate_up.shape[-1] % 2 == 0
    ):
        if torch.compiler.is_compiling():
            return GATED_HALVES_OPS[name][0](gate_up, gate_first)[0]
        if _transformed(gate_up):
            return ActpatchGatedHalves.apply(gate_up, name, gate_first)[0]
        return ActpatchEagerGatedHalves.apply(gate_up, name, gate_first)
    a, b = gated.halves(gate_up, gate_first)
    return gated.act_forward(name, a) * b


def silu_mul_halves(gate_up: torch.Tensor, gate_first: bool = True) -> torch.Tensor:
    """SwiGLU's product of the halves of one tensor: with a, b = gate_up.chunk(2, dim=-1) (b, a when not
    ``gate_first``), F.silu(a) * b, bitwise ``silu_mul(a, b)``.

    gate_up [.., 2I] is read where it lies (no contiguous copies of the halves); autograd keeps what
    ``silu_mul`` keeps (m, k [.., I], 2 bits an element) and the backward writes d(gate_up) = [da, db]
    ([db, da]) as one [.., 2I] tensor, bitwise the gradient chunk's backward assembles from ``silu_mul``'s
    (da, db).  An odd last dimension runs the plain ops, as chunk does."""
    return _gated_halves("silu", gate_up, gate_first)


def gelu_mul_halves(
    gate_up: torch.Tensor, approximate: str = "none", gate_first: bool = True
) -> torch.Tensor:
    """GeGLU's product of the halves of one tensor, F.gelu(a, approximate=approximate) * b, as
    ``silu_mul_halves``."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu_mul_halves: approximate is 'none' or 'tanh', got {approximate!r}")
    return _gated_halves("gelu" if approximate == "none" else "gelu_tanh", gate_up, gate_first)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, variant: str = "llama") -> torch.Tensor:
    """RMSNorm as Hugging Face computes it, bitwise: ``variant`` "llama" w · (x̂).to(x.dtype), "t5"
    w · x̂ cast to w's dtype when half, "gemma" (x̂ · (1 + w)).to(x.dtype), with x̂ = x / rms(x) in float32."""
    if variant not in _rms_norm.VARIANTS:
        raise ValueError(f"rms_norm: variant is one of {', '.join(_rms_norm.VARIANTS)}, got {variant!r}")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad) and x.is_floating_point():
        if torch.compiler.is_compiling():
            return ActpatchCompiledRMSNorm.apply(x, weight, float(eps), variant)
        if _transformed(x, weight):
            return ActpatchRMSNorm.apply(x, weight, float(eps), variant)[0]
        return ActpatchEagerRMSNorm.apply(x, weight, float(eps), variant)
    return _rms_norm.forward(x, weight, eps, variant)[0]


def _keeps_output(
    x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, variant: str, weight_safe: bool | None
) -> bool:
    """Whether a norm keeps its output: gradient wanted, and ``weight_safe``, the answer of
    ``norm_output.keeps_output`` (cached per weight) for x's dtype made by the caller outside a compiled graph
    (``actpatch.kinds.norm``), or None: made here.  Under torch.compile, where the weight cannot be read
    without breaking the graph, None keeps the input: a weight that becomes unsafe is never missed."""
    params = [t for t in (w, b) if t is not None]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params))):
        return False
    if any(t.dtype != x.dtype or t.device != x.device for t in params) and variant not in ("llama", "t5"):
        return False
    if weight_safe is not None:
        return weight_safe
    if torch.compiler.is_compiling():
        return False
    return norm_output.keeps_output(w, b, x.dtype, variant)


def rms_norm_from_output(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float | None,
    variant: str = "llama",
    *,
    keep_output: bool | None = None,
    weight_safe: bool | None = None,
) -> torch.Tensor:
    """``rms_norm``'s RMSNorm (and ``variant="torch"``: ``F.rms_norm(x, x.shape[-1:], weight, eps)``, eps may
    be None), bitwise, keeping its output and 1/rms where ``keep_output`` (None: decided from the weight, see
    ``_keeps_output``, or from ``weight_safe``, its check made by the caller); otherwise keeping x as
    ``rms_norm`` does (torch: ``F.rms_norm`` itself)."""
    if variant not in norm_output.VARIANTS:
        raise ValueError(f"rms_norm: variant is one of {', '.join(norm_output.VARIANTS)}, got {variant!r}")
    if keep_output is None:
        keep_output = x.is_floating_point() and _keeps_output(x, weight, None, variant, weight_safe)
    if keep_output:
        if torch.compiler.is_compiling():
            return ActpatchCompiledRMSNormFromOutput.apply(x, weight, eps, variant)
        if _transformed(x, weight):
            return ActpatchRMSNormFromOutput.apply(x, weight, eps, variant)[0]
        return ActpatchEagerRMSNormFromOutput.apply(x, weight, eps, variant)
    if variant == "torch":
        return F.rms_norm(x, x.shape[-1:], weight, eps)
    return rms_norm(x, weight, eps, variant)


def layer_norm(
    x: torch.Tensor,
    normalized_shape: list[int] | tuple[int, ...],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    keep_output: bool | None = None,
    weight_safe: bool | None = None,
) -> torch.Tensor:
    """``F.layer_norm``, bitwise: (x − mean) / √(var + eps) · w + b over the last dim, keeping its output and
    1/σ where ``keep_output`` (None: decided from w and b, see ``_keeps_output``, or from ``weight_safe``);
    otherwise ``F.layer_norm`` itself (also for a ``normalized_shape`` of more than the last dim)."""
    if tuple(normalized_shape) != tuple(x.shape[-1:]):
        keep_output = False
    elif keep_output is None:
        keep_output = _keeps_output(x, weight, bias, "layer", weight_safe)
    if not keep_output:
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    if torch.compiler.is_compiling():
        return ActpatchCompiledLayerNorm.apply(x, weight, bias, float(eps))
    if _transformed(x, weight, bias):
        return ActpatchLayerNorm.apply(x, weight, bias, float(eps))[0]
    return ActpatchEagerLayerNorm.apply(x, weight, bias, float(eps))


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True) -> torch.Tensor:
    """Dropout: each element zeroed with probability p, the rest scaled by 1 / (1 - p), as ``F.dropout``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if training and 0.0 < p < 1.0 and x.numel() and x.requires_grad and torch.is_grad_enabled():
        if torch.compiler.is_compiling():
            return dropout_op(x, float(p))[0]
        if _transformed(x):
            return ActpatchDropout.apply(x, float(p))[0]
        return ActpatchEagerDropout.apply(x, float(p))
    return F.dropout(x, p, training)


@_eager
class ActpatchCastOf(torch.autograd.Function):
    """``cast``, x's cast made without autograd, as a new alias (its own node; the storage shared): backward
    casts the gradient to x's dtype, as autograd's ToCopyBackward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cast: torch.Tensor) -> torch.Tensor:
        ctx.dtype = x.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.to(ctx.dtype), None


# x -> (x's version, weakref to its cast); the cast lives while an op keeps an alias of it for backward
_CASTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x cast as autocast casts a lower-precision op's input on x's device, one cast per x for every op."""
    device = x.device.type
    if (
        not torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or device not in ("cuda", "cpu", "xpu")
        or not torch.is_autocast_enabled(device)
        or _transformed(x)
    ):
        return x
    dtype = torch.get_autocast_dtype(device)
    if not x.is_floating_point() or x.dtype in (dtype, torch.float64):
        return x
    kept = _CASTS.get(x)
    cast = kept[1]() if kept is not None and kept[0] == x._version else None
    if cast is None or cast.dtype != dtype:
        cast = x.detach().to(dtype)
        _CASTS[x] = (x._version, weakref.ref(cast))
    return ActpatchCastOf.apply(x, cast) if x.requires_grad else cast
