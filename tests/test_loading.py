"""actpatch.loading and actpatch.configs: resolving MODEL, validating configs, building models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_LLAMA

from actpatch import configs, loading
from actpatch.loading import ModelLoadError, ModelNotFoundError


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache


def _config_dir(tmp_path: Path, config: dict | str, name: str = "model") -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return d


REQUIRED = [
    "gpt2",
    "gpt2-xl",
    "bert-base-uncased",
    "bert-large-uncased",
    "roberta-base",
    "meta-llama/Llama-3.1-8B",
    "meta-llama/Llama-3.1-70B",
    "mistralai/Mistral-7B-v0.1",
    "mistralai/Mixtral-8x7B-v0.1",
    "Qwen/Qwen2.5-7B",
    "google/gemma-2-9b",
    "microsoft/phi-2",
    "tiiuae/falcon-7b",
    "EleutherAI/pythia-1b",
]

# (layers, hidden, MLP width, activation) of the real models.
REAL_SHAPES = {
    "gpt2": (12, 768, 3072, "gelu_new"),
    "gpt2-xl": (48, 1600, 6400, "gelu_new"),
    "bert-base-uncased": (12, 768, 3072, "gelu"),
    "bert-large-uncased": (24, 1024, 4096, "gelu"),
    "roberta-base": (12, 768, 3072, "gelu"),
    "meta-llama/Llama-3.1-8B": (32, 4096, 14336, "silu"),
    "meta-llama/Llama-3.1-70B": (80, 8192, 28672, "silu"),
    "mistralai/Mistral-7B-v0.1": (32, 4096, 14336, "silu"),
    "mistralai/Mixtral-8x7B-v0.1": (32, 4096, 14336, "silu"),
    "Qwen/Qwen2.5-7B": (28, 3584, 18944, "silu"),
    "google/gemma-2-9b": (42, 3584, 14336, "gelu_pytorch_tanh"),
    "microsoft/phi-2": (32, 2560, 10240, "gelu_new"),
    "tiiuae/falcon-7b": (32, 4544, 18176, "gelu"),
    "EleutherAI/pythia-1b": (16, 2048, 8192, "gelu"),
}

# Parameter counts (meta device, output embeddings counted separately from input ones).
PARAMS = {
    "meta-llama/Llama-3.1-8B": 8_030_261_248,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "mistralai/Mixtral-8x7B-v0.1": 46_702_792_704,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "microsoft/phi-2": 2_779_683_840,
    "EleutherAI/pythia-1b": 1_011_781_632,
}


def test_all_required_builtins_are_shipped_with_their_real_shapes():
    assert set(REQUIRED) <= set(configs.available())
    for name, (layers, hidden, width, act) in REAL_SHAPES.items():
        d = configs.describe(name)
        assert (d["layers"], d["hidden"], d["intermediate"], d["activation"]) == (
            layers,
            hidden,
            width,
            act,
        ), name


def test_builtin_lookup_is_case_insensitive_and_knows_moved_ids():
    assert configs.canonical_name("META-LLAMA/llama-3.1-8b") == "meta-llama/Llama-3.1-8B"
    assert configs.canonical_name("openai-community/gpt2") == "gpt2"
    assert configs.canonical_name("nobody/nothing") is None
    with pytest.raises(KeyError):
        configs.load("nobody/nothing")


@pytest.mark.parametrize("name", REQUIRED)
def test_every_builtin_builds_on_meta(name):
    loaded = loading.load_model(name, dry_run=True, dtype=torch.bfloat16)
    params = list(loaded.model.parameters())
    assert loaded.weights == "meta" and loaded.source.kind == "builtin"
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in params)
    assert loaded.model.training
    if name in PARAMS:
        assert sum(p.numel() for p in params) == PARAMS[name]


@pytest.mark.parametrize(
    ("name", "cls", "auto"),
    [
        ("gpt2", "GPT2LMHeadModel", "AutoModelForCausalLM"),
        ("bert-base-uncased", "BertForMaskedLM", "AutoModelForMaskedLM"),
        ("roberta-base", "RobertaForMaskedLM", "AutoModelForMaskedLM"),
        ("t5-small", "T5ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
    ],
)
def test_auto_class_follows_the_architecture(name, cls, auto):
    config = loading.load_config(name)
    assert loading.auto_class_for(config).__name__ == auto
    assert type(loading.load_model(name, dry_run=True).model).__name__ == cls


def test_auto_class_without_architectures():
    from transformers import BertConfig, ViTConfig

    assert loading.auto_class_for(BertConfig()).__name__ == "AutoModelForMaskedLM"
    assert loading.auto_class_for(ViTConfig()).__name__ == "AutoModelForImageClassification"


def test_local_dir_without_weights_is_random_init(tmp_path):
    d = _config_dir(tmp_path, TINY_LLAMA)
    source = loading.resolve(str(d))
    assert (source.kind, source.has_weights) == ("local", False)
    loaded = loading.load_model(str(d))
    assert loaded.weights == "random" and loaded.notes
    assert next(loaded.model.parameters()).device.type == "cpu"


def test_local_dir_with_weights_loads_them(tmp_path):
    d = _config_dir(tmp_path, TINY_LLAMA)
    first = loading.load_model(str(d)).model
    saved = tmp_path / "saved"
    first.save_pretrained(saved)
    loaded = loading.load_model(str(saved), dtype=torch.bfloat16)
    assert loaded.weights == "pretrained" and loaded.model.training
    a, b = first.state_dict(), loaded.model.state_dict()
    assert all(torch.equal(a[k].to(torch.bfloat16), b[k]) for k in a)


def test_config_file_path_is_accepted(tmp_path):
    d = _config_dir(tmp_path, TINY_LLAMA)
    assert loading.load_config(str(d / "config.json")).hidden_size == 32


def test_config_file_path_stands_for_its_directory(tmp_path):
    d = _config_dir(tmp_path, TINY_LLAMA)
    loading.load_model(str(d)).model.save_pretrained(d)
    (d / "config.json").rename(d / "tiny.json")  # from_pretrained(d) alone would find no config
    source = loading.resolve(str(d / "tiny.json"))
    assert (source.kind, source.location, source.has_weights) == ("local", str(d), True)
    loaded = loading.load_model(str(d / "tiny.json"), random_init=False)
    assert loaded.weights == "pretrained" and not loaded.notes


def test_no_weights_without_random_init_raises(tmp_path):
    d = _config_dir(tmp_path, TINY_LLAMA)
    with pytest.raises(loading.MissingWeightsError, match="no weights found"):
        loading.load_model(str(d), random_init=False)
    with pytest.raises(loading.MissingWeightsError, match="no weights found"):
        loading.load_model("gpt2", random_init=False)  # a built-in, offline
    assert loading.load_model(str(d), dry_run=True, random_init=False).weights == "meta"


@pytest.mark.parametrize("name", ["./missing", "/no/such/dir", "a/b/c", "missing.json"])
def test_missing_path_is_not_found(name):
    with pytest.raises(ModelNotFoundError, match="no such file or directory"):
        loading.resolve(name)


def test_unknown_id_offline_is_not_found():
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        loading.resolve("nobody/nothing-like-this")


def test_dir_without_config_is_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        loading.resolve(str(tmp_path))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ('{"model_type": "llama", ', "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ({"hidden_size": 32}, "no 'model_type'"),
        ({**TINY_LLAMA, "hidden_size": "big"}, "hidden_size"),
        ({**TINY_LLAMA, "num_hidden_layers": 2.5}, "num_hidden_layers"),
        ({"model_type": "no-such-arch", "hidden_size": 8}, "not known to transformers"),
        ({"model_type": "no-such-arch", "auto_map": {"AutoConfig": "x.Y"}}, "--trust-remote-code"),
    ],
)
def test_bad_configs_raise_one_line_errors(tmp_path, config, message):
    d = _config_dir(tmp_path, config)
    with pytest.raises(ModelLoadError, match=message) as info:
        loading.load_model(str(d), dry_run=True)
    assert not isinstance(info.value, ModelNotFoundError)
    assert "\n" not in str(info.value)


def _small_mixtral(tmp_path: Path) -> Path:
    return _config_dir(tmp_path, {**configs.load("mistralai/Mixtral-8x7B-v0.1"), "num_hidden_layers": 2})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_moe_dry_run_probes_in_every_dtype(tmp_path, dtype):
    """grouped_mm's meta kernel takes only bfloat16: a dry run's experts run its fallback op instead."""
    import actpatch

    model = loading.load_model(str(_small_mixtral(tmp_path)), dry_run=True, dtype=dtype).model
    report = actpatch.analyze(model, seq_len=64, dtype=dtype)
    assert {s.path for s in report.patched_sites} >= {
        "model.layers.0.mlp.experts",
        "model.layers.1.mlp.experts",
    }
    assert report.projection.saved_bytes > 0


def test_moe_dry_run_projects_what_grouped_mm_saves(tmp_path):
    """In bfloat16, where grouped_mm's meta kernel runs, the fallback op saves the same activations."""
    import transformers
    from accelerate import init_empty_weights

    import actpatch

    model_dir = str(_small_mixtral(tmp_path))
    with init_empty_weights():
        grouped = transformers.AutoModelForCausalLM.from_config(
            loading.load_config(model_dir), dtype=torch.bfloat16
        ).train()
    dry = loading.load_model(model_dir, dry_run=True, dtype=torch.bfloat16).model
    assert dry.get_experts_implementation() == {"": loading.META_GROUPED_MM}
    assert grouped.get_experts_implementation() == {"": "grouped_mm"}
    expected, got = (actpatch.analyze(m, seq_len=64).projection for m in (grouped, dry))
    assert got.saved_bytes == expected.saved_bytes
    # grouped_mm also saves its group offsets (tens of bytes per layer); the fallback keeps them on ctx
    assert (
        0
        <= expected.activation_bytes_before - got.activation_bytes_before
        <= 64 * dry.config.num_hidden_layers
    )
