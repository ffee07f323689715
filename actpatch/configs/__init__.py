"""Offline ``config.json`` contents of popular models, so dry runs need no network.

Each file is named after the model's Hugging Face Hub id with ``/`` replaced by ``--``
(``meta-llama/Llama-3.1-8B`` -> ``meta-llama--Llama-3.1-8B.json``).  Lookups are case-insensitive and
also accept the ids the Hub moved some models to (``openai-community/gpt2`` -> ``gpt2``).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

# Newer Hub ids of models that the Hub moved into organisations.
ALIASES: dict[str, str] = {
    "openai-community/gpt2": "gpt2",
    "openai-community/gpt2-xl": "gpt2-xl",
    "google-bert/bert-base-uncased": "bert-base-uncased",
    "google-bert/bert-large-uncased": "bert-large-uncased",
    "FacebookAI/roberta-base": "roberta-base",
    "google-t5/t5-small": "t5-small",
}


def _files() -> dict[str, str]:
    """Built-in model id -> file name."""
    out = {}
    for entry in resources.files(__name__).iterdir():
        if entry.name.endswith(".json"):
            out[entry.name[: -len(".json")].replace("--", "/")] = entry.name
    return dict(sorted(out.items(), key=lambda kv: kv[0].lower()))


def available() -> list[str]:
    """The ids of the built-in configs, sorted case-insensitively."""
    return list(_files())


def canonical_name(name: str) -> str | None:
    """The built-in id that ``name`` refers to (case-insensitive, aliases allowed), or None."""
    files = _files()
    lowered = {k.lower(): k for k in files}
    for candidate in (name, ALIASES.get(name), *(v for k, v in ALIASES.items() if k.lower() == name.lower())):
        if candidate and candidate.lower() in lowered:
            return lowered[candidate.lower()]
    return None


def load(name: str) -> dict[str, Any]:
    """The ``config.json`` contents of a built-in model; KeyError if there is none."""
    canonical = canonical_name(name)
    if canonical is None:
        raise KeyError(name)
    text = resources.files(__name__).joinpath(_files()[canonical]).read_text(encoding="utf-8")
    return json.loads(text)


def describe(name: str) -> dict[str, Any]:
    """Id, model type, layers, hidden size, MLP width and activation of a built-in config."""
    from transformers import CONFIG_MAPPING

    data = load(name)
    config = CONFIG_MAPPING[data["model_type"]](**{k: v for k, v in data.items() if k != "model_type"})
    hidden = getattr(config, "hidden_size", None)
    width = next(
        (
            getattr(config, a)
            for a in ("intermediate_size", "n_inner", "ffn_hidden_size", "d_ff")
            if getattr(config, a, None)
        ),
        4 * hidden if hidden else None,
    )
    act = next(
        (
            getattr(config, a)
            for a in (
                "hidden_activation",
                "hidden_act",
                "activation_function",
                "activation",
                "feed_forward_proj",
            )
            if isinstance(getattr(config, a, None), str)
        ),
        "?",
    )
    return {
        "id": canonical_name(name),
        "model_type": data["model_type"],
        "layers": getattr(config, "num_hidden_layers", None),
        "hidden": hidden,
        "intermediate": width,
        "activation": act,
    }


__all__ = ["ALIASES", "available", "canonical_name", "describe", "load"]
