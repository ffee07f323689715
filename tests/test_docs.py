"""The documentation site builds with ``mkdocs build --strict``: every nav page exists, every link and
anchor resolves, every snippet file is there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for page in ("index.html", "how-it-works/index.html", "api/index.html", "workflows/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    index = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert "the one extra line" in index  # examples/patch_before_trainer.py was inlined by the snippet
    assert "--8&lt;--" not in index


def test_doc_figures_exist():
    for img in ("accuracy.png", "minilm_loss.png", "llama_loss.png"):
        assert (ROOT / "docs" / "img" / img).is_file(), img
