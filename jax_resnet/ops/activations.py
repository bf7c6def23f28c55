"""Elementwise activations: forward and hand-derived VJP side by side.

Every activation y = f(x) has the VJP ct_x = ct_y · f'(x). What differs is
what the forward saves so that f'(x) can be rebuilt without x when possible:
ReLU saves a one-bit mask, tanh and sigmoid save their output, the others
need x itself. Derivations: derivations/activations.md.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax_resnet.ops import _checks

# This module's ops, in `OpSet` order (jax_resnet/ops/__init__.py builds everything else from it).
OPS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu", "silu", "softplus")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ----------------------------------------------------------------------------- relu
class ReluResiduals(NamedTuple):
    mask: jax.Array  # x > 0: bool, or from PACK_MIN_ELEMENTS elements on packed eight to a byte (uint8)


# From this many elements on, the mask is saved as bits: on ResNet-20's feature maps
# (from 131,072 elements) bits cut the step's compiled memory from 322.6 to 292.1 MiB at
# no cost in time; on the residual MLP's [128, 64] activations packing and unpacking
# took 1.15x autodiff's step time against 0.98x for a bool mask (derivations/activations.md#relu).
PACK_MIN_ELEMENTS = 1 << 16


@jax.custom_vjp
def _relu(x):
    return _relu_forward(x)


def _relu_forward(x):
    # Not jnp.maximum(x, 0): XLA's CPU compiler recomputes a NaN-propagating maximum
    # of a BatchNorm output in every consumer (ResNet-20's step 1.10x autodiff's time,
    # against 0.86x this way); not where(x > 0, x, 0), which turns NaN into 0.
    # where(x <= 0, 0, x) keeps NaN, as jax.nn.relu does (derivations/activations.md#relu).
    return jnp.where(x <= 0, jnp.zeros_like(x), x)


def _pack(mask):
    """bool [..., C] -> uint8 [..., ⌈C/8⌉], one bit an element along the last axis (the batch stays
    whole), for masks of at least `PACK_MIN_ELEMENTS` elements; smaller masks stay bool."""
    if mask.size < PACK_MIN_ELEMENTS:
        return mask
    return jnp.packbits(mask.reshape(mask.shape or (1,)), axis=-1)


def _unpack(mask, shape):
    """The inverse of `_pack` for a mask of `shape`."""
    if mask.dtype == jnp.bool_:
        return mask
    return jnp.unpackbits(mask, axis=-1, count=shape[-1] if shape else 1).astype(bool).reshape(shape)


# _relu_fwd :: x -> (y, ReluResiduals)
def _relu_fwd(x):
    return _relu_forward(x), ReluResiduals(_pack(x > 0))


# _relu_bwd :: (ReluResiduals, ct_y) -> (ct_x,)
def _relu_bwd(res, ct_y):
    return (jnp.where(_unpack(res.mask, ct_y.shape), ct_y, jnp.zeros_like(ct_y)),)


_relu.defvjp(_relu_fwd, _relu_bwd)


def relu(x: jax.Array) -> jax.Array:
    """Rectified linear unit with a hand-derived VJP.

    Forward: y = max(x, 0) (NaN stays NaN). VJP: ct_x = ct_y · [x > 0], so
    ReLU'(0) = 0 (the convention of `jax.nn.relu`). Saves the mask [x > 0] as
    bits, eight to a byte, not x.

    Args:
      x: floating array of any shape.

    Returns:
      y, same shape and dtype as x.

    Derivation: derivations/activations.md#relu
    """
    _checks.floating("relu", "x", x)
    return _relu(x)


def relu_reference(x):
    return jnp.where(x > 0, x, jnp.zeros_like(x))


# ----------------------------------------------------------------------- leaky_relu
class LeakyReluConfig(NamedTuple):
    negative_slope: float  # α, the slope for x ≤ 0


class LeakyReluResiduals(NamedTuple):
    mask: jax.Array  # bool, x > 0


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _leaky_relu(x, config):
    return jnp.where(x > 0, x, config.negative_slope * x)


# _leaky_relu_fwd :: (x, LeakyReluConfig) -> (y, LeakyReluResiduals)
def _leaky_relu_fwd(x, config):
    mask = x > 0
    return jnp.where(mask, x, config.negative_slope * x), LeakyReluResiduals(mask)


# _leaky_relu_bwd :: (LeakyReluConfig, LeakyReluResiduals, ct_y) -> (ct_x,)
def _leaky_relu_bwd(config, res, ct_y):
    return (jnp.where(res.mask, ct_y, config.negative_slope * ct_y),)


_leaky_relu.defvjp(_leaky_relu_fwd, _leaky_relu_bwd)


def leaky_relu_config(x, negative_slope=0.01) -> LeakyReluConfig:
    """Validate `leaky_relu`'s arguments and resolve its static setting."""
    _checks.floating("leaky_relu", "x", x)
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(
            f"leaky_relu: argument `negative_slope` must be a Python float, got {type(negative_slope).__name__}"
        )
    return LeakyReluConfig(float(negative_slope))


def leaky_relu(x: jax.Array, negative_slope: float = 0.01) -> jax.Array:
    """Leaky ReLU with a hand-derived VJP.

    Forward: y = x if x > 0 else α·x. VJP: ct_x = ct_y · (1 if x > 0 else α);
    at x = 0 the derivative is α (the left branch). Saves a boolean mask.

    Args:
      x: floating array of any shape.
      negative_slope: α, a static Python float.

    Returns:
      y, same shape and dtype as x.

    Derivation: derivations/activations.md#leaky_relu
    """
    return _leaky_relu(x, leaky_relu_config(x, negative_slope))


def leaky_relu_reference(x, negative_slope=0.01):
    return jnp.where(x > 0, x, negative_slope * x)


# ----------------------------------------------------------------------------- tanh
class TanhResiduals(NamedTuple):
    x: jax.Array  # the input: sech² x from x stays accurate where tanh x rounds towards ±1


@jax.custom_vjp
def _tanh(x):
    return jnp.tanh(x)


# _tanh_fwd :: x -> (y, TanhResiduals)
def _tanh_fwd(x):
    return jnp.tanh(x), TanhResiduals(x)


# _tanh_bwd :: (TanhResiduals, ct_y) -> (ct_x,)
def _tanh_bwd(res, ct_y):
    t = jnp.exp(-2 * jnp.abs(res.x))  # in (0, 1]: no overflow, no cancellation
    return (ct_y * (4 * t / ((1 + t) * (1 + t))),)


_tanh.defvjp(_tanh_fwd, _tanh_bwd)


def tanh(x: jax.Array) -> jax.Array:
    """Hyperbolic tangent with a hand-derived VJP.

    Forward: y = tanh(x). VJP: ct_x = ct_y · sech² x = ct_y · 4t / (1 + t)², t = e^(−2|x|)
    (equal to 1 − y², without its cancellation where y nears ±1). Saves x.

    Derivation: derivations/activations.md#tanh
    """
    _checks.floating("tanh", "x", x)
    return _tanh(x)


def tanh_reference(x):
    return jnp.tanh(x)


# -------------------------------------------------------------------------- sigmoid
class SigmoidResiduals(NamedTuple):
    y: jax.Array  # σ(x)


@jax.custom_vjp
def _sigmoid(x):
    return jax.nn.sigmoid(x)


# _sigmoid_fwd :: x -> (y, SigmoidResiduals)
def _sigmoid_fwd(x):
    y = jax.nn.sigmoid(x)
    return y, SigmoidResiduals(y)


# _sigmoid_bwd :: (SigmoidResiduals, ct_y) -> (ct_x,)
def _sigmoid_bwd(res, ct_y):
    return (ct_y * res.y * (1 - res.y),)


_sigmoid.defvjp(_sigmoid_fwd, _sigmoid_bwd)


def sigmoid(x: jax.Array) -> jax.Array:
    """Logistic sigmoid with a hand-derived VJP.

    Forward: y = σ(x) = 1 / (1 + e^{−x}). VJP: ct_x = ct_y · y · (1 − y).
    Saves y, not x.

    Derivation: derivations/activations.md#sigmoid
    """
    _checks.floating("sigmoid", "x", x)
    return _sigmoid(x)


def sigmoid_reference(x):
    return 1 / (1 + jnp.exp(-x))


# ----------------------------------------------------------------------------- gelu
class GeluConfig(NamedTuple):
    approximate: bool  # the tanh approximation instead of the exact erf form


class GeluResiduals(NamedTuple):
    x: jax.Array


def _gelu_value(x, approximate):
    if approximate:
        return 0.5 * x * (1 + jnp.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + jax.lax.erf(x * _INV_SQRT_2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gelu(x, config):
    return _gelu_value(x, config.approximate)


# _gelu_fwd :: (x, GeluConfig) -> (y, GeluResiduals)
def _gelu_fwd(x, config):
    return _gelu_value(x, config.approximate), GeluResiduals(x)


# _gelu_bwd :: (GeluConfig, GeluResiduals, ct_y) -> (ct_x,)
def _gelu_bwd(config, res, ct_y):
    x = res.x
    if config.approximate:
        u = _SQRT_2_OVER_PI * (x + 0.044715 * x**3)
        t = jnp.tanh(u)
        du_dx = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x**2)
        dy_dx = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du_dx
    else:
        cdf = 0.5 * (1 + jax.lax.erf(x * _INV_SQRT_2))
        pdf = _INV_SQRT_2PI * jnp.exp(-0.5 * x * x)
        dy_dx = cdf + x * pdf
    return (ct_y * dy_dx,)


_gelu.defvjp(_gelu_fwd, _gelu_bwd)


def gelu_config(x, approximate=False) -> GeluConfig:
    """Validate `gelu`'s argument and resolve its static setting."""
    _checks.floating("gelu", "x", x)
    return GeluConfig(bool(approximate))


def gelu(x: jax.Array, approximate: bool = False) -> jax.Array:
    """Gaussian error linear unit with a hand-derived VJP.

    Exact: y = x·Φ(x), VJP ct_x = ct_y · (Φ(x) + x·φ(x)).
    Tanh approximation: y = ½x(1 + tanh u), u = √(2/π)(x + 0.044715x³),
    VJP ct_x = ct_y · (½(1 + tanh u) + ½x(1 − tanh²u)·√(2/π)(1 + 3·0.044715x²)).
    Saves x.

    Args:
      x: floating array.
      approximate: static bool, use the tanh approximation.

    Derivation: derivations/activations.md#gelu
    """
    return _gelu(x, gelu_config(x, approximate))


def gelu_reference(x, approximate=False):
    return _gelu_value(x, approximate)


# ----------------------------------------------------------------------------- silu
class SiluResiduals(NamedTuple):
    x: jax.Array


@jax.custom_vjp
def _silu(x):
    return x * jax.nn.sigmoid(x)


# _silu_fwd :: x -> (y, SiluResiduals)
def _silu_fwd(x):
    return x * jax.nn.sigmoid(x), SiluResiduals(x)


# _silu_bwd :: (SiluResiduals, ct_y) -> (ct_x,)
def _silu_bwd(res, ct_y):
    s = jax.nn.sigmoid(res.x)
    return (ct_y * s * (1 + res.x * (1 - s)),)


_silu.defvjp(_silu_fwd, _silu_bwd)


def silu(x: jax.Array) -> jax.Array:
    """SiLU / swish (β = 1) with a hand-derived VJP.

    Forward: y = x·σ(x). VJP: ct_x = ct_y · σ(x)·(1 + x·(1 − σ(x))). Saves x
    (σ is recomputed: one exp is cheaper than storing a second array).

    Derivation: derivations/activations.md#silu
    """
    _checks.floating("silu", "x", x)
    return _silu(x)


def silu_reference(x):
    return x * jax.nn.sigmoid(x)


# ------------------------------------------------------------------------- softplus
class SoftplusResiduals(NamedTuple):
    x: jax.Array


@jax.custom_vjp
def _softplus(x):
    return jnp.logaddexp(x, 0.0)


# _softplus_fwd :: x -> (y, SoftplusResiduals)
def _softplus_fwd(x):
    return jnp.logaddexp(x, 0.0), SoftplusResiduals(x)


# _softplus_bwd :: (SoftplusResiduals, ct_y) -> (ct_x,)
def _softplus_bwd(res, ct_y):
    return (ct_y * jax.nn.sigmoid(res.x),)


_softplus.defvjp(_softplus_fwd, _softplus_bwd)


def softplus(x: jax.Array) -> jax.Array:
    """Softplus with a hand-derived VJP.

    Forward: y = log(1 + eˣ), computed as logaddexp(x, 0) so large x does not
    overflow. VJP: ct_x = ct_y · σ(x). Saves x.

    Derivation: derivations/activations.md#softplus
    """
    _checks.floating("softplus", "x", x)
    return _softplus(x)


def softplus_reference(x):
    # JAX's softplus, logaddexp(x, 0), differentiated by JAX: σ(x) everywhere. Spelled out as
    # max(x, 0) + log1p(exp(−|x|)), JAX's conventions at the kink (max'(0) = ½, |x|'(0) = 1) gave
    # the twin the derivative 0 at x = 0 instead of σ(0) = ½ (derivations/activations.md#softplus).
    return jax.nn.softplus(x)
