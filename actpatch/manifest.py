"""Save a patched model, and patch it again when it is loaded.

A patch lives in the modules, not in the weights: ``save_pretrained`` writes the same files as for the
unpatched model.  :func:`save_patched` therefore adds ``actpatch_manifest.json`` next to them, listing
the module paths that were patched and with which activation, and writes the whole directory
atomically.  :func:`load_patched` loads such a directory with ``from_pretrained`` and re-applies the
patch; :func:`reapply` does the same to a model you loaded yourself::

    import actpatch
    model = actpatch.load_patched("out/llama-patched", dtype=torch.bfloat16)
    # or, loading it yourself:
    model = AutoModelForCausalLM.from_pretrained("out/llama-patched")
    actpatch.reapply(model, "out/llama-patched")

Re-applying runs :func:`actpatch.patch_model` restricted to the recorded paths and checks that exactly
those paths end up patched (:class:`ManifestError` otherwise, with the model left unpatched).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

MANIFEST_NAME = "actpatch_manifest.json"
FORMAT = "actpatch-manifest"
VERSION = 1


class ManifestError(Exception):
    """A manifest is missing or malformed, or re-applying it did not patch the recorded sites."""


class OutputError(Exception):
    """The output directory cannot be written; nothing was left behind."""


class OutputExistsError(OutputError):
    """The output path exists and cannot be replaced: not an empty directory, or a mount point."""


@dataclass
class ManifestSite:
    """One patched site: its module path, the activation, the module class swapped in (for a gated or
    norm site: the module's own class, patched in place) and the site's kind."""

    path: str
    activation: str
    module: str | None = None
    kind: str = "activation"


@dataclass
class Manifest:
    """What :func:`save_patched` records about a patch."""

    sites: list[ManifestSite]
    model: str = ""
    model_class: str = ""
    include: list[str] | None = None
    exclude: list[str] | None = None
    actpatch_version: str = ""
    format: str = FORMAT
    version: int = VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self.sites]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        head = {k: d.pop(k) for k in ("format", "version", "actpatch_version", "model", "model_class")}
        return {**head, **d, "sites": [asdict(s) for s in self.sites]}


def _module_class(model: torch.nn.Module, path: str) -> str | None:
    try:
        m = model.get_submodule(path)
    except AttributeError:
        return None
    return f"{type(m).__module__}.{type(m).__qualname__}"


def build_manifest(
    model: torch.nn.Module,
    report: Any,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> Manifest:
    """The manifest of ``model`` as patched according to ``report`` (a PatchReport); sites of a contextual
    kind (shared autocast casts) are not recorded: ``patch_model`` under the same context finds them."""
    from . import __version__
    from .kinds import KINDS

    contextual = {k.name for k in KINDS if getattr(k, "contextual", False)}
    sites = [
        ManifestSite(s.path, s.activation, _module_class(model, s.path), s.kind)
        for s in report.sites
        if s.patched and s.kind not in contextual
    ]
    return Manifest(
        sites=sites,
        model=str(getattr(report, "model", "")),
        model_class=type(model).__name__,
        include=list(include) if include else None,
        exclude=list(exclude) if exclude else None,
        actpatch_version=__version__,
    )


def write_manifest(manifest: Manifest, directory: str | os.PathLike[str]) -> Path:
    """Write ``manifest`` as ``directory/actpatch_manifest.json``; returns the file."""
    file = Path(directory) / MANIFEST_NAME
    file.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8")
    return file


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read a manifest from its file or from the directory that holds it."""
    file = Path(path)
    if file.is_dir():
        file = file / MANIFEST_NAME
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ManifestError(f"{file}: no actpatch manifest (was the model saved with actpatch?)") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{file}: unreadable manifest ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ManifestError(f"{file}: not an actpatch manifest")
    if data.get("version") != VERSION:
        raise ManifestError(
            f"{file}: manifest version {data.get('version')!r}, this actpatch reads {VERSION}"
        )
    try:
        sites = [ManifestSite(**s) for s in data["sites"]]
        known = {
            k: data[k]
            for k in ("model", "model_class", "include", "exclude", "actpatch_version")
            if k in data
        }
        return Manifest(sites=sites, extra=data.get("extra", {}), **known)
    except (KeyError, TypeError) as e:
        raise ManifestError(f"{file}: malformed manifest ({e})") from e


def _exact(path: str) -> str:
    """An fnmatch pattern matching exactly ``path``."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in path)


def reapply(
    model: torch.nn.Module,
    manifest: Manifest | str | os.PathLike[str],
    *,
    strict: bool = True,
    **patch_kwargs: Any,
) -> Any:
    """Patch ``model`` at the sites recorded in ``manifest`` (a Manifest, its file or its directory).

    Runs :func:`actpatch.patch_model` with ``include`` set to exactly the recorded paths and
    each kind's option (``gated``, ``norms``, ...) set when a recorded site is of that kind (other keyword
    arguments are passed on; the projection defaults to a short sequence, or to the shape of
    ``example_inputs``) and returns its PatchReport.
    With ``strict`` (the default), a patched set that differs from the recorded one raises
    ManifestError and the model is unpatched again.
    """
    from . import patch_model, unpatch_model
    from .kinds import KINDS

    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest)
    for kind in KINDS:
        if kind.option:
            patch_kwargs.setdefault(kind.option, any(s.kind == kind.name for s in manifest.sites))
    if patch_kwargs.get("example_inputs") is None:
        patch_kwargs.setdefault("seq_len", 16)
    if not manifest.sites:
        return patch_model(model, include=[], **patch_kwargs)
    report = patch_model(model, include=[_exact(p) for p in manifest.paths], **patch_kwargs)
    patched = {s.path for s in report.sites if s.patched}
    expected = set(manifest.paths)
    if strict and patched != expected:
        unpatch_model(model)
        missing = sorted(expected - patched)
        extra = sorted(patched - expected)
        raise ManifestError(
            f"re-applying the manifest patched {len(patched)} of {len(expected)} recorded sites"
            + (
                f"; not patched: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
                if missing
                else ""
            )
            + (f"; unexpected: {', '.join(extra[:5])}" if extra else "")
        )
    return report


def load_patched(path: str | os.PathLike[str], **from_pretrained_kwargs: Any) -> torch.nn.Module:
    """Load a directory written by :func:`save_patched` (or ``actpatch convert --output``), patched again.

    The Auto class is chosen from the saved config as ``actpatch convert`` does; keyword arguments go
    to ``from_pretrained`` (``dtype=``, ``device_map=``, ``trust_remote_code=`` ...).
    """
    from transformers import AutoConfig

    from .loading import auto_class_for

    manifest = read_manifest(path)
    trust = bool(from_pretrained_kwargs.get("trust_remote_code", False))
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    model = auto_class_for(config).from_pretrained(path, **from_pretrained_kwargs)
    reapply(model, manifest)
    return model


def _target(out: Path) -> Path:
    """The directory the rename will replace: ``out`` with symlinks resolved, so that a symlink to an
    empty directory is written through (its target replaced) rather than replaced itself."""
    try:
        return out.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise OutputError(f"{out}: cannot resolve it ({e})") from e


def check_output_dir(directory: str | os.PathLike[str]) -> None:
    """Raise OutputExistsError / OutputError now if ``directory`` could not receive a saved model.

    Checks what :func:`save_patched`'s final steps need: an empty directory there may be removed (not
    a mount point, which cannot be), and the nearest existing parent of its (symlink-resolved) path is
    a writable directory, for the partial sibling directory and the rename.
    """
    out = Path(directory).expanduser()
    target = _target(out)
    try:
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise OutputExistsError(f"{out}: already exists and is not an empty directory")
    except PermissionError as e:
        raise OutputError(f"{out}: cannot read it ({e.strerror})") from e
    if target.exists() and os.path.ismount(target):
        raise OutputExistsError(
            f"{out}: is a mount point, which cannot be replaced; give a directory inside it"
        )
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{out}: cannot create it, {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{out}: cannot create it, {parent} is not writable")


def save_patched(
    model: torch.nn.Module,
    directory: str | os.PathLike[str],
    report: Any,
    *,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    **save_kwargs: Any,
) -> Path:
    """``model.save_pretrained`` plus the manifest, into ``directory``, all or nothing.

    Everything is written into a hidden sibling directory first and renamed into place at the end;
    on any error the partial directory (and any parent directory created for it) is removed, and
    OutputError is raised for file-system failures.  ``directory`` must not exist or be an empty
    directory (not a mount point); a symlink to one is written through.
    """
    out = Path(directory).expanduser()
    check_output_dir(out)
    target = _target(out)
    manifest = build_manifest(model, report, include=include, exclude=exclude)
    parent = target.parent
    created: list[Path] = []
    probe = parent
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    tmp: Path | None = None
    done = False
    try:
        try:
            parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.actpatch-partial-", dir=parent))
            umask = os.umask(0)
            os.umask(umask)
            tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the output's mode
        except OSError as e:
            raise OutputError(f"{out}: cannot create it ({e.strerror or e})") from e
        try:
            model.save_pretrained(tmp, **save_kwargs)
            write_manifest(manifest, tmp)
            if target.exists():
                target.rmdir()
            os.replace(tmp, target)
        except OSError as e:
            raise OutputError(f"{out}: cannot write the model ({e.strerror or e})") from e
        done = True
    finally:
        if not done:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            for d in created:  # innermost first
                with contextlib.suppress(OSError):
                    d.rmdir()
    return out


__all__ = [
    "MANIFEST_NAME",
    "Manifest",
    "ManifestError",
    "ManifestSite",
    "OutputError",
    "OutputExistsError",
    "build_manifest",
    "check_output_dir",
    "load_patched",
    "read_manifest",
    "reapply",
    "save_patched",
    "write_manifest",
]
