"""Activations a module's own methods call by name, rebound to actpatch's for that module alone.

A method reaches an activation function through a global name: ``F.gelu(x)``, ``torch.nn.functional.silu(x)``,
``nn.functional.gelu(x)``, ``gelu(x)`` (imported, or a module-level activation object such as RoBERTa's
``gelu``), or through an instance attribute holding the function (``nn.TransformerEncoderLayer``'s
``self.activation``).  A *target* is such an object, named by ``"module:attribute"`` (``"torch._C._nn:gelu"``
for ``F.gelu``); its *stand-in* is actpatch's op with the same signature (:data:`STAND_INS`), or, for an
activation module, the inverted module computing its formula.  Installing a :class:`Rebinding` gives the
module a same-name subclass (:mod:`actpatch.in_place`) in which

    every function of its class (up to nn.Module) whose code reaches a target through a global name g is a
    copy whose code reads g' instead (``co_names`` renamed: nothing else changes), g' being a new global of
    the module defining the function, bound to the stand-in, or to a copy of the namespace g (F, torch, nn)
    with the target replaced; a decorated function is copied with the copy in its closure;
    an instance attribute holding a target is a property reading the stand-in while the module is patched

and uninstalling gives the class back.  The copies run in the defining module's own globals dict, so any
later change there (Liger-Kernel replacing a function) still reaches them; at run time nothing is added but
the stand-in itself and one Python frame per patched method.  :func:`reason` says whether a site can be
rebound: the calls the probe saw must be those the module's methods make by these names.
"""

from __future__ import annotations

import builtins
import dis
import functools
import importlib
import inspect
import types
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from . import functional, in_place


def _gelu(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return functional.gelu(input, approximate)


def _silu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    return F.silu(input, inplace=True) if inplace else functional.silu(input)


STAND_INS: dict[Callable, Callable] = {F.gelu: _gelu, F.silu: _silu}  # torch's function -> actpatch's
MODULE_STAND_INS: dict[str, Callable[[object], nn.Module]] = {}  # activation -> its inverted module, given
# the formula it must keep (None: torch's op); filled by the activation kind
_LOADS = frozenset({"LOAD_ATTR", "LOAD_METHOD"})


@dataclass(frozen=True)
class Rebinding:
    """A module's plan: the targets (``"module:attribute"``) its methods' calls are rebound from, each with
    the activation its stand-in computes and whether the stand-in keeps the target's own formula, and the
    instance attributes holding a target (name, target)."""

    entry: ClassVar[str] = "forward"
    targets: tuple[tuple[str, str, bool], ...]
    attributes: tuple[tuple[str, str], ...] = ()

    def methods(self, base: type) -> dict[str, object]:
        """The copies of ``base``'s functions that reach a target, reading its stand-in instead, and a
        property for each attribute, reading the stand-in while it holds the target."""
        stand_ins = {t[0]: stand_in(*t) for t in self.targets}
        attributes = {name: _reading(name, resolve(ref), stand_ins[ref]) for name, ref in self.attributes}
        return _copies(base, self.targets) | attributes

    def merged(self, other: Rebinding) -> Rebinding:
        return Rebinding(
            tuple(sorted(set(self.targets) | set(other.targets))),
            tuple(sorted(set(self.attributes) | set(other.attributes))),
        )


def plan(module: nn.Module, obj: object, activation: str, by_formula: bool) -> Rebinding:
    """The plan rebinding ``module``'s calls of ``obj`` (a target: :func:`reason` is None)."""
    ref = target_of(obj, module)
    attributes = tuple((name, ref) for name, value in vars(module).items() if value is obj)
    return Rebinding(((ref, activation, by_formula),), attributes)


def _reading(name: str, target: object, stand: Callable) -> property:
    """The instance attribute ``name``, read as ``stand`` while it holds ``target`` in a patched module."""

    def get(self: nn.Module) -> object:
        value = self.__dict__[name]
        return stand if value is target and in_place.PLAN in self.__dict__ else value

    def set_(self: nn.Module, value: object) -> None:
        self.__dict__[name] = value

    return property(get, set_)


def target_of(obj: object, module: nn.Module) -> str | None:
    """The name of ``obj`` as a target (None when nothing names it): torch's function, or a global of the
    module defining one of ``module``'s methods."""
    if obj in STAND_INS:
        return f"{obj.__module__}:{obj.__name__}"
    for function in (f for _, top in _functions(type(module)) for f in _layers(top)):
        for name, value in function.__globals__.items():
            if value is obj and not name.startswith("_actpatch"):
                return f"{function.__module__}:{name}"
    return None


def reason(module: nn.Module, obj: object) -> str | None:
    """Why ``module``'s calls of ``obj`` cannot be rebound (None: they can)."""
    if target_of(obj, module) is None:
        return "not bound to a global name (made at each call?): cannot be rebound"
    layers = [f for _, top in _functions(type(module)) for f in _layers(top)]
    found = [(f, name) for f in layers for name, _ in _chains_to(f, obj)]
    if not found and not any(v is obj for v in vars(module).values()):
        return "called outside the module's own methods (by a function they call)"
    for function, name in found:
        if not _renamable(function, name):
            return f"{function.__qualname__} also reads an attribute named {name!r}: cannot be rebound"
    return None


def install(module: nn.Module, rebinding: Rebinding) -> None:
    """Rebind ``module``'s calls of the plan's targets (joined with those it rebinds already)."""
    current = in_place.plan_of(module)
    if isinstance(current, Rebinding):
        if current.merged(rebinding) == current:
            return
        in_place.uninstall(module)
        rebinding = current.merged(rebinding)
    in_place.install(module, rebinding)


@functools.cache
def stand_in(target: str, activation: str, by_formula: bool) -> Callable:
    """What replaces ``target``: actpatch's function for torch's, else the inverted activation module
    (:data:`MODULE_STAND_INS`, computing the target's own output when ``by_formula``)."""
    obj = resolve(target)
    if obj in STAND_INS:
        return STAND_INS[obj]
    return MODULE_STAND_INS[activation](obj if by_formula else None)


def resolve(target: str) -> object:
    """The object ``"module:attribute"`` names."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _functions(cls: type) -> Iterator[tuple[str, types.FunctionType]]:
    """The plain functions of ``cls`` as its instances see them (by attribute name), defined below
    nn.Module."""
    seen: set[str] = set()
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        for name in vars(klass):
            if name in seen:
                continue
            seen.add(name)
            value = inspect.getattr_static(cls, name)
            if isinstance(value, types.FunctionType):
                yield name, value


def _layers(function: types.FunctionType) -> Iterator[types.FunctionType]:
    """``function`` and the functions it decorates (``__wrapped__``)."""
    while isinstance(function, types.FunctionType):
        yield function
        function = getattr(function, "__wrapped__", None)


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _chains(function: types.FunctionType) -> Iterator[tuple[str, tuple[str, ...], object]]:
    """(global name, attribute chain, what the chain reaches) for each global read in ``function``, its
    attribute chain followed through modules as far as the code reads it."""
    for code in _codes(function.__code__):
        instructions = list(dis.get_instructions(code))
        for i, ins in enumerate(instructions):
            if ins.opname != "LOAD_GLOBAL":
                continue
            name = ins.argval
            obj = function.__globals__.get(name, getattr(builtins, name, None))
            chain: list[str] = []
            yield name, (), obj
            for nxt in instructions[i + 1 :]:
                if nxt.opname not in _LOADS or not isinstance(obj, types.ModuleType):
                    break
                chain.append(nxt.argval)
                obj = getattr(obj, nxt.argval, None)
                yield name, tuple(chain), obj


def _chains_to(function: types.FunctionType, obj: object) -> Iterator[tuple[str, tuple[str, ...]]]:
    for name, chain, reached in _chains(function):
        if reached is obj:
            yield name, chain


@functools.cache
def _copies(base: type, targets: tuple[tuple[str, str, bool], ...]) -> dict[str, types.FunctionType]:
    replaced = {id(resolve(t[0])): stand_in(*t) for t in targets}
    copies = {name: _rebound(f, replaced) for name, f in _functions(base)}
    return {name: f for name, f in copies.items() if f is not None}


def _rebound(function: types.FunctionType, replaced: dict[int, Callable]) -> types.FunctionType | None:
    """A copy of ``function`` reading the stand-ins, or None when it reaches no target.  A decorated
    function (``__wrapped__``, the original in its closure) is copied with a closure holding the copy."""
    inner = getattr(function, "__wrapped__", None)
    inner_copy = _rebound(inner, replaced) if isinstance(inner, types.FunctionType) else None
    renames: dict[str, set] = {}
    for name, chain, obj in _reaching(function, replaced):
        renames.setdefault(name, set()).add((chain, id(obj)))
    closure = function.__closure__
    if inner_copy is not None:
        closure = tuple(types.CellType(inner_copy) if _holds(c, inner) else c for c in closure or ())
    if not renames and closure == function.__closure__:
        return None
    new_names = {}
    for name, chains in renames.items():
        value = function.__globals__.get(name, getattr(builtins, name, None))
        key = f"_actpatch_{name}_{zlib.crc32(repr(sorted(chains)).encode()):08x}"
        function.__globals__.setdefault(key, _standing_in(value, sorted(chains), replaced))
        new_names[name] = key
    copy = _renamed(function, new_names, closure)
    if inner_copy is not None:
        copy.__wrapped__ = inner_copy
    return copy


def _holds(cell: types.CellType, obj: object) -> bool:
    try:
        return cell.cell_contents is obj
    except ValueError:  # an empty cell
        return False


def _reaching(function: types.FunctionType, replaced: dict[int, Callable]) -> Iterator[tuple]:
    for name, chain, obj in _chains(function):
        if id(obj) in replaced:
            yield name, chain, obj


def _standing_in(value: object, chains: list[tuple[tuple[str, ...], int]], replaced: dict) -> object:
    """``value`` with the object at the end of each chain replaced by its stand-in: copies of the modules
    on the way (every other attribute the same object)."""
    if any(not chain for chain, _ in chains):
        return replaced[id(value)]
    copy = types.ModuleType(value.__name__, value.__doc__)
    copy.__dict__.update(vars(value))
    heads: dict[str, list] = {}
    for chain, obj in chains:
        heads.setdefault(chain[0], []).append((chain[1:], obj))
    for attr, rest in heads.items():
        setattr(copy, attr, _standing_in(getattr(value, attr), rest, replaced))
    return copy


def _renamed(
    function: types.FunctionType, names: dict[str, str], closure: tuple | None
) -> types.FunctionType:
    """``function`` reading the globals ``names`` maps from under their new names (nested code too), with
    ``closure``."""

    def rename(code: types.CodeType) -> types.CodeType:
        consts = tuple(rename(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
        co_names = tuple(names.get(n, n) for n in code.co_names)
        return code.replace(co_names=co_names, co_consts=consts)

    copy = types.FunctionType(
        rename(function.__code__),
        function.__globals__,
        function.__name__,
        function.__defaults__,
        closure,
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__, copy.__module__, copy.__doc__ = (
        function.__qualname__,
        function.__module__,
        function.__doc__,
    )
    copy.__dict__.update(function.__dict__)
    return copy


def _renamable(function: types.FunctionType, name: str) -> bool:
    """Whether every use of ``name`` in ``function``'s code (nested code too) reads the global."""
    return all(
        ins.opname == "LOAD_GLOBAL"
        for code in _codes(function.__code__)
        for ins in dis.get_instructions(code)
        if ins.argval == name and ins.opcode in dis.hasname
    )
