"""actpatch.analysis.inputs: the synthesised training batch works for default configs, not only for the
tuned configs of tiny_models (whose token ids are all set)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import actpatch

_BART_LIKE = dict(
    encoder_layers=1,
    decoder_layers=1,
    d_model=16,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=32,
    decoder_ffn_dim=32,
)
_T5_LIKE = dict(num_layers=1, num_decoder_layers=1, num_heads=2, d_model=16, d_kv=8, d_ff=32)

# Each family's default config (its token ids and vocabulary untouched), with tiny dimensions.
SEQ2SEQ_DEFAULTS = {
    "t5": lambda: tf.T5Config(**_T5_LIKE),  # has no decoder_start_token_id at all
    "mt5": lambda: tf.MT5Config(**_T5_LIKE),
    "bart": lambda: tf.BartConfig(**_BART_LIKE),
    "pegasus": lambda: tf.PegasusConfig(**_BART_LIKE),
    "marian": lambda: tf.MarianConfig(**_BART_LIKE),
}


@pytest.mark.parametrize("family", sorted(SEQ2SEQ_DEFAULTS))
def test_default_seq2seq_configs_patch(family):
    torch.manual_seed(0)
    model = tf.AutoModelForSeq2SeqLM.from_config(SEQ2SEQ_DEFAULTS[family]())
    model.train()
    report = actpatch.patch_model(model, seq_len=8)
    assert report.patched_sites, family
    assert report.projection.saved_bytes > 0
