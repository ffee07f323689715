"""Integrations with training frameworks (transformers Trainer, accelerate, Liger-Kernel).

Everything that imports transformers lives here, imported lazily, so ``import actpatch`` stays light::

    from actpatch.integrations import ActPatchCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[ActPatchCallback()])
"""

from __future__ import annotations

from typing import Any

__all__ = ["ActPatchCallback", "liger_fused_modules", "liger_owned", "patch_trainer"]


def __getattr__(name: str) -> Any:
    if name in ("ActPatchCallback", "patch_trainer"):
        from . import trainer

        return getattr(trainer, name)
    if name in ("liger_fused_modules", "liger_owned"):
        from . import liger

        return getattr(liger, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
