"""actpatch: inverted activations that keep only their output and one bit per element for backward."""

__version__ = "0.1.0"
