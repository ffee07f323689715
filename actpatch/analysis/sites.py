"""Which modules are activations, and which: decided by evidence (the module's output on a test input).

Any leaf module without parameters or buffers is a candidate.  :func:`classify_module` runs it on a
float64 test vector under ``no_grad`` and compares the result with known formulas; the class name is used
only to keep an activation that matches no known formula (reported as unsupported) and to drop the
rest (dropout, identity, parameter-free norms...).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..activations import ACTIVATIONS
from ..kernels import relu_squared
from ..kernels.lookup import every_value

INVERTIBLE = frozenset(ACTIVATIONS)
# torch's op of each activation actpatch replaces: the inverted ones, and relu² (kept from its output alone)
TORCH_OPS = {name: act.forward for name, act in ACTIVATIONS.items()} | {"relu2": relu_squared.forward}
# activations whose own backward reads only their output: nothing to gain
OUTPUT_ONLY = frozenset({"relu", "tanh", "sigmoid"})

# Formulas recognised by value.  The invertible ones come first; the rest name unsupported activations.
_FORMULAS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    **{name: act.forward for name, act in ACTIVATIONS.items()},
    "relu": F.relu,
    "relu2": lambda x: F.relu(x) ** 2,
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "mish": F.mish,
    "elu": F.elu,
    "selu": F.selu,
    "softplus": F.softplus,
    "hardswish": F.hardswish,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}
_NOT_ACTIVATIONS = {"identity": lambda x: x}

# Functional calls that are activation sites, by function name (``torch.relu`` too: squared inline?).
FUNCTIONAL = {"gelu": "gelu", "silu": "silu", "mish": "mish", "hardswish": "hardswish", "relu": "relu"}

_ACTIVATION_NAME = re.compile(r"gelu|silu|swish|relu|mish|glu|tanh|sigmoid|softplus|activation|act$", re.I)

_TEST_INPUT = torch.cat(
    [torch.linspace(-12.0, 24.0, 577, dtype=torch.float64), torch.tensor([-0.75, -1.28, 0.0, 1e-3])]
)


def is_candidate(module: nn.Module) -> bool:
    """A leaf module with no parameters and no buffers (swapping it cannot change the state_dict)."""
    return (
        not module._modules
        and not module._parameters
        and not module._buffers
        and not isinstance(module, nn.Dropout | nn.Identity)
    )


def formula_of(module: nn.Module) -> str | None:
    """The name of the known formula ``module`` computes, or None (also when it cannot be called so)."""
    x = _TEST_INPUT
    try:
        with torch.no_grad():
            y = module(x.clone())
    except Exception:  # an arbitrary module that does not take one tensor: not an activation
        return None
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or not y.is_floating_point():
        return None
    y = y.to(torch.float64)
    for name, f in {**_FORMULAS, **_NOT_ACTIVATIONS}.items():
        # gelu and gelu_tanh differ by up to 4.7e-4; float32-internal formulas agree within ~1e-7.
        if torch.allclose(y, f(x), rtol=1e-5, atol=1e-6):
            return name
    return None


_FLOAT32_GRID = torch.cat(
    [torch.linspace(-30.0, 30.0, 60001), torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0])]
)


def runs_torch_op(module: nn.Module, activation: str) -> bool:
    """Whether ``module``'s output is bitwise actpatch's forward of ``activation`` (torch's own op,
    ``TORCH_OPS``) on every bfloat16 and float16 value and a dense float32 grid, on the CPU; False for a
    Python formula with its own rounding (GPT-2's ``gelu_new``), whose output the replacement then computes
    by the module."""
    op = TORCH_OPS[activation]
    inputs = [every_value(torch.bfloat16), every_value(torch.float16), _FLOAT32_GRID]
    try:
        with torch.no_grad():
            return all(_same_bits(module(x), op(x)) for x in inputs)
    except Exception:  # a module that fails on some dtype: its own forward decides
        return False


def _same_bits(a: object, b: torch.Tensor) -> bool:
    if not isinstance(a, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
        return False
    return bool(((a == b) | (a.isnan() & b.isnan())).all() and (a.signbit() == b.signbit()).all())


def classify_module(module: nn.Module) -> str | None:
    """The activation ``module`` computes ("gelu", "relu2", or its class name when no formula matches);
    None when it is not an activation."""
    name = formula_of(module)
    if name in _NOT_ACTIVATIONS:
        return None
    if name is not None:
        return name
    cls = type(module).__name__
    return cls if _ACTIVATION_NAME.search(cls) else None


def functional_activation(func_name: str, kwargs: dict) -> str | None:
    """The activation a functional call computes, from the function's name (None if not one)."""
    name = FUNCTIONAL.get(func_name)
    if name == "gelu" and kwargs.get("approximate", "none") == "tanh":
        return "gelu_tanh"
    return name
