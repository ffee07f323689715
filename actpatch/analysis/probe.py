"""One training-mode forward under observation: what autograd saves, and what each activation call does.

These observers run together:

- global module forward hooks keep the stack of running modules, and open a :class:`Call` for every
  call of a candidate module (a leaf without parameters or buffers, registered or not) and of the
  modules the walker watches, RMSNorm-shaped ones and dropouts (``ProbeResult.watched_calls``);
- a ``TorchFunctionMode`` names the op running, opens a :class:`Call` for functional activations
  (``F.gelu``...), and records which ops take an activation's output (its consumers);
- both record, per module, an :class:`Event` for each child called and each op run directly in its
  forward, with the storages it took and gave (what ``gated.match`` reads the structure of an MLP from),
  leaving out a ``.to(device)`` or ``.contiguous()`` that returned its input itself (accelerate's hooks
  move every module's inputs to its device), and marking a child that returned its input and always will
  (``nn.Identity``, ``nn.Dropout`` with p = 0: timm's ``drop1``, ``norm``, ``drop2``);
- the ``_apply_gate`` methods of the modules the walker names (transformers' MoE experts compute
  act(gate) * up there) are wrapped for the probe, recording which of the module's events ran inside
  (``ProbeResult.gate_calls``);
- ``saved_tensors_hooks`` record every tensor autograd packs, with the module and op saving it and the
  calls open at that moment (those calls' own backward saves it).

Tensors are matched by storage identity (``untyped_storage()._cdata``, the StorageImpl address), which
also holds on the meta device where every ``data_ptr`` is 0.  Every saved tensor, activation output and
tensor an event names is kept alive until the probe ends, so no address is reused while it is compared;
autograd itself is given nothing to keep (the pack hook returns None), so the probe's graph dies with its
output.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .memory import Bytes
from .sites import functional_activation, is_candidate

# Ops that only read metadata: not consumers of a tensor.
_METADATA_OPS = frozenset(
    {"__get__", "size", "dim", "numel", "stride", "is_contiguous", "data_ptr", "untyped_storage"}
    | {"element_size", "is_floating_point", "__len__", "__format__", "__repr__", "get_device", "__bool__"}
    | {"storage_offset"}
)
# Data-dependent Python control flow on meta tensors ("if (mask == 0).all():") gets these answers.
_DATA_DEPENDENT = {"__bool__": False, "item": 0}
_LAYOUT_OPS = frozenset({"to", "contiguous"})  # no event when they return their input (no dtype given)
_INPLACE_DUNDERS = frozenset({"__iadd__", "__isub__", "__imul__", "__itruediv__", "__setitem__"})


def storage_key(t: torch.Tensor) -> int:
    """Identity of ``t``'s storage, valid on every device including meta."""
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # tensors without storage (subclasses, sparse)
        return id(t)


def storage_nbytes(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


@dataclass
class SavedTensor:
    """A tensor autograd saved for backward."""

    storage: int
    nbytes: int
    scalable: bool  # floating point in the model's dtype: scaled to the projection dtype
    where: str  # "<module path> (<op>)"
    inside: frozenset[int]  # ids of the activation calls open when it was saved (their own saves)
    shape: tuple[int, ...] = ()
    dtype: torch.dtype | None = None
    of_parameter: bool = False  # a parameter's copy made with autograd (autocast's cast of a weight)


@dataclass(eq=False)
class Call:
    """One call of a candidate activation: a module (registered or not) or a functional op."""

    site: str
    kind: str  # "module" | "unregistered" | "functional"
    module: nn.Module | None
    activation: str | None  # known for functional calls; modules are classified afterwards
    input_storage: int | None
    output_storage: int = 0
    numel: int = 0
    dtype: torch.dtype | None = None
    requires_grad: bool = False
    foreign_hooks: bool = False  # ran under other saved-tensor hooks (a checkpointed block)
    inplace: str | None = None  # op that modified its output in place
    consumers: list[str] = field(default_factory=list)
    version: int = 0
    parents: frozenset[int] = frozenset()  # ids of the calls open when this one started
    input_nbytes: int = 0  # its input's storage (norm calls)
    input_scalable: bool = False  # and whether that is in the model's dtype
    input_id: int = 0  # the input tensor object (watched calls; alive while the probe runs)
    input_shape: tuple[int, ...] = ()
    input_dtype: torch.dtype | None = None
    function: Any = None  # the function a functional call ran (``F.gelu``)


def _moves_nothing(name: str, args: tuple, kwargs: dict) -> bool:
    """An op that moves or lays out its input and was given no dtype (nor a tensor to take one from):
    when it returns the input itself, nothing ran, in whatever dtype the model runs."""
    given = (*args[1:], *kwargs.values())
    return name in _LAYOUT_OPS and not any(isinstance(a, (torch.dtype, torch.Tensor)) for a in given)


@dataclass
class Event:
    """A module called or an op run directly in a module's forward (not inside a child)."""

    what: str  # the child's module path, or the op's name
    module: bool
    inputs: tuple[int, ...]  # storages of its tensor arguments
    offsets: tuple[int, ...] = ()  # and their storage offsets (which view of a storage)
    output: int | None = None  # storage of its output, when a tensor
    constants: tuple = ()  # an op's non-tensor arguments: positional, then sorted keyword items
    identity: bool = False  # a child that returned its one input and always will (``stays_identity``)


@dataclass
class GateCall:
    """One call of a module's ``_apply_gate``: the span of the module's events it ran, its storages."""

    path: str
    start: int
    end: int
    input: int
    output: int | None


@dataclass
class ProbeResult:
    saved: list[SavedTensor]
    calls: list[Call]
    excluded_storages: set[int]  # parameters and buffers
    events: dict[str, list[Event]] = field(default_factory=dict)  # module path -> what ran directly in it
    watched_calls: list[Call] = field(default_factory=list)  # calls of the modules given as watched
    gate_calls: list[GateCall] = field(default_factory=list)  # calls of the gate_modules' _apply_gate

    def total(self) -> Bytes:
        """Bytes of every tensor saved (each storage once; parameters and buffers left out)."""
        seen: set[int] = set()
        total = Bytes()
        for s in self.saved:
            if s.storage in seen or s.storage in self.excluded_storages:
                continue
            seen.add(s.storage)
            total += Bytes(s.nbytes, 0.0) if s.scalable else Bytes(0.0, s.nbytes)
        return total

    def freed_by(self, call: Call, skip: frozenset[int] = frozenset()) -> Bytes:
        """Bytes of the tensors ``call``'s own ops saved that nothing outside it keeps (each storage once;
        those in ``skip``, parameters and buffers left out): what replacing the call frees."""
        outside = {s.storage for s in self.saved if id(call) not in s.inside}
        freed, seen = Bytes(), set(skip)
        for s in self.saved:
            if id(call) not in s.inside or s.storage in seen or s.storage in self.excluded_storages:
                continue
            seen.add(s.storage)
            if s.storage not in outside:
                freed += Bytes(s.nbytes, 0.0) if s.scalable else Bytes(0.0, s.nbytes)
        return freed


@dataclass
class _Frame:
    path: str
    call: Call | None
    event: Event
    module: int = 0  # id of the module running; 0 for an unregistered one


class _Probe(TorchFunctionMode):
    def __init__(self, model: nn.Module, dtype: torch.dtype, watched: frozenset[int]) -> None:
        super().__init__()
        self.model_dtype = dtype
        self.watched = watched
        self.watched_calls: list[Call] = []
        self.watched_inputs: list[tuple[Call, torch.Tensor, int]] = []  # (call, x, x._version at the call)
        self.paths = {id(m): name for name, m in model.named_modules()}
        self.children = {(id(p), id(c)): name for p in model.modules() for name, c in p.named_children()}
        self.stack: list[_Frame] = []
        self.ops: list[str] = []
        self.open: list[Call] = []
        self.calls: list[Call] = []
        self.saved: list[SavedTensor] = []
        self.outputs: dict[int, Call] = {}
        self.keep: list[torch.Tensor] = []
        self.events: dict[str, list[Event]] = defaultdict(list)
        self.gate_calls: list[GateCall] = []
        self.pack = self._pack  # one bound-method object, compared by identity below

    # -- module hooks -------------------------------------------------------------------------------
    def _path(self, module: nn.Module) -> str | None:
        """The module's path as its caller reaches it: the caller's path and the attribute naming it there
        (a module shared by several parents, torchtune's default ``nn.SiLU()`` argument, has a path in
        each), else its first path in the model (None: not registered)."""
        top = self.stack[-1] if self.stack else None
        name = self.children.get((top.module, id(module))) if top else None
        if name is None:
            return self.paths.get(id(module))
        return f"{top.path}.{name}" if top.path else name

    def pre_hook(self, module: nn.Module, args: tuple) -> None:
        caller = self.stack[-1].path if self.stack else ""
        path = self._path(module)
        kind = "module"
        if path is None:  # one site per class of object the caller calls (each call one Call)
            kind, path = "unregistered", f"{caller}:{type(module).__name__}"
        call = None
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.is_floating_point() and is_candidate(module):
            call = Call(site=path, kind=kind, module=module, activation=None, input_storage=storage_key(x))
            self._open(call)
        elif isinstance(x, torch.Tensor) and x.is_floating_point() and id(module) in self.watched:
            call = Call(path, kind, module, None, storage_key(x), input_nbytes=storage_nbytes(x))
            call.input_id, call.input_shape, call.input_dtype = id(x), tuple(x.shape), x.dtype
            call.input_scalable = x.dtype == self.model_dtype
            self.watched_inputs.append((call, x, x._version))
            self._open(call)
        event = _event(path, True, args, {})
        self.keep.extend(_tensors(args, {}))
        self.events[caller].append(event)
        self.stack.append(_Frame(path, call, event, id(module) if kind == "module" else 0))

    def post_hook(self, module: nn.Module, args: tuple, output: Any) -> None:
        frame = self.stack.pop()
        if isinstance(output, torch.Tensor):
            frame.event.output = storage_key(output)
            frame.event.identity = frame.event.inputs == (frame.event.output,) and stays_identity(module)
            self.keep.append(output)
        if frame.call is not None:
            self._close(frame.call, output)

    def _open(self, call: Call) -> None:
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        call.foreign_hooks = top is None or top[0] is not self.pack
        call.parents = frozenset(id(c) for c in self.open)
        self.open.append(call)

    def _close(self, call: Call, output: Any) -> None:
        self.open.remove(call)
        if not isinstance(output, torch.Tensor):
            return
        call.output_storage = storage_key(output)
        call.numel, call.dtype = output.numel(), output.dtype
        call.requires_grad = output.requires_grad
        call.version = output._version
        if call in (c for c, _, _ in self.watched_inputs):
            self.watched_calls.append(call)
            return
        self.keep.append(output)
        self.outputs[call.output_storage] = call
        self.calls.append(call)

    def wrap_apply_gate(self, module: nn.Module) -> Any:
        """An instance ``_apply_gate`` for ``module`` recording a GateCall around the original."""
        original = module._apply_gate
        path = self.paths[id(module)]

        def observed(gate_up: torch.Tensor) -> Any:
            start = len(self.events[path])
            out = original(gate_up)
            output = storage_key(out) if isinstance(out, torch.Tensor) else None
            self.gate_calls.append(
                GateCall(path, start, len(self.events[path]), storage_key(gate_up), output)
            )
            return out

        return observed

    # -- ops ----------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in _DATA_DEPENDENT and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return _DATA_DEPENDENT[name]  # a meta tensor has no value: take the common training branch
        if name == "scaled_dot_product_attention" and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            func = fused_sdpa
        if name == "dropout" and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            func = fused_dropout
        here = self.stack[-1].path if self.stack else ""
        event = None
        if name not in _METADATA_OPS:
            self._note_consumers(name, here, args, kwargs)
            event = _event(name, False, args, kwargs)
            self.keep.extend(_tensors(args, kwargs))
            self.events[here].append(event)
        call = None
        activation = functional_activation(name, kwargs)
        x = args[0] if args else kwargs.get("input")
        if activation is not None and isinstance(x, torch.Tensor):
            call = Call(f"{here}:{name}", "functional", None, activation, storage_key(x), function=func)
            self._open(call)
        self.ops.append(name)
        try:
            out = func(*args, **kwargs)
        finally:
            self.ops.pop()
        if event is not None and isinstance(out, torch.Tensor):
            if out is x and _moves_nothing(name, args, kwargs):
                self.events[here].pop()
            else:
                event.output = storage_key(out)
                self.keep.append(out)
        if call is not None:
            self._close(call, out)
        return out

    def _note_consumers(self, name: str, here: str, args: tuple, kwargs: dict) -> None:
        if not self.outputs:
            return
        for i, t in enumerate(_tensors(args, kwargs)):
            call = self.outputs.get(storage_key(t))
            if call is None or call in self.open:
                continue
            op = name.strip("_")
            call.consumers.append(f"{here} ({op})")
            if i == 0 and (name in _INPLACE_DUNDERS or (name.endswith("_") and not name.startswith("_"))):
                call.inplace = call.inplace or op

    # -- saved tensors ------------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        here = self.stack[-1].path if self.stack else ""
        op = self.ops[-1].strip("_") if self.ops else "?"
        scalable = t.is_floating_point() and t.dtype == self.model_dtype
        inside = frozenset(id(c) for c in self.open)
        saved = SavedTensor(storage_key(t), storage_nbytes(t), scalable, f"{here} ({op})", inside)
        saved.shape, saved.dtype, saved.of_parameter = tuple(t.shape), t.dtype, _parameter_copy(t)
        self.saved.append(saved)
        self.keep.append(t)  # alive until finish(): no storage is reused (and re-keyed) mid-probe
        # Nothing for the graph to hold: a node saving its own output through a hook that returns the
        # tensor forms a cycle the garbage collector cannot see, which kept the whole probe graph (every
        # parameter and activation) alive after the probe.
        return None

    def finish(self) -> None:
        for t in self.keep:
            call = self.outputs.get(storage_key(t))
            if call is not None and t._version != call.version:
                call.inplace = call.inplace or "in-place op"
        for call, x, version in self.watched_inputs:
            if x._version != version:  # a norm's replacement keeps x: an in-place change would break backward
                call.inplace = call.inplace or "input modified in place"
        self.watched_inputs.clear()
        self.keep.clear()
        self.outputs.clear()


def _parameter_copy(t: torch.Tensor) -> bool:
    """Whether ``t`` was made from a parameter by a chain of one-input ops with autograd (autocast's cast of a
    weight, or a transposed view of it)."""
    fn = t.grad_fn
    for _ in range(3):
        if fn is None or len(fn.next_functions) != 1:
            return False
        fn = fn.next_functions[0][0]
        if type(fn).__name__ == "AccumulateGrad":
            return isinstance(fn.variable, nn.Parameter)
    return False


def stays_identity(module: nn.Module) -> bool:
    """``nn.Identity``, or ``nn.Dropout`` with p = 0 (their own forwards): the identity in training too."""
    if isinstance(module, nn.Dropout):
        return type(module).forward is nn.Dropout.forward and module.p == 0
    return isinstance(module, nn.Identity) and type(module).forward is nn.Identity.forward


def _event(what: str, module: bool, args: tuple, kwargs: dict) -> Event:
    tensors = list(_tensors(args, kwargs))
    constants: tuple = ()
    if not module:
        scalar = int | float | str | bool
        constants = (
            *(a for a in args if isinstance(a, scalar)),
            *sorted((k, v) for k, v in kwargs.items() if isinstance(v, scalar)),
        )
    offsets = tuple(_storage_offset(t) for t in tensors)
    return Event(what, module, tuple(storage_key(t) for t in tensors), offsets, constants=constants)


def _storage_offset(t: torch.Tensor) -> int:
    try:
        return t.storage_offset()
    except (RuntimeError, NotImplementedError):  # tensors without storage (subclasses, sparse)
        return 0


def _tensors(args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, list | tuple):
            yield from (t for t in a if isinstance(t, torch.Tensor))


def fused_sdpa(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """SDPA through the memory-efficient kernel, for meta tensors.

    On meta, ``F.scaled_dot_product_attention`` falls back to the math path, which keeps the
    [batch, heads, seq, seq] attention probabilities; a GPU training run uses a fused kernel that keeps
    only q, k, v, the output and the log-sum-exp.  Dry runs assume the fused kernel.  With ``enable_gqa``
    (fewer k/v heads than q heads) the GPU keeps k and v as given, not repeated to q's heads
    (:class:`_GroupedAttention`).
    """
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        return _GroupedAttention.apply(query, key, value, attn_mask, dropout_p, is_causal, scale)
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, True, dropout_p, is_causal, scale=scale
    )
    return out[0]


class _GroupedAttention(torch.autograd.Function):
    """Grouped-query attention on meta tensors, keeping what the efficient kernel keeps with k and v as
    given: the efficient kernel runs on k and v repeated to q's heads, autograd keeps q, k, v, the output,
    the log-sum-exp and the philox state (a probe never runs the backward)."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale):
        groups = query.shape[-3] // key.shape[-3]
        k, v = key.repeat_interleave(groups, -3), value.repeat_interleave(groups, -3)
        out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, k, v, attn_mask, True, dropout_p, is_causal, scale=scale
        )
        mask = (attn_mask,) if isinstance(attn_mask, torch.Tensor) else ()
        ctx.save_for_backward(query, key, value, out, lse, seed, offset, *mask)
        return out

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("actpatch's probe forward keeps no tensors for backward; do not backpropagate it")


def fused_dropout(input, p=0.5, training=True, inplace=False):
    """``F.dropout`` through torch's fused kernel, for meta tensors.

    On meta (as on CPU) dropout multiplies by a noise tensor of x's dtype, which autograd keeps; a GPU run
    uses ``native_dropout``, which keeps a bool mask (1 byte an element).  Dry runs assume the GPU's."""
    if training and 0.0 < p < 1.0 and not inplace and input.numel():
        return torch.native_dropout(input, p, True)[0]
    return F.dropout(input, p, training, inplace)


@contextlib.contextmanager
def training_mode(model: nn.Module) -> Iterator[None]:
    """Every module in training mode (set directly: no train() overrides run), restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    for m, _ in modes:
        m.training = True
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def run_probe(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    dtype: torch.dtype,
    watched: frozenset[int] = frozenset(),
    gate_modules: frozenset[int] = frozenset(),
) -> ProbeResult:
    """Run ``model(*args, **kwargs)`` once in training mode with grad on and observe it; calls of the
    modules whose ids are in ``watched`` are recorded in ``watched_calls``, calls of the ``_apply_gate``
    of those in ``gate_modules`` in ``gate_calls``.

    The global RNG state is restored afterwards, so a probe leaves dropout streams unchanged.  Modules
    compiled in place (``module.compile()``) run eagerly here: the probe observes eager autograd.
    """
    probe = _Probe(model, dtype, watched)
    excluded = {storage_key(t) for t in (*model.parameters(), *model.buffers())}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    pre = torch.nn.modules.module.register_module_forward_pre_hook(probe.pre_hook)
    post = torch.nn.modules.module.register_module_forward_hook(probe.post_hook, always_call=True)
    gated = [m for m in model.modules() if id(m) in gate_modules]
    try:
        for m in gated:  # an instance attribute over the class's method, deleted afterwards
            m._apply_gate = probe.wrap_apply_gate(m)
        with (
            torch.random.fork_rng(devices=devices),
            training_mode(model),
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(probe.pack, _unpack),
            _eager(),
            probe,
        ):
            out = model(*args, **kwargs)
        probe.finish()
        del out
    finally:
        for m in gated:
            del m._apply_gate
        pre.remove()
        post.remove()
        _reshard(model)
    return ProbeResult(
        probe.saved, probe.calls, excluded, probe.events, probe.watched_calls, probe.gate_calls
    )


def _eager() -> contextlib.AbstractContextManager:
    """torch.compile's directives ignored while the probe runs (torch >= 2.6; before, nothing changes)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance else contextlib.nullcontext()


def _reshard(model: nn.Module) -> None:
    """FSDP2 leaves the root's parameters unsharded after a forward, for the backward that follows;
    after a probe none does, so shard them again (else they stay allocated, unsharded, until training)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6: no public FSDP2
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _unpack(_: None) -> torch.Tensor:
    raise RuntimeError("actpatch's probe forward keeps no tensors for backward; do not backpropagate it")
