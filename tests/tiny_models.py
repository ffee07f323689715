"""Tiny random-weight models of many transformers families (built from config classes, no download),
and an independent count of the bytes autograd saves in one forward."""

from __future__ import annotations

import torch
import transformers as tf
from torch import nn

from actpatch import measure

# A tiny Llama config.json, for tests that write a local model directory.
TINY_LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 64,
}

# The blocks of a 2-layer Llama a device_map places (accelerate's dispatch_model), in order.
LLAMA_BLOCKS = (
    "model.embed_tokens", "model.rotary_emb", "model.layers.0", "model.layers.1", "model.norm", "lm_head"
)  # fmt: skip

COMMON = dict(num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, vocab_size=96)
LLAMA_LIKE = dict(COMMON, hidden_size=32, intermediate_size=64, num_key_value_heads=2)


def _config(family: str) -> tuple[object, type]:
    c = tf.AutoModelForCausalLM
    m = tf.AutoModelForMaskedLM
    s2s = tf.AutoModelForSeq2SeqLM
    table: dict[str, tuple[object, type]] = {
        "gpt2": (tf.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=96), c),
        "bert": (tf.BertConfig(**COMMON, hidden_size=32, intermediate_size=64), m),
        "roberta": (tf.RobertaConfig(**COMMON, hidden_size=32, intermediate_size=64), m),
        "distilbert": (tf.DistilBertConfig(n_layers=2, n_heads=4, dim=32, hidden_dim=64, vocab_size=96), m),
        "vit": (
            tf.ViTConfig(
                num_hidden_layers=2,
                num_attention_heads=4,
                hidden_size=32,
                intermediate_size=64,
                image_size=16,
                patch_size=4,
                num_labels=3,
            ),
            tf.AutoModelForImageClassification,
        ),
        "clip": (
            tf.CLIPConfig(
                text_config=dict(COMMON, hidden_size=32, intermediate_size=64),
                vision_config=dict(
                    num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=64
                )
                | dict(image_size=16, patch_size=4),
                projection_dim=16,
            ),
            tf.CLIPModel,
        ),
        "t5": (
            tf.T5Config(
                num_layers=2,
                num_heads=4,
                d_model=32,
                d_kv=8,
                d_ff=64,
                vocab_size=96,
                feed_forward_proj="gated-gelu",
                dropout_rate=0.0,
                decoder_start_token_id=0,
                pad_token_id=0,
            ),
            s2s,
        ),
        "whisper": (
            tf.WhisperConfig(
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=4,
                decoder_attention_heads=4,
                d_model=32,
                encoder_ffn_dim=64,
                decoder_ffn_dim=64,
                num_mel_bins=8,
                max_source_positions=16,
                max_target_positions=64,
                vocab_size=96,
                decoder_start_token_id=1,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                suppress_tokens=None,
                begin_suppress_tokens=None,
            ),
            tf.WhisperForConditionalGeneration,
        ),
        "bloom": (tf.BloomConfig(n_layer=2, n_head=4, hidden_size=32, vocab_size=96), c),
        "falcon": (tf.FalconConfig(**COMMON, hidden_size=32), c),
        "gpt_neox": (tf.GPTNeoXConfig(**COMMON, hidden_size=32, intermediate_size=64), c),
        "gptj": (
            tf.GPTJConfig(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=96, rotary_dim=4),
            c,
        ),
        "phi": (tf.PhiConfig(**COMMON, hidden_size=32, intermediate_size=64), c),
        "phi3": (tf.Phi3Config(**LLAMA_LIKE, pad_token_id=0), c),
        "llama": (tf.LlamaConfig(**LLAMA_LIKE), c),
        "mistral": (tf.MistralConfig(**LLAMA_LIKE), c),
        "mixtral": (tf.MixtralConfig(**LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2), c),
        "qwen2": (tf.Qwen2Config(**LLAMA_LIKE), c),
        "qwen2_moe": (
            tf.Qwen2MoeConfig(
                **LLAMA_LIKE,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=64,
            ),
            c,
        ),
        "qwen3_moe": (
            tf.Qwen3MoeConfig(**LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24),
            c,
        ),
        "gemma": (tf.GemmaConfig(**LLAMA_LIKE, head_dim=8), c),
        "gemma2": (tf.Gemma2Config(**LLAMA_LIKE, head_dim=8), c),
        "starcoder2": (tf.Starcoder2Config(**LLAMA_LIKE), c),
        "opt": (
            tf.OPTConfig(
                num_hidden_layers=2,
                num_attention_heads=4,
                hidden_size=32,
                ffn_dim=64,
                word_embed_proj_dim=32,
                max_position_embeddings=64,
                vocab_size=96,
            ),
            c,
        ),
        "mpt": (
            tf.MptConfig(n_layers=2, n_heads=4, d_model=32, expansion_ratio=2, max_seq_len=64, vocab_size=96),
            c,
        ),
        "modernbert": (
            tf.ModernBertConfig(
                **COMMON,
                hidden_size=32,
                intermediate_size=64,
                global_attn_every_n_layers=1,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
                cls_token_id=1,
                sep_token_id=2,
            ),
            m,
        ),
        "deepseek_v3": (
            tf.DeepseekV3Config(
                **dict(LLAMA_LIKE, num_hidden_layers=3, num_key_value_heads=4),
                moe_intermediate_size=32,
                n_routed_experts=4,
                n_shared_experts=1,
                num_experts_per_tok=2,
                n_group=1,
                topk_group=1,
                first_k_dense_replace=1,
                kv_lora_rank=16,
                q_lora_rank=16,
                qk_rope_head_dim=8,
                qk_nope_head_dim=8,
                v_head_dim=8,
            ),
            c,
        ),
    }
    return table[family]


FAMILIES = [
    "gpt2",
    "bert",
    "roberta",
    "distilbert",
    "vit",
    "clip",
    "t5",
    "whisper",
    "bloom",
    "falcon",
    "gpt_neox",
    "gptj",
    "phi",
    "phi3",
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen2_moe",
    "gemma",
    "gemma2",
    "starcoder2",
    "opt",
    "mpt",
    "modernbert",
    "deepseek_v3",
]


def tiny_config(family: str):
    return _config(family)[0]


def tiny_model(family: str, seed: int = 0, attn: str = "eager") -> nn.Module:
    """A 2-layer (deepseek_v3: 3) random-weight model of ``family`` in training mode, float32."""
    config, auto = _config(family)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = auto.from_config(config) if hasattr(auto, "from_config") else auto(config)
    return model.train()


def saved_bytes(model: nn.Module, kwargs: dict) -> tuple[int, torch.Tensor]:
    """(bytes of unique non-parameter storages autograd saves in ``model(**kwargs)``, the loss: the output's,
    or the output itself)."""
    nbytes, out = measure.saved_bytes(model, kwargs)
    return nbytes, out if isinstance(out, torch.Tensor) else out.loss
