"""The whole integration: patch the model, then hand it to the Trainer as usual (offline, tiny BERT)."""

import tempfile

import torch
from transformers import BertConfig, BertForMaskedLM, Trainer, TrainingArguments

import actpatch

cfg = BertConfig(
    vocab_size=2048, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256
)
model = BertForMaskedLM(cfg)
print(actpatch.patch_model(model, batch_size=8, seq_len=32))  # <- the one extra line

ids = torch.randint(5, 2048, (64, 32))
data = [{"input_ids": x, "labels": x} for x in ids]
out = tempfile.mkdtemp(prefix="actpatch-example-")
args = TrainingArguments(out, max_steps=20, per_device_train_batch_size=8, report_to=[])
Trainer(model=model, args=args, train_dataset=data).train()
model.save_pretrained(f"{out}/final")  # an ordinary checkpoint: the same files as unpatched
