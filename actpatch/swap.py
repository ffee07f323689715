"""A module replaced by another at its path, reversibly::

    install(model, path, replacement)   the parent's child ``path`` becomes ``replacement``, which keeps the
                                        original in its ``__dict__`` (not as a submodule: ``state_dict`` and
                                        ``named_modules`` paths do not change)
    uninstall(model, path)              the very same original object back

The mechanism of kinds whose replacement holds no parameters (activations, dropouts); kinds that keep the
module and change its behaviour use :mod:`actpatch.in_place`.
"""

from __future__ import annotations

from torch import nn

ORIGINAL = "_actpatch_original"


def install(model: nn.Module, path: str, replacement: nn.Module) -> None:
    original = model.get_submodule(path)
    replacement.train(original.training)
    replacement.__dict__[ORIGINAL] = original
    _set(model, path, replacement)


def uninstall(model: nn.Module, path: str) -> None:
    _set(model, path, model.get_submodule(path).__dict__[ORIGINAL])


def original_of(module: nn.Module) -> nn.Module | None:
    """The module a replacement stands in for (None if ``module`` is not a replacement)."""
    return module.__dict__.get(ORIGINAL)


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent._modules[name] = module
