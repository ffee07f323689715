"""``convert --gpu-memory``: the options checked before any work, LoRA applied to the model the probe
sees, the fit computed (actpatch.fit) and drawn (actpatch.plot).  No memory arithmetic here."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..analysis.inputs import unwrap


@dataclass
class TrainingRequest:
    """What ``--gpu-memory``, ``--optimizer``, ``--lora-rank``, ``--plot``, ``--mixed-precision`` and
    ``--loss`` ask for."""

    gpu_bytes: int
    optimizer: str
    lora_rank: int | None
    plot: Path | None
    mixed: bool = False
    loss: str = "eager"
    problem: type[Exception] = ValueError
    memory: Any = field(default=None, repr=False)

    @classmethod
    def checked(
        cls,
        gpu_memory: float | None,
        optimizer: str,
        lora_rank: int | None,
        plot: Path | None,
        dry_run: bool,
        problem: type[Exception],
        mixed: bool = False,
        dtype: str | None = None,
        loss: str = "eager",
    ) -> TrainingRequest | None:
        """The request, or None without --gpu-memory; ``problem`` (exit 2) for what cannot work."""
        from .. import plot as plotting

        if gpu_memory is None:
            if lora_rank is not None or plot is not None or optimizer != "adamw" or mixed or loss != "eager":
                raise problem(
                    "--optimizer, --lora-rank, --plot, --mixed-precision and --loss need --gpu-memory"
                )
            return None
        if mixed and dtype not in (None, "float32"):
            raise problem(f"--mixed-precision keeps float32 weights: leave out --dtype {dtype}")
        if not math.isfinite(gpu_memory) or gpu_memory <= 0:
            raise problem(f"--gpu-memory must be a positive number of GiB, got {gpu_memory:g}")
        if not dry_run:
            raise problem("--gpu-memory projects a training step from the config: use it with --dry-run")
        if lora_rank is not None and not _has_peft():
            raise problem("--lora-rank needs peft: pip install peft")
        if plot is not None:
            try:
                plotting.check_target(plot)
            except plotting.PlotError as e:
                raise problem(str(e)) from None
        return cls(round(gpu_memory * (1 << 30)), optimizer, lora_rank, plot, mixed, loss, problem)

    def probing(self, model: nn.Module) -> contextlib.ExitStack:
        """The context the probe runs in on meta: bf16 autocast's casts with --mixed-precision, Liger's
        fused linear cross entropy with --loss fused."""
        from ..meta_autocast import MetaAutocast
        from ..meta_fused_loss import MetaFusedLoss

        stack = contextlib.ExitStack()
        if self.mixed:
            stack.enter_context(MetaAutocast())
        if self.loss == "fused":
            head = getattr(unwrap(model), "get_output_embeddings", lambda: None)()
            if head is None:
                raise self.problem("--loss fused needs a model with a language-modelling head")
            stack.enter_context(MetaFusedLoss(head.weight))
        return stack

    def prepare(self, model: nn.Module) -> nn.Module:
        """The model the probe should see: with LoRA adapters when asked."""
        from ..fit import with_lora

        return model if self.lora_rank is None else with_lora(model, self.lora_rank)

    def fit(
        self,
        model: nn.Module,
        report: Any,
        shape: dict[str, Any],
        *,
        seq_len: int | None,
        batch_size: int | None,
    ) -> Any:
        """The GpuFit; the model is analyzed once more at batch 2 when the report's projection, at batch
        1, cannot tell how the activations grow with the batch."""
        import actpatch

        from .. import fit

        seq_mode = seq_len is None and batch_size is not None
        if not (seq_mode or report.projector.batched):
            with self.probing(model):
                report = actpatch.analyze(model, **{**shape, "batch_size": 2})
        precision = "mixed" if self.mixed else "model"
        self.memory = fit.training_memory(model, report, self.optimizer, precision=precision, loss=self.loss)
        return fit.plan(
            self.memory, self.gpu_bytes, seq_len=seq_len, batch_size=batch_size, lora_rank=self.lora_rank
        )

    def draw(self, gpu_fit: Any, title: str) -> None:
        if self.plot is not None:
            from ..plot import plot_fit

            plot_fit(self.memory, gpu_fit, self.plot, title)


def _has_peft() -> bool:
    import importlib.util

    return importlib.util.find_spec("peft") is not None
