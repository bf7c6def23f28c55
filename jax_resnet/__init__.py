"""jax-resnet: residual networks as pure JAX functions with hand-derived VJPs."""

from jax_resnet import curvature, gradcheck, ops, rules
from jax_resnet.curvature import hvp

__all__ = ["curvature", "gradcheck", "hvp", "ops", "rules"]
__version__ = "0.1.0"
