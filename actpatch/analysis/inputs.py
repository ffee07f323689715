"""Synthetic training inputs for a probe forward, built from the model's config and forward signature.

:func:`input_spec` returns an :class:`InputSpec` whose ``make(batch, seq)`` gives the keyword arguments
of one training forward (with labels where the model has a head that takes them): token ids for causal
and masked LMs and encoder-decoders (decoder ids too, so no config token id is needed),
``pixel_values`` for vision models, ``input_features`` for Whisper-like audio models, both for CLIP-like
models.  ``example_inputs`` (a dict of keyword arguments, a tuple of positional ones, or one tensor)
replaces the synthesis; the probe then runs at that one shape, read from the inputs: the batch is the
first tensor's dim 0; the sequence length is dim 1 of the first token ids ([batch, seq], integer) or
embeddings ([batch, seq, hidden], floating; not Whisper-like ``input_features``).  Inputs with neither
(images, [batch, features] vectors) have no sequence dimension: their shape is (batch, 1).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_TOKEN_LABEL_HEADS = (
    "ForCausalLM",
    "LMHeadModel",
    "ForMaskedLM",
    "ForConditionalGeneration",
    "ForSeq2SeqLM",
    "WithLMHead",
)
_CLASS_LABEL_HEADS = ("ForSequenceClassification", "ForImageClassification", "ForAudioClassification")
_NOT_SEQUENCES = ("input_features",)  # [batch, mel bins, frames]: 3-D, but dim 1 is no sequence
DEFAULT_SHAPE = (1, 512)  # (batch, seq) projected when neither they nor example inputs are given


@dataclass
class InputSpec:
    """How to build inputs of a given shape; ``seq_dependent`` is False when the config fixes the length
    or the example inputs have no sequence dimension."""

    make: Callable[[int, int], tuple[tuple, dict[str, Any]]]
    seq_dependent: bool
    fixed_shape: tuple[int, int] | None = None  # (batch, seq) of user-given example inputs
    max_seq: int | None = None

    def projection_shape(self, batch: int | None, seq: int | None) -> tuple[int, int]:
        """The (batch, seq) to project at: those given, else the example inputs' own, else 1 and 512."""
        if seq is not None and self.fixed_shape is not None and not self.seq_dependent:
            raise ValueError(
                "seq_len does not apply: example_inputs have no sequence dimension "
                "(token ids [batch, seq] or embeddings [batch, seq, hidden])"
            )
        own_batch, own_seq = self.fixed_shape or DEFAULT_SHAPE
        return own_batch if batch is None else batch, own_seq if seq is None else seq


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a PEFT wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point parameters (float32 if it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def input_spec(model: nn.Module, example_inputs: Any = None) -> InputSpec:
    """Inputs for ``model``: ``example_inputs`` as given, else synthesized from its config."""
    if example_inputs is not None:
        return _fixed_spec(example_inputs)
    base = unwrap(model)
    config = getattr(base, "config", None)
    params = _forward_params(base)
    device, dtype = model_device(model), model_dtype(model)
    if config is None:
        return _plain_spec(base, params, device, dtype)
    return _config_spec(base, config, params, device, dtype)


def _fixed_spec(example_inputs: Any) -> InputSpec:
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, tuple | list):
        args, kwargs = tuple(example_inputs), {}
    elif isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    else:
        raise TypeError(
            "example_inputs must be a dict of keyword arguments, a tuple or a tensor, "
            f"got {type(example_inputs).__name__}"
        )
    tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() >= 1]
    if not tensors:
        raise ValueError("example_inputs holds no tensor")
    candidates = (*args, *(t for k, t in kwargs.items() if k not in _NOT_SEQUENCES))
    seq = next((t.shape[1] for t in candidates if _is_sequence(t)), None)
    return InputSpec(
        make=lambda b, s: (args, kwargs),
        seq_dependent=seq is not None,
        fixed_shape=(tensors[0].shape[0], seq or 1),
    )


def _is_sequence(t: object) -> bool:
    """Token ids [batch, seq] or embeddings [batch, seq, hidden]."""
    if not isinstance(t, torch.Tensor):
        return False
    return t.dim() == (3 if t.is_floating_point() else 2)


def _forward_params(module: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _sub(config: Any, name: str) -> Any:
    return getattr(config, name, None) or config


def _ids(batch: int, seq: int, vocab: int, device: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = min(5, max(vocab - 1, 0))
    return torch.randint(low, max(vocab, low + 1), (batch, seq), generator=g).to(device)


def _config_spec(base: nn.Module, config: Any, params: set[str], device, dtype) -> InputSpec:
    cls = type(base).__name__
    text_cfg = _sub(config, "text_config")
    vision_cfg = _sub(config, "vision_config")
    main = getattr(base, "main_input_name", "input_ids")
    wants_text = "input_ids" in params and (main == "input_ids" or "pixel_values" in params)
    wants_pixels = "pixel_values" in params
    wants_audio = "input_features" in params
    if not (wants_text or wants_pixels or wants_audio):
        raise ValueError(f"cannot synthesize inputs for {cls}: pass example_inputs")
    token_labels = "labels" in params and any(h in cls for h in _TOKEN_LABEL_HEADS)
    class_labels = "labels" in params and any(h in cls for h in _CLASS_LABEL_HEADS)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    max_seq = _max_positions(text_cfg if wants_text else config, encoder_decoder)

    def make(batch: int, seq: int) -> tuple[tuple, dict[str, Any]]:
        kw: dict[str, Any] = {}
        if wants_text:
            kw["input_ids"] = _ids(batch, seq, text_cfg.vocab_size, device, seed=seq)
        if wants_pixels:
            size = _as_int(getattr(vision_cfg, "image_size", 224))
            chans = getattr(vision_cfg, "num_channels", 3)
            g = torch.Generator().manual_seed(batch)
            kw["pixel_values"] = torch.randn(batch, chans, size, size, generator=g).to(device, dtype)
        if wants_audio:
            frames = 2 * getattr(config, "max_source_positions", 1500)
            g = torch.Generator().manual_seed(batch)
            feats = torch.randn(batch, config.num_mel_bins, frames, generator=g)
            kw["input_features"] = feats.to(device, dtype)
        if encoder_decoder and "decoder_input_ids" in params:
            # given even with labels: shifting labels right needs decoder_start_token_id, which some
            # default configs lack (T5Config())
            kw["decoder_input_ids"] = _ids(batch, seq, config.vocab_size, device, seed=seq + 1)
        if token_labels and (wants_text or encoder_decoder):
            kw["labels"] = _ids(batch, seq, text_cfg.vocab_size, device, seed=seq + 2)
        elif class_labels:
            num = getattr(config, "num_labels", 2)
            kw["labels"] = _ids(batch, 1, num, device, seed=3).view(batch) if num > 1 else torch.zeros(batch)
        if "return_loss" in params and wants_text and wants_pixels:
            kw["return_loss"] = True
        if "use_cache" in params:
            kw["use_cache"] = False
        return (), kw

    seq_dependent = wants_text or (encoder_decoder and token_labels) or "decoder_input_ids" in params
    return InputSpec(make=make, seq_dependent=seq_dependent, max_seq=max_seq)


def _plain_spec(base: nn.Module, params: set[str], device, dtype) -> InputSpec:
    """A model without a config: token ids for a leading Embedding, else [batch, seq, in_features]."""
    first = next((m for m in base.modules() if isinstance(m, nn.Linear | nn.Embedding)), None)
    if first is None:
        raise ValueError(f"cannot synthesize inputs for {type(base).__name__}: pass example_inputs")

    def make(batch: int, seq: int) -> tuple[tuple, dict[str, Any]]:
        if isinstance(first, nn.Embedding):
            return (_ids(batch, seq, first.num_embeddings, device, seed=seq),), {}
        g = torch.Generator().manual_seed(seq)
        return (torch.randn(batch, seq, first.in_features, generator=g).to(device, dtype),), {}

    return InputSpec(make=make, seq_dependent=True)


def _max_positions(config: Any, encoder_decoder: bool) -> int | None:
    names = ("max_target_positions",) if encoder_decoder else ()
    names += ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _as_int(value: Any) -> int:
    return int(value[0]) if isinstance(value, list | tuple) else int(value)
