"""Real English text that is available offline everywhere: the docstrings of Python's standard library.

The corpus is read with ``ast`` from the .py files of the running interpreter's stdlib (nothing is
imported or executed), in a fixed order, so every run and every process sees the same text.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

_PACKAGES = ("json", "email", "http", "logging", "asyncio", "unittest", "importlib", "xml", "concurrent")
_MODULE_LIST = """
    argparse collections/__init__ functools inspect pathlib subprocess threading typing dataclasses enum
    shutil tarfile zipfile random statistics decimal fractions datetime calendar textwrap difflib csv
    configparser socket ssl tempfile glob fnmatch heapq bisect contextlib abc copy pickle string operator
    pprint traceback warnings weakref queue sched selectors signal smtplib ftplib imaplib poplib mailbox
    mimetypes base64 gzip bz2 lzma hashlib hmac secrets uuid ipaddress codecs locale gettext getopt cmd
    shlex doctest pdb profile timeit trace tokenize ast dis pydoc
"""
_MODULES = _MODULE_LIST.split()


def _files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [root / f"{m}.py" for m in _MODULES]
    for pkg in _PACKAGES:
        files.extend(sorted((root / pkg).rglob("*.py")))
    return [f for f in files if f.is_file()]


def docstrings(min_chars: int = 200) -> list[str]:
    """Docstrings (modules, classes, functions) of at least ``min_chars`` characters, whitespace folded."""
    out: list[str] = []
    for file in _files():
        try:
            tree = ast.parse(file.read_text(encoding="utf-8", errors="replace"))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    out.append(" ".join(doc.split()))
    return out


if __name__ == "__main__":
    texts = docstrings()
    print(f"{len(texts)} docstrings, {sum(map(len, texts)):,} characters")
    print(texts[0][:300])
