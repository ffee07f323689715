"""actpatch: inverted activations that keep only their output and one bit per element for backward."""

__version__ = "0.1.0"

from .manifest import load_patched, reapply, save_patched  # noqa: E402, F401
from .patching import analyze, patch_model, unpatch_model  # noqa: E402
from .report import PatchReport, Projection, Site  # noqa: E402

__all__ = ["PatchReport", "Projection", "Site", "__version__", "analyze", "patch_model", "unpatch_model"]
