"""The offline dry runs that README.md and docs/cli.md show are run, and the lines they show must be what
the CLI prints now, on an 80-column terminal: a doc example cannot go stale.

In a ```console block, ``$ actpatch ...`` is a command and the lines after it (up to the next ``$``)
are lines of its output, in order (``...`` stands for lines left out); after a ``--json`` command they
are a JSON object whose keys must match, its ``sites`` a subset of the real ones.  ``actpatch`` commands
in ```bash blocks show no output: they must succeed.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from actpatch.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/cli.md")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


@dataclass
class Example:
    """A documented command: where it is shown, its environment and arguments, the output lines shown."""

    where: str
    env: dict[str, str]
    args: list[str]
    shown: list[str] = field(default_factory=list)


def _command(line: str, where: str) -> Example | None:
    """``[VAR=value ...] actpatch ARGS [| filter]`` as an Example; None for anything else."""
    words = shlex.split(line.split(" | ")[0])
    env = {}
    while words and "=" in words[0]:
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return Example(where, env, words[1:]) if words[:1] == ["actpatch"] else None


def _examples(doc: str) -> list[Example]:
    found = []
    for lang, body in _FENCE.findall((ROOT / doc).read_text(encoding="utf-8")):
        for line in body.splitlines():
            if lang == "console" and line.startswith("$ "):
                found.append(_command(line[2:], doc))
            elif lang == "console" and found and found[-1] is not None:
                found[-1].shown.append(line)
            elif lang == "bash":
                found += [_command(part.strip(), doc) for part in line.split("&&")]
    return [e for e in found if e is not None]


def _offline(example: Example) -> bool:
    return example.args[:1] == ["models"] or "--dry-run" in example.args


EXAMPLES = [e for doc in DOCS for e in _examples(doc) if _offline(e)]
_RUNS: dict[str, object] = {}  # a command shown in several places runs once


def test_the_docs_show_offline_examples():
    shown = {" ".join(e.args) for e in EXAMPLES if e.shown}
    assert "convert meta-llama/Llama-3.1-8B --dry-run --batch-size 1 --seq-len 4096 --dtype bfloat16" in shown
    assert any("--json" in e.args for e in EXAMPLES if e.shown)
    assert {e.where for e in EXAMPLES if e.shown} == set(DOCS)


def _check_json(shown: list[str], stdout: str) -> None:
    expected, actual = json.loads("\n".join(shown)), json.loads(stdout)
    real_sites = {s["path"]: s for s in actual["sites"]}
    for key, value in expected.items():
        if key == "sites":
            assert [real_sites.get(s["path"]) for s in value] == value
        else:
            assert actual[key] == value, key


def _check_lines(shown: list[str], output: str) -> None:
    """Each shown line (but ``...``) is an output line, in the order shown."""
    actual = [line.strip() for line in output.splitlines()]
    at = 0
    for line in (line.strip() for line in shown if line.strip() != "..."):
        assert line in actual[at:], f"{line!r} not in the output:\n{output}"
        at = actual.index(line, at) + 1


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: f"{e.where}: {' '.join(e.args)}")
def test_documented_output_is_what_the_cli_prints(example, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    monkeypatch.setenv("COLUMNS", "80")  # what a default terminal shows
    key = shlex.join([*(f"{k}={v}" for k, v in example.env.items()), *example.args])
    if key not in _RUNS:
        _RUNS[key] = CliRunner().invoke(app, example.args, env=example.env)
    result = _RUNS[key]
    fails = any(line.startswith("actpatch: error:") for line in example.shown)
    assert (result.exit_code != 0) == fails, result.output
    if "--json" in example.args and example.shown:
        _check_json(example.shown, result.stdout)
    else:
        _check_lines(example.shown, result.stdout + result.stderr)
