"""Analysis: probe a training forward, find the activation sites worth inverting, project the memory."""

from .walker import walk

__all__ = ["walk"]
