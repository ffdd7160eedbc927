"""Causal Forcing: few-step autoregressive video diffusion."""
__version__ = "0.1.0"
