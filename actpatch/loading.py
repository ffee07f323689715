"""Model id / local path / built-in offline config -> config or model.

``resolve`` decides where a MODEL argument points (a local directory or config file, the Hugging Face
cache or Hub, or a config shipped in :mod:`actpatch.configs`), ``load_config`` reads and validates its
config, and ``load_model`` builds the model: on the meta device for dry runs (no weights read), from
the weights when there are some, or randomly initialised from the config when there are none (unless
the caller forbids it).

Errors are :class:`ModelLoadError` (or its subclasses :class:`ModelNotFoundError` when the argument
names nothing, :class:`MissingWeightsError` when weights are required and there are none), with a
one-line message fit to show a user.  Nothing here prints.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch.overrides import TorchFunctionMode

from . import configs

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
# Auto classes tried, in order, when the config names no architecture this transformers knows.
_AUTO_ORDER = (
    "AutoModelForCausalLM",
    "AutoModelForSeq2SeqLM",
    "AutoModelForMaskedLM",
    "AutoModelForImageTextToText",
    "AutoModelForSpeechSeq2Seq",
    "AutoModelForImageClassification",
    "AutoModelForAudioClassification",
    "AutoModelForSequenceClassification",
    "AutoModel",
)

SourceKind = Literal["local", "builtin", "hub"]


class ModelLoadError(Exception):
    """The model could not be resolved, configured or built; the message is one line for the user."""


class ModelNotFoundError(ModelLoadError):
    """The MODEL argument names no local path, built-in config, cached or reachable Hub repository."""


class MissingWeightsError(ModelLoadError):
    """The model has no weights to load and ``load_model(random_init=False)`` forbids random ones."""


@dataclass
class ModelSource:
    """Where a MODEL argument points.

    ``location`` is the directory (local), the config file (local file), the built-in id (builtin)
    or the repo id (hub); ``has_weights`` says whether weights can be read without the network.
    """

    name: str
    kind: SourceKind
    location: str
    has_weights: bool
    config_file: Path | None = None


@dataclass
class LoadedModel:
    """A built model and how it was obtained (``weights``: "pretrained", "random" or "meta"; ``dtype``:
    the one it was built in)."""

    model: torch.nn.Module
    source: ModelSource
    weights: Literal["pretrained", "random", "meta"]
    notes: list[str] = field(default_factory=list)
    dtype: torch.dtype = torch.float32


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks for no network."""
    return any(
        os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith(".json")
        or not _REPO_ID.match(name)
    )


def _has_weights(directory: Path) -> bool:
    return any((directory / f).is_file() for f in WEIGHT_FILES)


def _cached_file(repo_id: str, filename: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, filename)
    except Exception:  # a malformed id or cache: treat as not cached
        return None
    return found if isinstance(found, str) else None


def resolve(name: str) -> ModelSource:
    """Decide what ``name`` refers to, without the network.

    Order: an existing local directory or config file (which stands for its directory: the weights
    beside it are loaded); the Hugging Face cache; a built-in config; otherwise a Hub repository (only
    if the Hub may be used).  Raises ModelNotFoundError.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelNotFoundError(f"{name}: directory has no config.json")
        return ModelSource(name, "local", str(path), _has_weights(path), config_file)
    if path.is_file():
        return ModelSource(name, "local", str(path.parent), _has_weights(path.parent), path)
    if _looks_like_path(name):
        raise ModelNotFoundError(f"{name}: no such file or directory")
    if _cached_file(name, "config.json"):
        has_weights = not hub_offline() or any(_cached_file(name, f) for f in WEIGHT_FILES)
        return ModelSource(name, "hub", name, has_weights)
    builtin = configs.canonical_name(name)
    if builtin is not None:
        return ModelSource(name, "builtin", builtin, False)
    if hub_offline():
        raise ModelNotFoundError(
            f"{name}: unknown model (not a local path, not a built-in config - see `actpatch models` - "
            "and not in the Hugging Face cache; HF_HUB_OFFLINE is set)"
        )
    return ModelSource(name, "hub", name, True)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{file}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{file}: cannot read ({_one_line(e)})") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file}: a config must be a JSON object, got {type(data).__name__}")
    return data


def config_from_dict(data: dict[str, Any], *, origin: str, trust_remote_code: bool = False) -> Any:
    """A transformers config from ``config.json`` contents; ModelLoadError with ``origin`` if it is bad."""
    from transformers import CONFIG_MAPPING, __version__

    model_type = data.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelLoadError(f"{origin}: config has no 'model_type' string")
    if model_type not in CONFIG_MAPPING:
        hint = (
            "it ships its own code: pass --trust-remote-code to run it"
            if "auto_map" in data and not trust_remote_code
            else "a newer transformers may know it"
        )
        raise ModelLoadError(
            f"{origin}: model type '{model_type}' is not known to transformers {__version__} ({hint})"
        )
    kwargs = {k: v for k, v in data.items() if k != "model_type"}
    try:
        return CONFIG_MAPPING[model_type](**kwargs)
    except Exception as e:
        raise ModelLoadError(f"{origin}: invalid config: {_one_line(e)}") from e


def load_config(source: ModelSource | str, *, trust_remote_code: bool = False) -> Any:
    """The validated transformers config of ``source`` (a ModelSource or a MODEL argument)."""
    if isinstance(source, str):
        source = resolve(source)
    if source.kind == "builtin":
        return config_from_dict(
            configs.load(source.location),
            origin=f"built-in config {source.location}",
            trust_remote_code=False,
        )
    if source.kind == "local":
        assert source.config_file is not None
        data = _read_json(source.config_file)
        if "auto_map" in data and trust_remote_code:
            return _auto_config(source.location, trust_remote_code=True)
        return config_from_dict(data, origin=str(source.config_file), trust_remote_code=trust_remote_code)
    return _auto_config(source.location, trust_remote_code=trust_remote_code)


def _auto_config(location: str, *, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise ModelLoadError(f"{location}: {_one_line(e)}") from e
    except OSError as e:
        if "does not appear to have" in str(e) or "couldn't connect" in str(e).lower():
            raise ModelNotFoundError(f"{location}: {_one_line(e)}") from e
        raise ModelLoadError(f"{location}: {_one_line(e)}") from e
    except Exception as e:
        raise ModelLoadError(f"{location}: cannot read the config ({_one_line(e)})") from e


def config_dtype(config: Any) -> torch.dtype:
    """The dtype the checkpoint's config names (``dtype``; ``torch_dtype`` before transformers 5), as
    transformers 5 loads it by default; float32 where it names no floating dtype."""
    value = getattr(config, "dtype", None) or vars(config).get("torch_dtype")
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else torch.float32


def auto_class_for(config: Any) -> Any:
    """The transformers Auto class that builds the model ``config`` describes.

    The first entry of ``config.architectures`` decides when some Auto class maps to it (so a BERT
    checkpoint saved as BertForMaskedLM gets AutoModelForMaskedLM); otherwise the first Auto class that
    supports the config's type: seq2seq LM first for encoder-decoders, masked LM before causal LM for
    encoders, then causal LM, image-text-to-text, speech seq2seq, image/audio/sequence classification,
    AutoModel.
    """
    import transformers

    candidates = [getattr(transformers, n) for n in _AUTO_ORDER if hasattr(transformers, n)]
    arch = (getattr(config, "architectures", None) or [None])[0]
    if arch:
        for auto in candidates:
            mapping = auto._model_mapping
            if type(config) in mapping and _class_name(mapping[type(config)]) == arch:
                return auto
        for auto in candidates:
            try:
                names = {_class_name(v) for v in auto._model_mapping.values()}
            except Exception:
                continue
            if arch in names and type(config) in auto._model_mapping:
                return auto
    order = _preferred(config, candidates)
    for auto in order:
        if type(config) in auto._model_mapping:
            return auto
    if getattr(config, "auto_map", None):
        return (
            transformers.AutoModelForCausalLM
            if "AutoModelForCausalLM" in config.auto_map
            else transformers.AutoModel
        )
    raise ModelLoadError(f"no transformers Auto class builds a model of type '{config.model_type}'")


def _preferred(config: Any, candidates: list[Any]) -> list[Any]:
    """Seq2seq first for encoder-decoders, masked LM before causal LM for encoders (BERT, RoBERTa)."""
    first = []
    if getattr(config, "is_encoder_decoder", False):
        first = [a for a in candidates if a.__name__ == "AutoModelForSeq2SeqLM"]
    elif not getattr(config, "is_decoder", False):
        first = [
            a for a in candidates if a.__name__ == "AutoModelForMaskedLM" and type(config) in a._model_mapping
        ]
    return first + [a for a in candidates if a not in first]


def _class_name(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        value = value[0]
    return getattr(value, "__name__", str(value))


def load_model(
    name: str,
    *,
    dry_run: bool = False,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    random_init: bool = True,
) -> LoadedModel:
    """Build the model ``name`` points to, in training mode.

    ``dry_run``: on the meta device from the config only (accelerate.init_empty_weights), nothing read
    or allocated; grouped_mm experts run an op whose meta kernel takes every dtype.  Otherwise the
    weights are loaded when there are some; a local config without weights, or a built-in config whose
    weights cannot be had, is randomly initialised (``LoadedModel.weights == "random"``), or raises
    MissingWeightsError when ``random_init`` is False (for callers that would save the weights).  The
    model is built from the config that was read, so a config file under another name than config.json
    still loads the weights beside it.  ``dtype`` defaults to :func:`config_dtype`.
    """
    source = resolve(name)
    config = load_config(source, trust_remote_code=trust_remote_code)
    auto = auto_class_for(config)
    dtype = dtype or config_dtype(config)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "dtype": dtype}
    notes: list[str] = []
    try:
        if dry_run:
            from accelerate import init_empty_weights

            with init_empty_weights():
                model = auto.from_config(config, **kwargs)
            _meta_safe_experts(model)
            weights = "meta"
        elif source.has_weights:
            model = _from_pretrained(auto, source.location, {**kwargs, "config": config})
            weights = "pretrained"
        elif source.kind == "builtin" and not hub_offline():
            try:
                model = _from_pretrained(auto, source.location, kwargs)
                weights = "pretrained"
            except ModelLoadError as e:
                _check_random_init(random_init, str(e))
                model = auto.from_config(config, **kwargs)
                weights = "random"
                notes.append(f"{e}; randomly initialised from the built-in config instead")
        else:
            _check_random_init(random_init, f"{name}: no weights found")
            model = auto.from_config(config, **kwargs)
            weights = "random"
            notes.append(f"{name}: no weights found; randomly initialised from its config")
    except ModelLoadError:
        raise
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, MemoryError) or "alloc" in str(e).lower():
            raise ModelLoadError(f"{name}: not enough memory to build the model (try --dry-run)") from e
        raise ModelLoadError(f"{name}: cannot build the model ({_one_line(e)})") from e
    except Exception as e:
        raise ModelLoadError(f"{name}: cannot build the model ({_one_line(e)})") from e
    model.train()
    return LoadedModel(model, source, weights, notes, dtype)


# The experts implementation a dry run gives the models whose experts run grouped_mm.
META_GROUPED_MM = "actpatch_meta_grouped_mm"


class _GroupedMMOnMeta(TorchFunctionMode):
    """torch._grouped_mm of meta tensors -> transformers' grouped_mm_fallback op, whose fake kernel takes
    any dtype (grouped_mm's own meta kernel takes only bfloat16) and which saves the same tensors for
    backward (input and weight)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        plain = kwargs.get("bias") is None and kwargs.get("out_dtype") is None and len(args) == 2
        if func is torch._grouped_mm and plain and args[0].is_meta and kwargs.get("offs") is not None:
            return torch.ops.transformers.grouped_mm_fallback(*args, kwargs["offs"])
        return func(*args, **kwargs)


def _meta_grouped_mm_experts(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
    from transformers.integrations import moe

    with _GroupedMMOnMeta():
        return moe.grouped_mm_experts_forward(self, *args, **kwargs)


def _meta_safe_experts(model: torch.nn.Module) -> None:
    """Let a meta model's grouped_mm experts (Mixtral, Qwen-MoE ...) run in any dtype, for dry runs in
    float32 / float16: their forward runs grouped_mm's fallback op on meta (:class:`_GroupedMMOnMeta`)."""
    get = getattr(model, "get_experts_implementation", None)
    if get is None or "grouped_mm" not in get().values():
        return
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(META_GROUPED_MM, _meta_grouped_mm_experts)
    model.set_experts_implementation(
        {k: META_GROUPED_MM if v == "grouped_mm" else v for k, v in get().items()}
    )


def _check_random_init(allowed: bool, why: str) -> None:
    if not allowed:
        raise MissingWeightsError(why)


def _from_pretrained(auto: Any, location: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    try:
        return auto.from_pretrained(location, **kwargs)
    except OSError as e:
        raise ModelLoadError(f"{location}: cannot load the weights ({_one_line(e)})") from e


__all__ = [
    "LoadedModel",
    "MissingWeightsError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelSource",
    "auto_class_for",
    "config_dtype",
    "config_from_dict",
    "hub_offline",
    "load_config",
    "load_model",
    "resolve",
]
