"""jax-resnet: residual networks as pure JAX functions with hand-derived VJPs."""

from jax_resnet import gradcheck, ops, rules

__all__ = ["gradcheck", "ops", "rules"]
__version__ = "0.1.0"
