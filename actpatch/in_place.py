"""Behaviour installed in a module itself: it keeps its parameters, children, hooks and path, and its class
becomes a subclass of the same name whose entry method runs a *plan*::

    install(module, plan)     module.__class__ = patched_class(type(module), plan)
                              module._actpatch_plan = plan     (a frozen dataclass of names, no tensors)
    uninstall(module)         the class and any hooked method back as they were

The subclass's entry (``forward``, or the ``_apply_gate`` of transformers' MoE experts) calls ``plan(self,
*args)``; a plan with ``methods(base)`` (:mod:`actpatch.rebind`) gives instead the methods themselves,
copies of the base's. Without a plan in the instance, each is the original method. Behaviour lives in the
class and the plan in the instance, so it follows the instance that is called: ``copy.copy``, ``deepcopy``
and ``nn.DataParallel`` replicas (a new object of the same class with a copy of ``__dict__``) run their own
children and weights. Pickled (``torch.save(model)``), a patched module is written as its original class
plus a call that swaps the subclass back in on load, with the plan in its state: loading needs actpatch
importable and gives the patched module back.

Under accelerate's hooks (``device_map``, offloading) the instance ``forward`` is the hook, which calls the
instance's ``_old_forward``: that one is pointed at the patched method, and restored on uninstall (also when
the hooks came after patching and took the patched method for the original).  Any other instance ``forward``
(Liger-Kernel's ``apply_liger_kernel_to_*(model=...)`` binds its own) would shadow the plan: it is moved aside
on install and put back on uninstall.
"""

from __future__ import annotations

import types
from typing import Any, Protocol

from torch import nn

PLAN = "_actpatch_plan"
_REPLACED = "_actpatch_replaced"  # a hooked module's ``_old_forward`` before patching
_SHADOWING = "_actpatch_instance_forward"  # an instance ``forward`` (not a hook) set aside while patched
_CLASSES: dict[tuple[type, object], type] = {}


class Plan(Protocol):
    entry: str

    def __call__(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any: ...


def _spec(plan: Plan) -> object:
    """What the patched class depends on: the entry, or the plan itself when it gives the methods."""
    return plan if hasattr(plan, "methods") else plan.entry


def patched_class(base: type, spec: object) -> type:
    """The subclass of ``base`` (same name and module) whose ``entry`` runs the instance's plan (``spec``:
    the entry's name), or whose methods are the plan's (``spec``: the plan); cached."""
    key = (base, spec)
    if key in _CLASSES:
        return _CLASSES[key]
    if isinstance(spec, str):
        namespace = {spec: _running_plan(spec, getattr(base, spec))}
    else:
        namespace = {
            name: f if isinstance(f, property) else _guarded(name, f, getattr(base, name))
            for name, f in spec.methods(base).items()
        }

    def __reduce_ex__(self: nn.Module, protocol: int) -> tuple:
        reduced = object.__reduce_ex__(self, max(protocol, 2))  # (copyreg.__newobj__, (cls,), state, ...)
        if type(self) is not cls:  # a subclass made after patching (FSDP2): its own business
            return reduced
        return (_rebuild, (base, spec), *reduced[2:])

    namespace |= {"__reduce_ex__": __reduce_ex__, "__module__": base.__module__}
    cls = type(base.__name__, (base,), namespace | {"__qualname__": base.__qualname__})
    _CLASSES[key] = cls
    return cls


def _running_plan(name: str, original: Any) -> Any:
    """The entry method: the instance's plan, or ``original`` without one (an FSDP2 subclass made after
    patching keeps the patched class when unpatched)."""

    def method(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        plan = getattr(self, PLAN, None)
        return original(self, *args, **kwargs) if plan is None else plan(self, *args, **kwargs)

    method.__name__, method.__qualname__ = name, getattr(original, "__qualname__", name)
    return method


def _guarded(name: str, patched: Any, original: Any) -> Any:
    """``patched`` where the instance holds a plan, else ``original`` (as for the entry method)."""

    def method(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        run = original if getattr(self, PLAN, None) is None else patched
        return run(self, *args, **kwargs)

    method.__name__, method.__qualname__ = name, getattr(original, "__qualname__", name)
    return method


def _rebuild(base: type, spec: object) -> nn.Module:
    """An empty instance of ``patched_class(base, spec)``, for unpickling (its state follows)."""
    cls = patched_class(base, spec)
    return cls.__new__(cls)


def is_patched(module: nn.Module) -> bool:
    return PLAN in module.__dict__


def plan_of(module: nn.Module) -> Plan | None:
    return module.__dict__.get(PLAN)


def install(module: nn.Module, plan: Plan) -> None:
    """Run ``plan`` as ``module``'s ``plan.entry`` from now on; nothing to do when it runs that plan already
    (one module reached through two parents is a site in each)."""
    if is_patched(module):
        if plan_of(module) == plan:
            _set_aside_instance_forward(module, plan.entry)
            return
        raise RuntimeError(f"actpatch: this {type(module).__name__} is patched already, with another plan")
    base = type(module)
    cls = patched_class(base, _spec(plan))
    module.__dict__[PLAN] = plan
    module.__class__ = cls
    if _hooked(module, plan.entry):
        module.__dict__[_REPLACED] = module.__dict__["_old_forward"]
        module.__dict__["_old_forward"] = types.MethodType(cls.forward, module)
    _set_aside_instance_forward(module, plan.entry)


def _set_aside_instance_forward(module: nn.Module, entry: str) -> None:
    """Move an instance ``forward`` that is not accelerate's hook out of the plan's way (kept for uninstall;
    one set again over a patched module, as Liger's instance patch does, replaces it)."""
    if entry == "forward" and "forward" in module.__dict__ and "_hf_hook" not in module.__dict__:
        module.__dict__[_SHADOWING] = module.__dict__.pop("forward")


def uninstall(module: nn.Module) -> None:
    """Put ``module``'s class and methods back as they were before :func:`install`."""
    plan = module.__dict__.pop(PLAN)
    spec = _spec(plan)
    base = next(c.__base__ for c in type(module).__mro__ if _CLASSES.get((c.__base__, spec)) is c)
    patched = _CLASSES[(base, spec)]
    if type(module) is patched:  # a subclass made after patching (FSDP2) stays, running the original
        module.__class__ = base
    if _SHADOWING in module.__dict__:
        module.__dict__.setdefault("forward", module.__dict__.pop(_SHADOWING))
    if _REPLACED in module.__dict__:
        module.__dict__["_old_forward"] = module.__dict__.pop(_REPLACED)
    elif _hooked(module, plan.entry) and getattr(module._old_forward, "__func__", None) is patched.forward:
        module.__dict__["_old_forward"] = types.MethodType(base.forward, module)  # hooks added after patching


def _hooked(module: nn.Module, entry: str) -> bool:
    return entry == "forward" and "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__
