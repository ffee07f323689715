"""torch.library registration: one custom op per activation, so torch.compile and meta tensors see one op.

``actpatch::<name>(Tensor x) -> (Tensor y, Tensor bits)``  the forward (y is returned to the caller,
autograd saves y itself and the bits);
``actpatch::<name>_backward(Tensor dy, Tensor y, Tensor bits) -> Tensor``  dx = dy · g_b(y).
``actpatch::<name>_mul(Tensor a, Tensor b) -> (Tensor m, Tensor k, Tensor bits)``  the gated product
m = act(a) · b for silu, gelu, gelu_tanh (``gated.py``); ``<name>_mul_backward(dm, m, k, bits)`` -> (da, db).
``actpatch::<name>_mul_halves(Tensor gate_up, bool gate_first) -> (Tensor m, Tensor k, Tensor bits)``  the
same product of the two halves of gate_up's last dimension (the gate first, or up first), read in place;
``<name>_mul_halves_backward(dm, m, k, bits, gate_first)`` -> d(gate_up), one tensor shaped like gate_up.
``actpatch::dropout(Tensor x, float p) -> (Tensor y, Tensor bits)``  torch's dropout (training mode), keeping
its mask as bits (``dropout.py``); ``dropout_backward(dy, bits, p)`` -> dx, torch's gradient bitwise (linear
in dy, so differentiable again: its derivative is itself).
``actpatch::relu_squared(Tensor x) -> Tensor``  y = relu(x)², keeping only y (``relu_squared.py``);
``relu_squared_backward(dy, y)`` -> dx = 2 √y · dy.
``actpatch::rms_norm_backward(Tensor dy, Tensor x, Tensor w, Tensor r, str variant) -> (Tensor dx,
Tensor dw)``  the backward of an RMSNorm keeping x and r = 1/rms (``rms_norm.py``);
``actpatch::rms_norm_keep_output_backward(dy, y, w, r, variant, x_dtype)`` -> (dx, dw) and
``layer_norm_keep_output_backward(dy, y, w, b, rstd)`` -> (dx, dw, db) (dw, db empty where w, b are None),
those of norms keeping their output y and 1/σ (``norm_output.py``).  The norms' forwards are torch's ops,
which the compiler traces and fuses with their neighbours (``actpatch.functional``): no forward op.

Every device runs the pure-PyTorch reference; CUDA runs the fused Triton kernels when Triton imports
(one place decides: ``activation_forward`` ... ``relu_squared_backward`` below, which the ops call; the
RMSNorm's forward is torch's ops everywhere, bitwise the module's).
``activation_forward`` ... ``relu_squared_backward`` are those implementations as plain functions, for callers
that skip the dispatcher (``actpatch.functional`` in eager mode): the dispatcher's Python round trip
costs CPU time a CPU-bound training step pays in wall time (a GELU's forward + backward 280 µs through the
custom op, 197 through the eager path on an H200's host; ``benchmarks/call_overhead.py``, docs/benchmarks.md).

torch.func over these custom ops (only torch.compile calls them): vmap raises ``TORCH_FUNC_ERROR``;
grad raises torch's error (``register_autograd`` is not a torch.func transform rule).  Eager callers
(``actpatch.functional``) support grad, vmap, jvp and their compositions.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable

import torch

from ..activations import ACTIVATIONS
from . import dropout, gated, norm_output, reference, relu_squared, rms_norm
from .bits import packed_size

DOUBLE_BACKWARD_ERROR = (
    "actpatch: patched ops (inverted activations, gated products, norms) do not support double backward "
    "(create_graph=True) nor second derivatives in torch.func (hessian, jacrev or jacfwd of grad): their "
    "backward is computed from what they keep, not differentiated again. "
    "Unpatch the model (actpatch.unpatch_model) for higher-order gradients."
)
TORCH_FUNC_ERROR = (
    "actpatch: {transform} over the custom op {op} (the form a patched op takes under torch.compile) is not "
    "supported. Outside torch.compile, actpatch.functional's ops support torch.func.grad, vmap, jvp and "
    "their compositions."
)


def _triton(module: str):
    """``actpatch.kernels.<module>`` (Triton kernels), or None where Triton does not import."""
    try:
        return importlib.import_module(f".{module}", __package__)
    except ImportError:
        return None


_KERNELS = _triton("triton")
_GATED_KERNELS = _triton("triton_gated")
_NORM_KERNELS = _triton("triton_norm")
_NORM_OUTPUT_KERNELS = _triton("triton_norm_output")
_DROPOUT_KERNELS = _triton("triton_dropout")
_RELU_SQUARED_KERNELS = _triton("triton_relu_squared")
_DROPOUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# a random op: never recomputed, reordered or merged by the compiler (where custom_op takes ``tags``)
_SEEDED = (
    {"tags": (torch.Tag.nondeterministic_seeded,)}
    if "tags" in inspect.signature(torch.library.custom_op).parameters
    else {}
)


def _on_gpu(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can take t: a CUDA tensor, not one of torch.func's wrappers (vmap's batched
    tensors, grad's tracking ones), which have no storage of their own: those run the pure-PyTorch path."""
    return t.is_cuda and not torch._C._functorch.is_functorch_wrapped_tensor(t)


def activation_forward(
    name: str, x: torch.Tensor, table: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, bits) as ``actpatch::<name>`` computes them on x's device; with a 16-bit forward ``table`` (a
    module's own formula's, ``lookup.table_of``), y is its entry of x."""
    if _KERNELS is not None and _on_gpu(x):
        return _KERNELS.forward(x, ACTIVATIONS[name], table)
    return reference.forward(x, ACTIVATIONS[name], table)


def activation_backward(
    name: str, dy: torch.Tensor, y: torch.Tensor, bits: torch.Tensor, table: torch.Tensor | None = None
) -> torch.Tensor:
    """dx as ``actpatch::<name>_backward`` computes it on y's device; with a 16-bit backward ``table`` (a
    formula's, ``lookup.backward_table_of``), g is read from it."""
    if _KERNELS is not None and _on_gpu(y):
        return _KERNELS.backward(dy, y, bits, ACTIVATIONS[name], g_table=table)
    return reference.backward(dy, y, bits, ACTIVATIONS[name], table)


def activation_calls(name: str, x: torch.Tensor) -> tuple[Callable, Callable]:
    """(forward(x, table), backward(dy, y, bits, table)): ``activation_forward`` and ``activation_backward``
    for tensors of x's dtype on x's device (not torch.func's wrappers), resolved at the first call (kept in
    ``_EAGER_PLANS``): for eager callers, whose calls then allocate their outputs and launch."""
    key = name, x.dtype, x.device
    calls = _EAGER_PLANS.get(key)
    if calls is None:
        act = ACTIVATIONS[name]
        if _KERNELS is not None and _on_gpu(x):
            calls = _KERNELS.prepared(act, x.dtype, x.device)
        else:
            calls = (
                lambda t, table: reference.forward(t, act, table),
                lambda dy, y, bits, table: reference.backward(dy, y, bits, act, table),
            )
        _EAGER_PLANS[key] = calls
    return calls


_EAGER_PLANS: dict[tuple, tuple[Callable, Callable]] = {}


def gated_forward(
    name: str, a: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m, k, bits) as ``actpatch::<name>_mul`` computes them on a's device."""
    if _GATED_KERNELS is not None and _on_gpu(a):
        return _GATED_KERNELS.forward(a, b, name)
    return gated.forward(a, b, name)


def gated_backward(
    name: str, dm: torch.Tensor, m: torch.Tensor, k: torch.Tensor, bits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(da, db) as ``actpatch::<name>_mul_backward`` computes them on m's device."""
    if _GATED_KERNELS is not None and _on_gpu(m):
        return _GATED_KERNELS.backward(dm, m, k, bits, name)
    return gated.backward(dm, m, k, bits, name)


def gated_halves_forward(
    name: str, gate_up: torch.Tensor, gate_first: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m, k, bits) as ``actpatch::<name>_mul_halves`` computes them on gate_up's device."""
    if _GATED_KERNELS is not None and _on_gpu(gate_up):
        return _GATED_KERNELS.halves_forward(gate_up, name, gate_first)
    return gated.halves_forward(gate_up, name, gate_first)


def gated_halves_backward(
    name: str, dm: torch.Tensor, m: torch.Tensor, k: torch.Tensor, bits: torch.Tensor, gate_first: bool
) -> torch.Tensor:
    """d(gate_up) as ``actpatch::<name>_mul_halves_backward`` computes it on m's device."""
    if _GATED_KERNELS is not None and _on_gpu(m):
        return _GATED_KERNELS.halves_backward(dm, m, k, bits, name, gate_first)
    return gated.halves_backward(dm, m, k, bits, name, gate_first)


def rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, variant: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw) as ``actpatch::rms_norm_backward`` computes them on x's device."""
    if _NORM_KERNELS is not None and _on_gpu(x):
        return _NORM_KERNELS.backward(dy, x, w, r, variant)
    return rms_norm.backward(dy, x, w, r, variant)


def rms_norm_output_backward(
    dy: torch.Tensor, y: torch.Tensor, w: torch.Tensor, r: torch.Tensor, variant: str, x_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw) as ``actpatch::rms_norm_keep_output_backward`` computes them on y's device."""
    if _NORM_OUTPUT_KERNELS is not None and _on_gpu(y):
        return _NORM_OUTPUT_KERNELS.rms_backward(dy, y, w, r, variant, x_dtype)
    return norm_output.rms_norm_backward_from_output(dy, y, w, r, variant, x_dtype)


def layer_norm_output_backward(
    dy: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dw, db) as ``actpatch::layer_norm_keep_output_backward`` computes them on y's device."""
    if _NORM_OUTPUT_KERNELS is not None and _on_gpu(y):
        return _NORM_OUTPUT_KERNELS.layer_backward(dy, y, w, b, rstd)
    return norm_output.layer_norm_backward_from_output(dy, y, w, b, rstd)


def dropout_forward(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, bits) as ``actpatch::dropout`` computes them on x's device: torch's own dropout, its mask packed
    by Triton on CUDA."""
    if _DROPOUT_KERNELS is not None and _on_gpu(x):
        return dropout.forward(x, p, _DROPOUT_KERNELS.pack)
    return dropout.forward(x, p)


def dropout_backward(dy: torch.Tensor, bits: torch.Tensor, p: float) -> torch.Tensor:
    """dx as ``actpatch::dropout_backward`` computes it on dy's device."""
    if _DROPOUT_KERNELS is not None and _on_gpu(dy) and dy.dtype in _DROPOUT_DTYPES:
        return _DROPOUT_KERNELS.backward(dy, bits, p)
    return dropout.backward(dy, bits, p)


def relu_squared_forward(x: torch.Tensor) -> torch.Tensor:
    """y as ``actpatch::relu_squared`` computes it on x's device."""
    if _RELU_SQUARED_KERNELS is not None and _on_gpu(x):
        return _RELU_SQUARED_KERNELS.forward(x)
    return relu_squared.forward(x)


def relu_squared_backward(dy: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dx as ``actpatch::relu_squared_backward`` computes it on y's device."""
    if _RELU_SQUARED_KERNELS is not None and _on_gpu(y):
        return _RELU_SQUARED_KERNELS.backward(dy, y)
    return relu_squared.backward(dy, y)


def _no_second_order(ctx, *_):
    raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def _no_vmap(op) -> None:
    """op's vmap rule: ``TORCH_FUNC_ERROR`` (what torch would do instead is run it per sample, silently)."""

    def rule(info, in_dims, *args):
        raise RuntimeError(TORCH_FUNC_ERROR.format(op=op._qualname, transform="torch.func.vmap"))

    op.register_vmap(rule)


def _register(name: str) -> tuple[object, object]:
    @torch.library.custom_op(f"actpatch::{name}", mutates_args=())
    def fwd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return activation_forward(name, x)

    @fwd.register_fake
    def _(x):
        return torch.empty_like(x), x.new_empty(packed_size(x.numel()), dtype=torch.uint8)

    @torch.library.custom_op(f"actpatch::{name}_backward", mutates_args=())
    def bwd(dy: torch.Tensor, y: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        return activation_backward(name, dy, y, bits)

    @bwd.register_fake
    def _(dy, y, bits):
        return torch.empty_like(dy)

    def setup_context(ctx, inputs, output):
        y, bits = output
        ctx.save_for_backward(y, bits)

    def backward(ctx, dy, _dbits):
        y, bits = ctx.saved_tensors
        return bwd(dy, y, bits)

    def second_order(ctx, _ddx):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)

    fwd.register_autograd(backward, setup_context=setup_context)
    bwd.register_autograd(second_order, setup_context=lambda ctx, inputs, output: None)
    _no_vmap(fwd)
    _no_vmap(bwd)
    return fwd, bwd


OPS: dict[str, tuple[object, object]] = {name: _register(name) for name in ACTIVATIONS}


def _register_gated(name: str) -> tuple[object, object]:
    @torch.library.custom_op(f"actpatch::{name}_mul", mutates_args=())
    def fwd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return gated_forward(name, a, b)

    @fwd.register_fake
    def _(a, b):
        bits = a.new_empty(2 * packed_size(a.numel()), dtype=torch.uint8)
        return torch.empty_like(a), torch.empty_like(a), bits

    @torch.library.custom_op(f"actpatch::{name}_mul_backward", mutates_args=())
    def bwd(
        dm: torch.Tensor, m: torch.Tensor, k: torch.Tensor, bits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return gated_backward(name, dm, m, k, bits)

    @bwd.register_fake
    def _(dm, m, k, bits):
        return torch.empty_like(dm), torch.empty_like(dm)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*output)

    def backward(ctx, dm, _dk, _dbits):
        return bwd(dm, *ctx.saved_tensors)

    def second_order(ctx, _dda, _ddb):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)

    fwd.register_autograd(backward, setup_context=setup_context)
    bwd.register_autograd(second_order, setup_context=lambda ctx, inputs, output: None)
    _no_vmap(fwd)
    _no_vmap(bwd)
    return fwd, bwd


GATED_OPS: dict[str, tuple[object, object]] = {name: _register_gated(name) for name in gated.GATED}


def _halves_shape(gate_up: torch.Tensor) -> tuple[int, ...]:
    return (*gate_up.shape[:-1], gate_up.shape[-1] // 2)


def _register_gated_halves(name: str) -> tuple[object, object]:
    @torch.library.custom_op(f"actpatch::{name}_mul_halves", mutates_args=())
    def fwd(gate_up: torch.Tensor, gate_first: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return gated_halves_forward(name, gate_up, gate_first)

    @fwd.register_fake
    def _(gate_up, gate_first):
        shape = _halves_shape(gate_up)
        bits = gate_up.new_empty(2 * packed_size(math.prod(shape)), dtype=torch.uint8)
        return gate_up.new_empty(shape), gate_up.new_empty(shape), bits

    @torch.library.custom_op(f"actpatch::{name}_mul_halves_backward", mutates_args=())
    def bwd(
        dm: torch.Tensor, m: torch.Tensor, k: torch.Tensor, bits: torch.Tensor, gate_first: bool
    ) -> torch.Tensor:
        return gated_halves_backward(name, dm, m, k, bits, gate_first)

    @bwd.register_fake
    def _(dm, m, k, bits, gate_first):
        return dm.new_empty((*dm.shape[:-1], 2 * dm.shape[-1]))

    def setup_context(ctx, inputs, output):
        ctx.gate_first = inputs[1]
        ctx.save_for_backward(*output)

    def backward(ctx, dm, _dk, _dbits):
        return bwd(dm, *ctx.saved_tensors, ctx.gate_first), None

    fwd.register_autograd(backward, setup_context=setup_context)
    bwd.register_autograd(_no_second_order, setup_context=lambda ctx, inputs, output: None)
    _no_vmap(fwd)
    _no_vmap(bwd)
    return fwd, bwd


GATED_HALVES_OPS: dict[str, tuple[object, object]] = {
    name: _register_gated_halves(name) for name in gated.GATED
}


@torch.library.custom_op("actpatch::rms_norm_backward", mutates_args=())
def rms_norm_backward_op(
    dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, variant: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_backward(dy, x, w, r, variant)


@rms_norm_backward_op.register_fake
def _(dy, x, w, r, variant):
    return torch.empty_like(x), torch.empty_like(w)


@torch.library.custom_op("actpatch::rms_norm_keep_output_backward", mutates_args=())
def rms_norm_keep_output_backward_op(
    dy: torch.Tensor, y: torch.Tensor, w: torch.Tensor, r: torch.Tensor, variant: str, x_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_output_backward(dy, y, w, r, variant, x_dtype)


@rms_norm_keep_output_backward_op.register_fake
def _(dy, y, w, r, variant, x_dtype):
    return y.new_empty(y.shape, dtype=x_dtype), torch.empty_like(w)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _or_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t


@torch.library.custom_op("actpatch::layer_norm_keep_output_backward", mutates_args=())
def layer_norm_keep_output_backward_op(
    dy: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = layer_norm_output_backward(dy, y, w, b, rstd)
    # the fused kernel's dw and db are rows of one sum, and a custom op's outputs may not alias each other
    if dw is not None and db is not None and _storage(db) == _storage(dw):
        db = db.clone()
    return dx, _or_empty(dw, y), _or_empty(db, y)


@layer_norm_keep_output_backward_op.register_fake
def _(dy, y, w, b, rstd):
    return torch.empty_like(y), torch.empty_like(_or_empty(w, y)), torch.empty_like(_or_empty(b, y))


for _bwd in (rms_norm_backward_op, rms_norm_keep_output_backward_op, layer_norm_keep_output_backward_op):
    _bwd.register_autograd(_no_second_order, setup_context=lambda ctx, inputs, output: None)
    _no_vmap(_bwd)


@torch.library.custom_op("actpatch::dropout", mutates_args=(), **_SEEDED)
def dropout_op(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    return dropout_forward(x, p)


@dropout_op.register_fake
def _(x, p):
    return torch.empty_like(x), x.new_empty(packed_size(x.numel()), dtype=torch.uint8)


@torch.library.custom_op("actpatch::dropout_backward", mutates_args=())
def dropout_backward_op(dy: torch.Tensor, bits: torch.Tensor, p: float) -> torch.Tensor:
    return dropout_backward(dy, bits, p)


@dropout_backward_op.register_fake
def _(dy, bits, p):
    return torch.empty_like(dy)


def _dropout_setup(ctx, inputs, output):
    ctx.p = inputs[1]
    ctx.save_for_backward(output[1])


def _dropout_backward(ctx, dy, _dbits):
    return dropout_backward_op(dy, ctx.saved_tensors[0], ctx.p), None


def _dropout_backward_setup(ctx, inputs, output):
    _, bits, ctx.p = inputs
    ctx.save_for_backward(bits)


def _dropout_second_order(ctx, ddx):
    """dx is linear in dy, dx = D(dy): its own derivative is D again (as torch's dropout, to any order)."""
    return dropout_backward_op(ddx, ctx.saved_tensors[0], ctx.p), None, None


dropout_op.register_autograd(_dropout_backward, setup_context=_dropout_setup)
dropout_backward_op.register_autograd(_dropout_second_order, setup_context=_dropout_backward_setup)
_no_vmap(dropout_op)
_no_vmap(dropout_backward_op)


@torch.library.custom_op("actpatch::relu_squared", mutates_args=())
def relu_squared_op(x: torch.Tensor) -> torch.Tensor:
    return relu_squared_forward(x)


@relu_squared_op.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("actpatch::relu_squared_backward", mutates_args=())
def relu_squared_backward_op(dy: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return relu_squared_backward(dy, y)


@relu_squared_backward_op.register_fake
def _(dy, y):
    return torch.empty_like(dy)


def _relu_squared_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _relu_squared_backward(ctx, dy):
    return relu_squared_backward_op(dy, ctx.saved_tensors[0])


relu_squared_op.register_autograd(_relu_squared_backward, setup_context=_relu_squared_setup)
relu_squared_backward_op.register_autograd(_no_second_order, setup_context=lambda ctx, inputs, output: None)
_no_vmap(relu_squared_op)
_no_vmap(relu_squared_backward_op)
