"""mamba-compiled: the Mamba selective state-space model, built compiler-first."""

__version__ = "0.1.0"
