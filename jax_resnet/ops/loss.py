"""Losses: forward and hand-derived VJP side by side.

Derivation: derivations/loss.md.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax_resnet.ops import _checks

# This module's ops, in `OpSet` order (jax_resnet/ops/__init__.py builds everything else from it).
OPS = ("mse_loss", "softmax_cross_entropy")


# ------------------------------------------------------------------------- mse_loss
class MseResiduals(NamedTuple):
    diff: jax.Array  # a − y


@jax.custom_vjp
def _mse_loss(a, y):
    m = a.shape[0]
    return jnp.sum((a - y) ** 2) / (2 * m)


# _mse_loss_fwd :: (a, y) -> (J, MseResiduals)
def _mse_loss_fwd(a, y):
    diff = a - y
    return jnp.sum(diff**2) / (2 * a.shape[0]), MseResiduals(diff)


# _mse_loss_bwd :: (MseResiduals, ct_J) -> (ct_a, ct_y)
def _mse_loss_bwd(res, ct_j):
    m = res.diff.shape[0]
    ct_a = ct_j * res.diff / m
    return ct_a, -ct_a


_mse_loss.defvjp(_mse_loss_fwd, _mse_loss_bwd)


def mse_loss(a: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error as the seed writes it: J = 1/(2m) Σᵢ ‖a⁽ⁱ⁾ − y⁽ⁱ⁾‖².

    m is the batch size (the leading axis); the sum runs over every entry. The
    ½ cancels the 2 of the square, so ct_a = ct_J·(a − y)/m and ct_y = −ct_a.
    Saves a − y.

    Args:
      a: [m, ...] predictions.
      y: targets, same shape and dtype as a.

    Returns:
      J, a scalar.

    Derivation: derivations/loss.md#mse_loss
    """
    _checks.floating("mse_loss", "a", a)
    _checks.floating("mse_loss", "y", y)
    _checks.same_dtype("mse_loss", a=a, y=y)
    _checks.rank("mse_loss", "a", a, range(1, 33), "[m, ...]")
    _checks.shape("mse_loss", "y", y, a.shape, "targets match predictions")
    return _mse_loss(a, y)


def mse_loss_reference(a, y):
    return 0.5 * jnp.mean(jnp.sum(jnp.reshape((a - y) ** 2, (a.shape[0], -1)), axis=1))


# ------------------------------------------------------------ softmax_cross_entropy
class SoftmaxCrossEntropyConfig(NamedTuple):
    label_smoothing: float  # ε in [0, 1)


class SoftmaxCrossEntropyResiduals(NamedTuple):
    p: jax.Array  # softmax(logits)
    labels: jax.Array  # the targets q are rebuilt from these: m integers, not an [m, K] array


def _targets(labels, num_classes, label_smoothing, dtype):
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=dtype)
    return (1 - label_smoothing) * one_hot + label_smoothing / num_classes


def _log_softmax(z):
    # Subtracting the row maximum keeps exp() finite for any logits.
    shifted = z - jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _softmax_cross_entropy(logits, labels, config):
    q = _targets(labels, logits.shape[-1], config.label_smoothing, logits.dtype)
    return -jnp.sum(q * _log_softmax(logits)) / logits.shape[0]


# _softmax_cross_entropy_fwd :: (logits, labels, SoftmaxCrossEntropyConfig) -> (L, SoftmaxCrossEntropyResiduals)
def _softmax_cross_entropy_fwd(logits, labels, config):
    q = _targets(labels, logits.shape[-1], config.label_smoothing, logits.dtype)
    log_p = _log_softmax(logits)
    loss = -jnp.sum(q * log_p) / logits.shape[0]
    return loss, SoftmaxCrossEntropyResiduals(jnp.exp(log_p), labels)


# _softmax_cross_entropy_bwd :: (SoftmaxCrossEntropyConfig, SoftmaxCrossEntropyResiduals, ct_L) -> (ct_logits, None)
def _softmax_cross_entropy_bwd(config, res, ct_loss):
    m, num_classes = res.p.shape
    q = _targets(res.labels, num_classes, config.label_smoothing, res.p.dtype)
    return ct_loss * (res.p - q) / m, None


_softmax_cross_entropy.defvjp(_softmax_cross_entropy_fwd, _softmax_cross_entropy_bwd)


def softmax_cross_entropy_config(logits, labels, label_smoothing=0.0) -> SoftmaxCrossEntropyConfig:
    """Validate `softmax_cross_entropy`'s arguments and resolve its static setting.

    Labels are range-checked when concrete (eagerly), assumed valid under jit.
    """
    op = "softmax_cross_entropy"
    _checks.floating(op, "logits", logits)
    _checks.integer(op, "labels", labels)
    _checks.rank(op, "logits", logits, 2, "[batch, classes]")
    _checks.shape(op, "labels", labels, logits.shape[:1], "one label per row of logits")
    if (
        isinstance(label_smoothing, bool)
        or not isinstance(label_smoothing, (int, float))
        or not 0 <= label_smoothing < 1
    ):
        raise ValueError(f"{op}: argument `label_smoothing` must be a Python float in [0, 1), got {label_smoothing!r}")
    num_classes = logits.shape[-1]
    if not isinstance(labels, jax.core.Tracer):
        # Under jit the values are unknown; eagerly, an out-of-range label is caught here
        # (it would give a zero one-hot row, and q would no longer sum to one).
        values = np.asarray(labels)  # concrete: host-side check, nothing traced
        low, high = int(values.min(initial=0)), int(values.max(initial=0))
        if low < 0 or high >= num_classes:
            raise ValueError(f"{op}: argument `labels` must lie in [0, {num_classes}), got values in [{low}, {high}]")
    return SoftmaxCrossEntropyConfig(float(label_smoothing))


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy with integer labels and label smoothing.

    Targets q = (1 − ε)·onehot(labels) + ε/K, p = softmax(z),
    L = −(1/m) Σᵢ Σₖ qᵢₖ log pᵢₖ. VJP: ct_z = ct_L·(p − q)/m; labels get no
    cotangent. log-softmax subtracts the row maximum, so logits of any size
    are safe. Saves p and the labels (q is rebuilt from them).

    Args:
      logits: [m, K] floating array.
      labels: [m] integers in [0, K); checked when called eagerly, assumed under jit.
      label_smoothing: ε in [0, 1), a static Python float.

    Returns:
      L, a scalar.

    Derivation: derivations/loss.md#softmax_cross_entropy
    """
    return _softmax_cross_entropy(logits, labels, softmax_cross_entropy_config(logits, labels, label_smoothing))


def softmax_cross_entropy_reference(logits, labels, label_smoothing=0.0):
    q = _targets(labels, logits.shape[-1], label_smoothing, logits.dtype)
    return -jnp.mean(jnp.sum(q * jax.nn.log_softmax(logits), axis=-1))
