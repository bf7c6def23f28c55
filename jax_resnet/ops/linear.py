"""The dense (fully connected) layer: forward and hand-derived VJP side by side.

Derivation: derivations/linear.md.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_resnet.ops import _checks, contributions

# This module's ops, in `OpSet` order (jax_resnet/ops/__init__.py builds everything else from it).
OPS = ("dense",)
# The ops with parameters: their names among the rule's positional arguments.
PARAMS = {"dense": ("w", "b")}


class DenseResiduals(NamedTuple):
    x: jax.Array
    w: jax.Array


@jax.custom_vjp
def _dense(x, w, b):
    return x @ w + b


# _dense_fwd :: (x, w, b) -> (y, DenseResiduals)
def _dense_fwd(x, w, b):
    return x @ w + b, DenseResiduals(x, w)


# _dense_bwd :: (DenseResiduals, ct_y) -> (ct_x, ct_w, ct_b)
def _dense_bwd(res, ct_y):
    batch_axes = tuple(range(ct_y.ndim - 1))
    ct_x = ct_y @ res.w.T
    # Every leading (batch) axis is summed out: w and b are shared across them.
    ct_w = jnp.tensordot(res.x, ct_y, axes=(batch_axes, batch_axes))
    ct_b = jnp.sum(ct_y, axis=batch_axes)
    return ct_x, ct_w, ct_b


_dense.defvjp(_dense_fwd, _dense_bwd)


# dense_contributions :: (DenseResiduals, ct_y) -> (Weight, Vector)
def dense_contributions(res, ct_y):
    """What each example contributes to w and b: every leading axis after the first is a position.

    G_i^w = Σ_t x_{i,t}ᵀ δ_{i,t} (a Weight with a = x, δ = ct_y), G_i^b = Σ_t δ_{i,t} (a Vector).

    Derivation: derivations/curvature.md#contributions
    """
    delta = contributions.positions(ct_y)
    return contributions.Weight(contributions.positions(res.x), delta), contributions.Vector(delta)


def dense(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    """Affine map y = x·W + b over the last axis, for any leading batch shape.

    VJP: ct_x = ct_y·Wᵀ, ct_W = Σ_batch xᵀ·ct_y, ct_b = Σ_batch ct_y, where
    Σ_batch runs over every leading axis. Saves x and W.

    Args:
      x: [..., in] floating array (at least rank 1).
      w: [in, out] weights, the dtype of x.
      b: [out] bias, the dtype of x.

    Returns:
      y: [..., out].

    Derivation: derivations/linear.md#dense
    """
    for name, a in (("x", x), ("w", w), ("b", b)):
        _checks.floating("dense", name, a)
    _checks.same_dtype("dense", x=x, w=w, b=b)
    _checks.rank("dense", "x", x, range(1, 33), "[..., in]")
    _checks.rank("dense", "w", w, 2, "[in, out]")
    _checks.shape("dense", "w", w, (x.shape[-1], w.shape[1]), f"rows must equal x's last axis {x.shape[-1]}")
    _checks.shape("dense", "b", b, (w.shape[1],), "one bias per output unit")
    return _dense(x, w, b)


def dense_reference(x, w, b):
    return jnp.matmul(x, w) + b
