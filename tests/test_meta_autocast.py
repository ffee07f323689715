"""actpatch.meta_autocast: a dry run on meta under bf16 autocast's casts probes what a real run under
``torch.autocast`` saves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from tiny_models import tiny_model

import actpatch
from actpatch.analysis.probe import run_probe
from actpatch.meta_autocast import MetaAutocast


def test_meta_dry_run_projects_what_cpu_autocast_saves() -> None:
    """The tiny Llama (eager attention: the same ops under CPU and CUDA autocast), before and after."""
    real = tiny_model("llama")
    with init_empty_weights():
        meta = tiny_model("llama")
    with torch.autocast("cpu", torch.bfloat16):
        expected = actpatch.analyze(real, batch_size=2, seq_len=16).projector
    with MetaAutocast():
        got = actpatch.analyze(meta, batch_size=2, seq_len=16).projector
    plain = actpatch.analyze(meta, batch_size=2, seq_len=16).projector
    for shape in ((2, 16), (4, 40)):
        assert got(*shape) == pytest.approx(expected(*shape))
        assert plain(*shape)[0] != pytest.approx(expected(*shape)[0])


class _GroupedSdpa(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(8, 8 * 4)
        self.kv = torch.nn.Linear(8, 8 * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).float().view(b, s, 4, 8).transpose(1, 2)
        k, v = self.kv(x).float().view(b, s, 2, 8).transpose(1, 2).chunk(2, dim=1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def test_probes_grouped_sdpa_keeps_bf16_q_k_v() -> None:
    """The probe's own meta SDPA saves q, k, v itself: under MetaAutocast they are autocast's bf16 casts."""
    with torch.device("meta"):
        model = _GroupedSdpa()
        x = torch.randn(2, 16, 8)
    with MetaAutocast():
        saved = run_probe(model, (x,), {}, torch.float32).saved
    attention = {(s.where, s.nbytes) for s in saved if "scaled_dot_product_attention" in s.where}
    assert (" (scaled_dot_product_attention)", 2 * 4 * 16 * 8 * 2) in attention  # q in bf16
    assert not any(n == 2 * 4 * 16 * 8 * 4 for _, n in attention)  # no float32 q


_LIGER_VS_META = """
import torch, actpatch
from accelerate import init_empty_weights
from liger_kernel.transformers import apply_liger_kernel_to_llama
from tiny_models import tiny_model
from actpatch import fit
from actpatch.meta_autocast import MetaAutocast
from actpatch.meta_fused_loss import MetaFusedLoss

real = tiny_model("llama")
apply_liger_kernel_to_llama(model=real, rope=False, rms_norm=False, swiglu=False)
with torch.autocast("cpu", torch.bfloat16):
    liger = fit.running_activations(real, 2)
with init_empty_weights():
    meta = tiny_model("llama")
with MetaAutocast(), MetaFusedLoss(meta.get_output_embeddings().weight):
    dry = actpatch.analyze(meta, batch_size=2, seq_len=16).projector
with MetaAutocast():
    eager = actpatch.analyze(meta, batch_size=2, seq_len=16).projector
for shape in ((2, 16), (4, 40)):
    assert round(dry(*shape)[0]) == round(liger(*shape)[0]) != round(eager(*shape)[0]), shape
print("ok")
"""


def test_meta_fused_loss_saves_what_ligers_fused_linear_cross_entropy_saves() -> None:
    """Liger's fused linear cross entropy (run by Triton's interpreter on a CPU, in a fresh process) under
    CPU autocast, against the tiny Llama's eager loss head on meta under MetaFusedLoss: the same bytes."""
    pytest.importorskip("liger_kernel")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{root}{os.pathsep}{root / 'tests'}")
    proc = subprocess.run([sys.executable, "-c", _LIGER_VS_META], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
