"""A ``transformers.TrainerCallback`` that patches the model when training starts.

Use it when the model is built inside the Trainer (``model_init``, a training script you don't own);
otherwise ``actpatch.patch_model(model)`` before ``Trainer(...)`` is all it takes.

At ``on_train_begin`` the callback runs :func:`actpatch.patch_model` on the Trainer's model (the
unwrapped one: patching swaps parameter-free modules in place, so the optimizer, DDP/FSDP wrappers and
the state_dict are untouched), keeps the :class:`PatchReport` as ``callback.report``, logs a summary,
and (``save_manifest=True``) writes ``actpatch_manifest.json`` into every checkpoint the Trainer saves,
so ``actpatch.manifest.load_patched(checkpoint_dir)`` reloads it patched.  The probe forward is run with
the RNG state saved and restored, so patching does not change dropout masks or data order.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger("actpatch")


def _training_dtype(args: TrainingArguments) -> torch.dtype | None:
    if getattr(args, "bf16", False):
        return torch.bfloat16
    if getattr(args, "fp16", False):
        return torch.float16
    return None


def _float32_master(model: torch.nn.Module) -> bool:
    """Float32 weights under mixed precision: the forward runs under autocast (accelerate wraps it), so the
    probe sees what the step keeps — float32 where it stays float32 — and the projection keeps its dtype."""
    return all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point())


def summarize(report: Any) -> str:
    """One line: sites patched and the projected activation memory before -> after."""
    patched = sum(1 for s in report.sites if s.patched)
    line = f"actpatch: {patched} of {len(report.sites)} sites patched"
    p = getattr(report, "projection", None)
    if p is not None and hasattr(p, "activation_bytes_before"):
        line += (
            f"; projected activation memory {p.activation_bytes_before / 2**20:.1f} MiB -> "
            f"{p.activation_bytes_after / 2**20:.1f} MiB ({100 * p.saved_fraction:.1f}% saved, "
            f"batch {p.batch_size} x seq {p.seq_len})"
        )
    skipped = [s for s in report.sites if not s.patched]
    if skipped:
        reasons = sorted({str(s.reason) for s in skipped})
        line += (
            f"; not patched ({len(skipped)}): "
            + "; ".join(reasons[:3])
            + (" ..." if len(reasons) > 3 else "")
        )
    return line


class ActPatchCallback(TrainerCallback):
    """Patch the Trainer's model at the start of training; write the manifest into checkpoints.

    Keyword arguments go to :func:`actpatch.patch_model` (``include``, ``exclude``, ``seq_len``, ...);
    ``batch_size`` defaults to ``args.per_device_train_batch_size``; ``compiled`` to ``args.torch_compile``
    (the Trainer then trains a compiled model: the decisions follow the compiled graph); ``dtype`` to
    bf16/fp16 when the TrainingArguments ask for it and the weights are not float32 (with float32 weights
    the Trainer's autocast runs the probe, which then sees the step as it is: the autocast casts, shared
    where several Linears read one tensor).
    """

    def __init__(self, *, save_manifest: bool = True, **patch_kwargs: Any) -> None:
        self.patch_kwargs = patch_kwargs
        self.save_manifest = save_manifest
        self.report: Any = None
        self._model: torch.nn.Module | None = None

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            return
        from .. import patch_model

        kw = dict(self.patch_kwargs)
        kw.setdefault("batch_size", args.per_device_train_batch_size)
        kw.setdefault("compiled", bool(getattr(args, "torch_compile", False)))
        dtype = _training_dtype(args)
        if dtype is not None and not _float32_master(model):
            kw.setdefault("dtype", dtype)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            self.report = patch_model(model, **kw)
        self._model = model
        if state.is_world_process_zero:
            logger.info(summarize(self.report))

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not (self.save_manifest and self.report is not None and state.is_world_process_zero):
            return
        from ..manifest import build_manifest, write_manifest

        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(checkpoint):
            manifest = build_manifest(
                self._model,
                self.report,
                include=self.patch_kwargs.get("include"),
                exclude=self.patch_kwargs.get("exclude"),
            )
            write_manifest(manifest, checkpoint)


def patch_trainer(trainer: Any, **patch_kwargs: Any) -> ActPatchCallback:
    """Add an :class:`ActPatchCallback` to ``trainer`` and return it (``report`` is set at train start)."""
    callback = ActPatchCallback(**patch_kwargs)
    trainer.add_callback(callback)
    return callback


__all__ = ["ActPatchCallback", "patch_trainer", "summarize"]
