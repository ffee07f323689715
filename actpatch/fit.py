"""Will it fit: the memory of one training step on one GPU, before and after patching.

The model trains in its own dtype (bf16: ``model.to(torch.bfloat16)``, or HF Trainer with ``bf16=True``
on a model loaded in bf16), with no float32 master copy.  In bytes, P the parameters (tied ones once),
T the trainable ones (``requires_grad``), i a parameter's bytes per element, b the batch, s the sequence::

    weights     Σ_P numel·i  (+ buffers)
    gradients   Σ_T numel·i
    optimizer   Σ_T numel·k  k: adamw 2·i (torch keeps exp_avg and exp_avg_sq in the parameter's dtype);
                             adamw-8bit 2 + 8/256 (bitsandbytes: two uint8 states and a float32 absmax per
                             block of 256; tensors under 4096 elements keep float32 states, k = 8);
                             sgd i (momentum); none 0
    step        Σ_T numel·i for adamw (foreach AdamW's sqrt(exp_avg_sq) buffer), else 0
    A(b, s)     the bytes autograd saves in the forward (``PatchReport.projector``), before or after
    loss(b, s)  2·b·s·V·4: the NLL's and the log-softmax's float32 gradients of the logits, alive together
                at the start of the backward (V the size of the output embeddings; 0 without them)
    peak(b, s)  weights + optimizer + max(A + loss, gradients + step)

The two phases of a step: the start of the backward holds every activation and no gradient yet (they are
set to None by ``zero_grad``); the optimizer step holds every gradient and no activation.  Fitting on a GPU
also sets aside ``reserve = 1 GiB`` (CUDA context, cuBLAS workspaces) ``+ 5%`` of its memory
(fragmentation), for the caching allocator with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``: with
its default segments, the tens of GiB of float32 logit gradients did not find room at the predicted largest
batch in 3 of 4 full-AdamW runs on an H200 (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from .analysis.inputs import unwrap
from .analysis.memory import Projector

GiB = 1 << 30
CONTEXT_BYTES = GiB
FRAGMENTATION = 0.05
OPTIMIZERS = ("adamw", "adamw-8bit", "sgd", "none")
DEFAULT_SEQ = 512
_BNB_MIN_8BIT, _BNB_BLOCK = 4096, 256
_MAX = 1 << 24  # the largest batch or sequence searched

ASSUMPTIONS = (
    "weights, gradients and optimizer states in the model's dtype (no float32 master copy; adamw-8bit: "
    "uint8 states); static = weights + optimizer states + the activations that do not grow with the batch; "
    "peak = static + the larger of (activations + two float32 logit gradients) and (gradients + AdamW's "
    "step buffer); reserved: 1 GiB CUDA context + 5% of the GPU for fragmentation, with "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
)


class FitError(ValueError):
    """A request the memory model cannot answer (an unknown optimizer, a model without sequences ...)."""


@dataclass(frozen=True)
class TrainingMemory:
    """The bytes of one training step of a model, as functions of batch and sequence length."""

    parameters: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    step: int
    vocab: int
    optimizer_name: str
    projector: Projector

    def activations(self, batch: int, seq: int, patched: bool) -> float:
        """A(b, s): bytes saved for backward, before (``patched`` False) or after patching."""
        before, freed = self.projector(batch, seq)
        return before - freed if patched else before

    def loss(self, batch: int, seq: int) -> int:
        """2·b·s·V·4: the two float32 gradients of the logits at the start of the backward."""
        return 8 * batch * seq * self.vocab

    def peak(self, batch: int, seq: int, patched: bool) -> float:
        """weights + optimizer + max(A + loss, gradients + step): what max_memory_allocated shows."""
        backward = self.activations(batch, seq, patched) + self.loss(batch, seq)
        return self.weights + self.optimizer + max(backward, self.gradients + self.step)


def training_memory(model: nn.Module, report: Any, optimizer: str = "adamw") -> TrainingMemory:
    """The TrainingMemory of ``model`` (meta or real; LoRA applied or not) with ``optimizer``, from the
    ``report`` of :func:`actpatch.analyze` on it."""
    if optimizer not in OPTIMIZERS:
        raise FitError(f"unknown optimizer {optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    if report.projector is None:
        raise FitError("the report has no projector: analyze the model with actpatch.analyze")
    params = _parameters(model)
    trainable = [p for p in params if p.requires_grad]
    return TrainingMemory(
        parameters=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in trainable),
        weights=sum(_nbytes(t) for t in (*params, *model.buffers())),
        gradients=sum(_nbytes(p) for p in trainable),
        optimizer=sum(_state_bytes(p, optimizer) for p in trainable),
        step=sum(_nbytes(p) for p in trainable) if optimizer == "adamw" else 0,
        vocab=_vocab(model),
        optimizer_name=optimizer,
        projector=report.projector,
    )


def with_lora(model: nn.Module, rank: int) -> nn.Module:
    """``model`` with LoRA adapters of ``rank`` on every Linear but the output head (peft's
    "all-linear": the attention and MLP projections), in the model's dtype; the base is frozen.
    Works on meta models.  Changes ``model`` in place, as ``peft.get_peft_model`` does."""
    if rank < 1:
        raise FitError(f"the LoRA rank must be at least 1, got {rank}")
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
    return get_peft_model(model, config, autocast_adapter_dtype=False)


def reserve(gpu_bytes: int) -> int:
    """1 GiB of CUDA context and workspaces + 5% of the GPU for fragmentation."""
    return CONTEXT_BYTES + math.ceil(FRAGMENTATION * gpu_bytes)


@dataclass(frozen=True)
class Line:
    """static + x·per_x: the memory needed as a function of the batch at one sequence length."""

    static: float
    per_sample: float

    def largest(self, budget: float) -> int:
        """The largest batch with static + batch·per_sample <= budget (0 if none)."""
        if self.static + self.per_sample > budget:
            return 0
        return min(_MAX, math.floor((budget - self.static) / self.per_sample))


def batch_line(memory: TrainingMemory, gpu_bytes: int, seq: int, patched: bool) -> Line:
    """The needed bytes at ``seq`` as static + batch·per_sample (A is linear in the batch from batch 2:
    per_sample = A(3) - A(2) + loss(1); static = reserve + weights + optimizer + max(A(2) - 2·per_A, 0),
    the fixed part taken from both sides so the two lines share it)."""
    if not memory.projector.batched:
        raise FitError("the report was analyzed at batch 1: analyze at batch_size >= 2 to fit batches")
    fixed = max(_fixed(memory, seq, p) for p in (False, True))
    per_a = memory.activations(3, seq, patched) - memory.activations(2, seq, patched)
    static = reserve(gpu_bytes) + memory.weights + memory.optimizer + max(fixed, 0.0)
    return Line(static, per_a + memory.loss(1, seq))


def _fixed(memory: TrainingMemory, seq: int, patched: bool) -> float:
    a2, a3 = memory.activations(2, seq, patched), memory.activations(3, seq, patched)
    return a2 - 2 * (a3 - a2)


def step_fits(memory: TrainingMemory, gpu_bytes: int) -> bool:
    """Whether the optimizer step (weights, optimizer, gradients, step buffer, reserve) fits."""
    need = reserve(gpu_bytes) + memory.weights + memory.optimizer + memory.gradients + memory.step
    return need <= gpu_bytes


def max_batch(memory: TrainingMemory, gpu_bytes: int, seq: int, patched: bool) -> int:
    """The largest batch with static + batch·per_sample <= gpu_bytes, 0 when none (or the step) fits."""
    if not step_fits(memory, gpu_bytes):
        return 0
    return batch_line(memory, gpu_bytes, seq, patched).largest(gpu_bytes)


def longest_seq(memory: TrainingMemory, gpu_bytes: int, batch: int, patched: bool) -> int:
    """The longest sequence (at most the model's positions) with reserve + peak(batch, seq) <= gpu_bytes,
    0 when none; peak grows with seq, so a binary search."""
    if memory.projector.kind != "seq":
        raise FitError("the model's input length does not vary: there is no longest sequence to find")
    fits = lambda s: reserve(gpu_bytes) + memory.peak(batch, s, patched) <= gpu_bytes
    lo, hi = 0, memory.projector.max_seq or _MAX
    if fits(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters, the output embeddings' weight once when the config ties it to the input embeddings
    and the model has not tied them yet (``init_empty_weights`` builds them apart)."""
    params = list(model.parameters())
    base = unwrap(model)
    if not getattr(getattr(base, "config", None), "tie_word_embeddings", False):
        return params
    heads = [getattr(base, f"get_{w}_embeddings", lambda: None)() for w in ("input", "output")]
    if (
        any(h is None or not hasattr(h, "weight") for h in heads)
        or heads[0].weight.shape != heads[1].weight.shape
    ):
        return params
    return [p for p in params if p is not heads[1].weight or p is heads[0].weight]


def _nbytes(t: Any) -> int:
    return t.numel() * t.element_size()


def _state_bytes(p: nn.Parameter, optimizer: str) -> float:
    """The optimizer's state for one trainable parameter (see the module docstring)."""
    n, i = p.numel(), p.element_size()
    if optimizer == "adamw":
        return 2 * n * i
    if optimizer == "adamw-8bit":
        return 8 * n if n < _BNB_MIN_8BIT else 2 * n + 8 * math.ceil(n / _BNB_BLOCK)
    return n * i if optimizer == "sgd" else 0


def _vocab(model: nn.Module) -> int:
    """The size of the output embeddings (the logits' last dimension), 0 without them."""
    get = getattr(unwrap(model), "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return 0
    return getattr(head, "out_features", None) or head.weight.shape[0]


@dataclass(frozen=True)
class GpuFit:
    """Whether, and how large, a training step fits on a GPU of ``gpu_memory_bytes``, before and after
    patching: the largest batch at ``seq_len`` (mode "batch"), or the longest sequence at ``batch_size``
    (mode "seq").  ``to_dict()`` is the CLI's JSON ``fit`` object."""

    mode: str
    gpu_memory_bytes: int
    reserved_bytes: int
    static_bytes: int
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    optimizer_step_bytes: int
    loss_bytes_per_sample: int
    activation_bytes_per_sample_before: int
    activation_bytes_per_sample_after: int
    max_batch_size_before: int | None
    max_batch_size_after: int | None
    max_seq_len_before: int | None
    max_seq_len_after: int | None
    batch_size: int | None
    seq_len: int | None
    peak_bytes_before: int
    peak_bytes_after: int
    shortfall_bytes: int
    optimizer: str
    lora_rank: int | None
    parameters: int
    trainable_parameters: int
    assumptions: str = ASSUMPTIONS

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def plan(
    memory: TrainingMemory,
    gpu_bytes: int,
    *,
    seq_len: int | None = None,
    batch_size: int | None = None,
    lora_rank: int | None = None,
) -> GpuFit:
    """The GpuFit of ``memory`` on ``gpu_bytes``: with ``batch_size`` and no ``seq_len`` the longest
    sequence, else the largest batch at ``seq_len`` (default 512).  Peaks are at the largest batch or
    sequence found (batch 1 or sequence 1 when nothing fits); ``shortfall_bytes`` is how much more the
    GPU would need for that when nothing fits even after patching."""
    if gpu_bytes <= 0:
        raise FitError(f"the GPU memory must be positive, got {gpu_bytes} bytes")
    common = {
        "gpu_memory_bytes": gpu_bytes,
        "reserved_bytes": reserve(gpu_bytes),
        "weight_bytes": memory.weights,
        "gradient_bytes": memory.gradients,
        "optimizer_bytes": memory.optimizer,
        "optimizer_step_bytes": memory.step,
        "optimizer": memory.optimizer_name,
        "lora_rank": lora_rank,
        "parameters": memory.parameters,
        "trainable_parameters": memory.trainable,
    }
    if seq_len is None and batch_size is not None:
        return _seq_plan(memory, gpu_bytes, batch_size, common)
    return _batch_plan(memory, gpu_bytes, seq_len or DEFAULT_SEQ, common)


def _batch_plan(memory: TrainingMemory, gpu_bytes: int, seq: int, common: dict[str, Any]) -> GpuFit:
    lines = {p: batch_line(memory, gpu_bytes, seq, p) for p in (False, True)}
    best = {p: max_batch(memory, gpu_bytes, seq, p) for p in (False, True)}
    peaks = {p: memory.peak(max(best[p], 1), seq, p) for p in (False, True)}
    return GpuFit(
        mode="batch",
        static_bytes=round(lines[True].static),
        loss_bytes_per_sample=memory.loss(1, seq),
        activation_bytes_per_sample_before=round(lines[False].per_sample),
        activation_bytes_per_sample_after=round(lines[True].per_sample),
        max_batch_size_before=best[False],
        max_batch_size_after=best[True],
        max_seq_len_before=None,
        max_seq_len_after=None,
        batch_size=None,
        seq_len=seq,
        peak_bytes_before=round(peaks[False]),
        peak_bytes_after=round(peaks[True]),
        shortfall_bytes=_shortfall(peaks[True], best[True], gpu_bytes),
        **common,
    )


def _seq_plan(memory: TrainingMemory, gpu_bytes: int, batch: int, common: dict[str, Any]) -> GpuFit:
    best = {p: longest_seq(memory, gpu_bytes, batch, p) for p in (False, True)}
    seqs = {p: max(best[p], 1) for p in (False, True)}
    sample = lambda p: (memory.activations(batch, seqs[p], p) + memory.loss(batch, seqs[p])) / batch
    peaks = {p: memory.peak(batch, seqs[p], p) for p in (False, True)}
    return GpuFit(
        mode="seq",
        static_bytes=common["reserved_bytes"] + memory.weights + memory.optimizer,
        loss_bytes_per_sample=memory.loss(1, seqs[True]),
        activation_bytes_per_sample_before=round(sample(False)),
        activation_bytes_per_sample_after=round(sample(True)),
        max_batch_size_before=None,
        max_batch_size_after=None,
        max_seq_len_before=best[False],
        max_seq_len_after=best[True],
        batch_size=batch,
        seq_len=None,
        peak_bytes_before=round(peaks[False]),
        peak_bytes_after=round(peaks[True]),
        shortfall_bytes=_shortfall(peaks[True], best[True], gpu_bytes),
        **common,
    )


def _shortfall(peak: float, best: int, gpu_bytes: int) -> int:
    """How many more bytes the GPU would need for the smallest step, 0 when something fits."""
    return 0 if best else max(math.ceil(reserve(gpu_bytes) + peak - gpu_bytes), 1)
