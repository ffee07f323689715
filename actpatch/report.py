"""What :func:`actpatch.analyze` and :func:`actpatch.patch_model` return.

Contract (the CLI and the manifest rely on it; ``to_dict()`` returns exactly these keys)::

    PatchReport  model: str            config._name_or_path, else the model's class name
                 dry_run: bool         True when the model is on the meta device (no weights)
                 sites: list[Site]
                 projection: Projection
    Site         path: str             module path (e.g. "model.layers.3.mlp.act_fn"); for activations that
                                       cannot be swapped, "<calling module path>:<what was called>#<n>"
                 activation: str       "gelu", "gelu_tanh", "silu", "quick_gelu", or the name of an
                                       activation actpatch cannot invert ("relu", "relu2", a class name, ...)
                 consumer: str | None  the op that saves its output ("<module path> (<op>)"), else the op
                                       that uses it, else None
                 patched: bool         patched (for analyze: would be patched by patch_model)
                 reason: str | None    why not, when not patched
                 saved_bytes_per_token: int   bytes of saved activations freed per token (batch x seq
                                       position) at the projection's dtype, 0 when not patched
                 kind: str             "activation" (the activation module is swapped), "gated" (path
                                       is a gated MLP whose act(gate) * up is fused), "norm" (path is an
                                       RMSNorm that keeps x and 1/rms; activation "rms_norm") or
                                       "dropout" (a dropout swapped for one keeping its mask as bits;
                                       activation "dropout")
    Projection   batch_size: int, seq_len: int, dtype: str ("bfloat16")
                 activation_bytes_before: int   bytes saved for backward by one forward (parameters
                                                excluded) at that shape and dtype, unpatched
                 activation_bytes_after: int    the same with the patched sites swapped
                 saved_bytes: int, saved_fraction: float
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Site:
    """One activation found in the model, and whether (or why not) it is patched."""

    path: str
    activation: str
    consumer: str | None = None
    patched: bool = False
    reason: str | None = None
    saved_bytes_per_token: int = 0
    kind: str = "activation"


@dataclass
class Projection:
    """Saved-activation memory of one training forward at a given shape and dtype, before and after."""

    batch_size: int
    seq_len: int
    dtype: str
    activation_bytes_before: int
    activation_bytes_after: int
    saved_bytes: int = field(init=False)
    saved_fraction: float = field(init=False)

    def __post_init__(self) -> None:
        self.saved_bytes = self.activation_bytes_before - self.activation_bytes_after
        before = self.activation_bytes_before
        self.saved_fraction = self.saved_bytes / before if before > 0 else 0.0


@dataclass
class PatchReport:
    """The sites found in a model and the projected memory saved by patching them."""

    model: str
    dry_run: bool
    sites: list[Site]
    projection: Projection
    # for patch_model, not part of to_dict(): gated or norm site path -> its named parts
    # (``analysis.gated.GatedParts``, ``analysis.norms.NormParts``)
    parts: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # not part of to_dict() either: the bytes at any (batch, seq) (``analysis.memory.Projector``)
    projector: Any = field(default=None, repr=False, compare=False)

    @property
    def patched_sites(self) -> list[Site]:
        """The sites that are (or, for analyze, would be) patched."""
        return [s for s in self.sites if s.patched]

    @property
    def skipped_sites(self) -> list[Site]:
        """The sites left as they are, each with its reason."""
        return [s for s in self.sites if not s.patched]

    def to_dict(self) -> dict[str, Any]:
        """All fields of the contract as JSON-ready nested dicts and lists."""
        d = asdict(self)
        del d["parts"], d["projector"]
        return d

    def __str__(self) -> str:
        p = self.projection
        lines = [
            f"{self.model}: {len(self.patched_sites)} of {len(self.sites)} sites patched"
            + ("  (dry run on meta)" if self.dry_run else ""),
        ]
        for s in self.sites:
            status = "patched" if s.patched else f"not patched: {s.reason}"
            lines.append(f"  {s.path}  [{s.activation}]  {status}  (-{s.saved_bytes_per_token} B/token)")
        lines.append(
            f"batch {p.batch_size} x seq {p.seq_len}, {p.dtype}: saved activations "
            f"{p.activation_bytes_before:,} B -> {p.activation_bytes_after:,} B "
            f"(-{p.saved_bytes:,} B, {100 * p.saved_fraction:.1f}%)"
        )
        return "\n".join(lines)
