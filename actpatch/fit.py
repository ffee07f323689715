"""Will it fit: the memory of one training step on one GPU, before and after patching.

In bytes, P the parameters (tied ones once), T the trainable ones (``requires_grad``), b the batch, s the
sequence, V x H the output embeddings (0 without them), i bytes per element of the weights: the model's
dtype (``precision="model"``: ``model.to(torch.bfloat16)``, HF Trainer's ``bf16=True`` on a model loaded in
bf16, no float32 master copy), or 4 (``"mixed"``: float32 weights under ``torch.autocast(bfloat16)``)::

    weights     Σ_P numel·i  (+ buffers)
    gradients   Σ_T numel·i
    optimizer   Σ_T numel·k  k: adamw, adamw-fused 2·i (torch keeps exp_avg and exp_avg_sq in the
                             parameter's dtype); adamw-8bit 2 + 8/256 (bitsandbytes: two uint8 states and a
                             float32 absmax per block of 256; tensors under 4096 elements keep float32
                             states, k = 8); sgd i (momentum); none 0
    step        Σ_T numel·i for adamw (foreach AdamW's sqrt(exp_avg_sq) buffer), else 0
    A(b, s)     the bytes autograd saves in the forward (``PatchReport.projector``, or
                :func:`running_activations`), before or after; probed under the step's autocast, A holds
                autocast's bf16 copies of the weights (the ops using them save them) and the float32
                residual stream
    loss(b, s)  what the loss head holds on top of A at its peak:
                eager  2·b·s·V·4, the NLL's and the log-softmax's float32 gradients of the logits, alive
                       together at the start of the backward (HF's loss upcasts the logits to float32; the
                       log-softmax's output is in A)
                fused  Liger-Kernel's fused linear cross entropy (its gradients are computed in the forward
                       and saved: in A) at the end of its forward: its input b·s·H·h, one chunk of logits
                       c·V·l (c = pow2⌈b·s / ⌈V/H⌉⌉ rows), and under autocast its two bf16 copies of the
                       head's weight, 2·2·V·H (autocast's cached one, and its transpose's); h = i, l = i, or
                       under mixed precision h = 4 (the residual stream), l = 2
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

from .analysis.inputs import input_spec, model_dtype, unwrap
from .analysis.memory import Fit, Projector, fit_kind, probe_shapes
from .analysis.probe import run_probe

GiB = 1 << 30
CONTEXT_BYTES = GiB
FRAGMENTATION = 0.05
OPTIMIZERS = ("adamw", "adamw-fused", "adamw-8bit", "sgd", "none")
PRECISIONS = ("model", "mixed")
LOSSES = ("eager", "fused")
DEFAULT_SEQ = 512
_BNB_MIN_8BIT, _BNB_BLOCK = 4096, 256
_MAX = 1 << 24  # the largest batch or sequence searched

_WEIGHTS = {
    "model": "weights, gradients and optimizer states in the model's dtype (no float32 master copy; "
    "adamw-8bit: uint8 states)",
    "mixed": "float32 weights, gradients and optimizer states (adamw-8bit: uint8 states) under bf16 "
    "autocast, its bf16 weight copies among the activations",
}
_LOSS_HEADS = {
    "eager": "two float32 logit gradients",
    "fused": "the fused linear cross entropy's input, logit chunk and bf16 weight copies",
}


def assumptions(precision: str = "model", loss: str = "eager") -> str:
    """The one line stating what a fit assumes."""
    return (
        f"{_WEIGHTS[precision]}; static = weights + optimizer states + the activations that do not grow with "
        f"the batch; peak = static + the larger of (activations + {_LOSS_HEADS[loss]}) and (gradients + "
        "AdamW's step buffer); reserved: 1 GiB CUDA context + 5% of the GPU for fragmentation, with "
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
    )


ASSUMPTIONS = assumptions()


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
    hidden: int = 0  # the output embeddings' input width H
    precision: str = "model"
    loss_head: str = "eager"
    width: int = 4  # i: bytes per element of the weights

    def activations(self, batch: int, seq: int, patched: bool) -> float:
        """A(b, s): bytes saved for backward, before (``patched`` False) or after patching."""
        before, freed = self.projector(batch, seq)
        return before - freed if patched else before

    def loss(self, batch: int, seq: int) -> int:
        """What the loss head holds on top of A at its peak (see the module docstring)."""
        tokens, vocab, hidden = batch * seq, self.vocab, self.hidden
        if self.loss_head == "eager":
            return 8 * tokens * vocab
        if not vocab:
            return 0
        mixed = self.precision == "mixed"
        chunk = min(1 << (math.ceil(tokens / math.ceil(vocab / hidden)) - 1).bit_length(), tokens)
        casts = 2 * 2 * vocab * hidden if mixed else 0
        return (
            tokens * hidden * (4 if mixed else self.width)
            + chunk * vocab * (2 if mixed else self.width)
            + casts
        )

    def backward(self, batch: int, seq: int, patched: bool) -> float:
        """A + loss: the activations' phase."""
        return self.activations(batch, seq, patched) + self.loss(batch, seq)

    def peak(self, batch: int, seq: int, patched: bool) -> float:
        """weights + optimizer + max(A + loss, gradients + step): what max_memory_allocated shows."""
        return (
            self.weights
            + self.optimizer
            + max(self.backward(batch, seq, patched), self.gradients + self.step)
        )


def training_memory(
    model: nn.Module, report: Any, optimizer: str = "adamw", *, precision: str = "model", loss: str = "eager"
) -> TrainingMemory:
    """The TrainingMemory of ``model`` (meta or real; LoRA applied or not) with ``optimizer``, from the
    ``report`` of :func:`actpatch.analyze` on it (or the Projector of :func:`running_activations`), in
    ``precision`` ("model" or "mixed") with the ``loss`` head ("eager" or "fused")."""
    for name, value, allowed in (("optimizer", optimizer, OPTIMIZERS), ("precision", precision, PRECISIONS),
                                 ("loss", loss, LOSSES)):  # fmt: skip
        if value not in allowed:
            raise FitError(f"unknown {name} {value!r}: use one of {', '.join(allowed)}")
    projector = report if isinstance(report, Projector) else report.projector
    if projector is None:
        raise FitError("the report has no projector: analyze the model with actpatch.analyze")
    width = 4 if precision == "mixed" else None
    params = _parameters(model)
    trainable = [p for p in params if p.requires_grad]
    vocab, hidden = _head(model)
    return TrainingMemory(
        parameters=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in trainable),
        weights=sum(_nbytes(t, width) for t in params) + sum(_nbytes(t) for t in model.buffers()),
        gradients=sum(_nbytes(p, width) for p in trainable),
        optimizer=sum(_state_bytes(p, optimizer, width) for p in trainable),
        step=sum(_nbytes(p, width) for p in trainable) if optimizer == "adamw" else 0,
        vocab=vocab,
        optimizer_name=optimizer,
        projector=projector,
        hidden=hidden,
        precision=precision,
        loss_head=loss,
        width=width or _head_width(model),
    )


def running_activations(model: nn.Module, batch_size: int) -> Projector:
    """A(b, s) of ``model`` as it runs now, its patches and other libraries' kernels (Liger-Kernel's
    modules, its fused loss) included, where :func:`actpatch.analyze` sees the modules it could patch as
    their eager originals: the probe's bytes saved at small shapes (for ``batch_size``, as
    ``actpatch.analyze``; under the caller's autocast), fitted as there.  Before = after."""
    spec = input_spec(model, None)
    shapes = probe_shapes(spec.seq_dependent, spec.max_seq, spec.fixed_shape, batch_size)
    totals = [run_probe(model, *spec.make(b, s), model_dtype(model)).total() for b, s in shapes]
    return Projector(
        Fit(shapes, totals, fit_kind(spec.seq_dependent, spec.fixed_shape)), (), (), 1.0, spec.max_seq
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
    """The needed bytes at ``seq`` as static + batch·per_sample (N = A + loss is linear in the batch from
    batch 2: per_sample = N(3) - N(2); static = reserve + weights + optimizer + max(N(2) - 2·per_sample, 0),
    the fixed part taken from both sides so the two lines share it)."""
    if not memory.projector.batched:
        raise FitError("the report was analyzed at batch 1: analyze at batch_size >= 2 to fit batches")
    fixed = max(_fixed(memory, seq, p) for p in (False, True))
    static = reserve(gpu_bytes) + memory.weights + memory.optimizer + max(fixed, 0.0)
    return Line(static, _per_sample(memory, seq, patched))


def _per_sample(memory: TrainingMemory, seq: int, patched: bool) -> float:
    return memory.backward(3, seq, patched) - memory.backward(2, seq, patched)


def _fixed(memory: TrainingMemory, seq: int, patched: bool) -> float:
    return memory.backward(2, seq, patched) - 2 * _per_sample(memory, seq, patched)


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


def _nbytes(t: Any, width: int | None = None) -> int:
    """Bytes of ``t``; a floating tensor at ``width`` bytes an element when given (mixed precision)."""
    return t.numel() * (width if width and t.is_floating_point() else t.element_size())


def _state_bytes(p: nn.Parameter, optimizer: str, width: int | None = None) -> float:
    """The optimizer's state for one trainable parameter (see the module docstring)."""
    n, i = p.numel(), width or p.element_size()
    if optimizer in ("adamw", "adamw-fused"):
        return 2 * n * i
    if optimizer == "adamw-8bit":
        return 8 * n if n < _BNB_MIN_8BIT else 2 * n + 8 * math.ceil(n / _BNB_BLOCK)
    return n * i if optimizer == "sgd" else 0


def _output_embeddings(model: nn.Module) -> nn.Module | None:
    get = getattr(unwrap(model), "get_output_embeddings", None)
    return get() if callable(get) else None


def _head(model: nn.Module) -> tuple[int, int]:
    """(V, H): the output embeddings' size (the logits' last dimension) and input width, 0 without them."""
    head = _output_embeddings(model)
    if head is None:
        return 0, 0
    return head.weight.shape[0], head.weight.shape[-1]


def _head_width(model: nn.Module) -> int:
    """Bytes per element of the output embeddings' weight (of the first parameter without them)."""
    head = _output_embeddings(model)
    weight = head.weight if head is not None else next(iter(model.parameters()), None)
    return weight.element_size() if weight is not None else 4


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
    precision: str = "model"
    loss: str = "eager"
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
        "precision": memory.precision,
        "loss": memory.loss_head,
        "assumptions": assumptions(memory.precision, memory.loss_head),
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
        loss_bytes_per_sample=memory.loss(3, seq) - memory.loss(2, seq),
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
        loss_bytes_per_sample=round(memory.loss(batch, seqs[True]) / batch),
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
