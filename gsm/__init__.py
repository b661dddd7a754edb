"""GSM-VSR: Gather-Scatter Mamba video super-resolution."""

__version__ = "0.1.0"
