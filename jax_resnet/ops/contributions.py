"""What each example contributes to a parameter: the forms an op's `<name>_contributions` returns.

The gradient of a parameter is a sum over the batch, and over the positions at
which the parameter is applied; an op with parameters says, from the residuals
its forward saved and the cotangent of its output, what the summands are. Two
forms cover every parameterised op here:

  Weight   W [d, p] applied as y_{i,t} = a_{i,t}·W at T positions of each example i:
           example i contributes G_i = Σ_t a_{i,t}ᵀ δ_{i,t}, [d, p] (a kernel [kh, kw, C, O]
           flattened row-major to [kh·kw·C, O], its patches' features in that order)
  Vector   a parameter applied elementwise at T positions: example i contributes
           G_i = Σ_t u_{i,t}, the per-position terms u [B, T, *shape]

`jax_resnet.per_example` turns them into per-example gradients, norms and sums
of squares, and `jax_resnet.curvature` into the GGN's diagonal and Kronecker
factors, one generic function per quantity (derivations/curvature.md#contributions).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Weight(NamedTuple):
    """A weight W [d, p] used as y_{i,t} = a_{i,t}·W at T positions; G_i = Σ_t a_{i,t}ᵀ δ_{i,t}.

    Attributes:
      inputs: a [B, T, d], or a function giving it where forming it is a new array (a
        convolution's patches), called only by the quantities that need it.
      delta: δ [B, T, p], the output cotangents at the T positions.
      grads: None, or a function giving every G_i in the kernel's own layout without
        forming `inputs`, as (g, axis): g the kernel's shape with the examples on `axis`.
    """

    inputs: jax.Array | Callable[[], jax.Array]
    delta: jax.Array
    grads: Callable[[], tuple[jax.Array, int]] | None = None

    def a(self) -> jax.Array:
        """The inputs a [B, T, d], formed if they are a function."""
        return self.inputs() if callable(self.inputs) else self.inputs


class Vector(NamedTuple):
    """A parameter applied elementwise at T positions: u `[B, T, *shape]`, G_i = Σ_t u_{i,t}."""

    per_position: jax.Array

    def per_example(self) -> jax.Array:
        """G_i for every example, `[B, *shape]`."""
        return jnp.sum(self.per_position, axis=1)


def positions(a: jax.Array) -> jax.Array:
    """[B, ..., f] -> [B, T, f]: every axis between the batch and the features is a position."""
    return a.reshape(a.shape[0], -1, a.shape[-1])
