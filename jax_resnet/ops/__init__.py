"""Primitives of residual networks, each a `jax.custom_vjp` with a hand-derived
backward pass beside its forward, and a plain-`jnp` `*_reference` twin."""

from jax_resnet.ops.activations import gelu, leaky_relu, relu, sigmoid, silu, softplus, tanh
