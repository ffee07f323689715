"""Activation families actpatch can invert, by name."""

from .approximation import InverseTable, inverse_table, table_for
from .base import Activation
from .gelu import GELU
from .sigmoid_gated import GELU_TANH, QUICK_GELU, QUICK_GELU_SCALE, SILU

ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (GELU, GELU_TANH, SILU, QUICK_GELU)}

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "GELU",
    "GELU_TANH",
    "InverseTable",
    "QUICK_GELU",
    "QUICK_GELU_SCALE",
    "SILU",
    "inverse_table",
    "table_for",
]
