"""Normalization layers: forward and hand-derived VJP side by side.

All four normalize channels-last inputs: standardize x over a set of m reduced
elements, x_hat = (x − mean)·inv_std with inv_std = 1/sqrt(var + eps), then
y = gamma·x_hat + beta with one gamma and beta per channel (the last axis).
They differ only in which elements share a mean and a variance:

  batch_norm_train  all axes but the last (N, H, W for NHWC): one per channel
  layer_norm        the last axis: one per example
  group_norm        the middle axes and C/groups channels: one per example and group
  batch_norm_eval   none: mean and var are given (running statistics)

so the three that compute statistics share one backward through x_hat,
ct_x = inv_std/m · (m·ct_xhat − Σ ct_xhat − x_hat·Σ ct_xhat·x_hat), and save
x_hat, inv_std and gamma rather than x. Derivations: derivations/norm.md.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jax_resnet.ops import _checks, contributions

# This module's ops, in `OpSet` order (jax_resnet/ops/__init__.py builds everything else from it).
OPS = ("batch_norm_train", "batch_norm_eval", "layer_norm", "group_norm")
# The ops with parameters: their names among the rule's positional arguments. batch_norm_train
# has no `_contributions`: its batch statistics make every example's output depend on every
# example, so no one example's share of ct_gamma or ct_beta exists in its backward.
PARAMS = {name: ("gamma", "beta") for name in OPS}


# --------------------------------------------------------------------- shared algebra
class NormConfig(NamedTuple):
    """The static setting of batch_norm_train, batch_norm_eval and layer_norm."""

    eps: float  # added to var, positive


def _standardize(x, axes, eps):
    """x_hat, mean, var, inv_std over `axes` (kept as size-1 axes); biased variance."""
    mean = jnp.mean(x, axis=axes, keepdims=True)
    centered = x - mean
    # Two passes, mean((x − mean)²), as jnp.var does: E[x²] − mean² cancels
    # catastrophically in float32 once |mean| is large against the spread.
    var = jnp.mean(centered * centered, axis=axes, keepdims=True)
    inv_std = lax.rsqrt(var + eps)
    return centered * inv_std, mean, var, inv_std


def _standardize_bwd(x_hat, inv_std, ct_xhat, axes, m):
    """ct_x of x_hat = (x − mean)·inv_std, mean and var over `axes` of m elements each."""
    sum_ct_xhat = jnp.sum(ct_xhat, axis=axes, keepdims=True)
    sum_ct_xhat_x_hat = jnp.sum(ct_xhat * x_hat, axis=axes, keepdims=True)
    return inv_std / m * (m * ct_xhat - sum_ct_xhat - x_hat * sum_ct_xhat_x_hat)


# <norm>_contributions :: (config, residuals with x_hat, ct_y) -> (Vector, Vector)
def _scale_shift_contributions(config, res, ct_y):
    """What each example contributes to gamma and beta, for a norm whose x_hat of example i depends
    on example i alone (batch_norm_eval, layer_norm, group_norm): u^gamma_{i,t} = δ_{i,t} ⊙ x_hat_{i,t},
    u^beta_{i,t} = δ_{i,t}, at every position t of the example.

    Derivation: derivations/curvature.md#contributions
    """
    delta = contributions.positions(ct_y)
    return contributions.Vector(delta * contributions.positions(res.x_hat)), contributions.Vector(delta)


def _count(shape, axes) -> int:
    return math.prod(shape[a] for a in axes)


def _leading_axes(x):
    return tuple(range(x.ndim - 1))


def _check_channel_params(op, x, eps, **params):
    """Validate x [..., C] (rank ≥ 2) and per-channel params [C], one floating dtype; return eps as a float."""
    _checks.floating(op, "x", x)
    for name, a in params.items():
        _checks.floating(op, name, a)
    _checks.same_dtype(op, x=x, **params)
    if x.ndim < 2:
        raise ValueError(f"{op}: argument `x` must have rank >= 2 (..., C), channels last, got shape {tuple(x.shape)}")
    for name, a in params.items():
        _checks.shape(op, name, a, (x.shape[-1],), "one entry per channel, x's last axis")
    return _checks.positive_float(op, "eps", eps)


# ----------------------------------------------------------------- batch_norm_train
class BatchNormTrainResiduals(NamedTuple):
    x_hat: jax.Array  # [..., C], (x − mean)·inv_std
    inv_std: jax.Array  # [C], 1/sqrt(var + eps)
    gamma: jax.Array  # [C]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm_train(x, gamma, beta, config):
    return _batch_norm_train_fwd(x, gamma, beta, config)[0]


# _batch_norm_train_fwd :: (x, gamma, beta, NormConfig) -> ((y, mean, var), BatchNormTrainResiduals)
def _batch_norm_train_fwd(x, gamma, beta, config):
    channels = x.shape[-1:]
    x_hat, mean, var, inv_std = _standardize(x, _leading_axes(x), config.eps)
    y = gamma * x_hat + beta
    out = (y, mean.reshape(channels), var.reshape(channels))
    return out, BatchNormTrainResiduals(x_hat, inv_std.reshape(channels), gamma)


# _batch_norm_train_bwd :: (NormConfig, BatchNormTrainResiduals, (ct_y, ct_mean, ct_var)) -> (ct_x, ct_gamma, ct_beta)
def _batch_norm_train_bwd(config, res, cts):
    ct_y, ct_mean, ct_var = cts
    x_hat, inv_std = res.x_hat, res.inv_std
    axes = _leading_axes(x_hat)
    m = _count(x_hat.shape, axes)
    ct_gamma = jnp.sum(ct_y * x_hat, axis=axes)
    ct_beta = jnp.sum(ct_y, axis=axes)
    # The compact form with ct_xhat = ct_y·gamma, reusing the two sums just taken:
    # Σct_xhat = gamma·ct_beta and Σct_xhat·x_hat = gamma·ct_gamma. Not forming
    # ct_xhat saves XLA a full-size buffer (12 MiB in ResNet-20's step; bench.py).
    scale = res.gamma * inv_std / m
    ct_x = scale * (m * ct_y - ct_beta - x_hat * ct_gamma)
    # The returned statistics: ∂mean/∂x = 1/m, ∂var/∂x = 2(x − mean)/m = 2·x_hat/(inv_std·m).
    ct_x = ct_x + ct_mean / m + ct_var * 2 * x_hat / (inv_std * m)
    return ct_x, ct_gamma, ct_beta


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def batch_norm_train_config(x, gamma, beta, *, eps=1e-5) -> NormConfig:
    """Validate `batch_norm_train`'s arguments and resolve its static setting."""
    return NormConfig(_check_channel_params("batch_norm_train", x, eps, gamma=gamma, beta=beta))


def batch_norm_train(x: jax.Array, gamma: jax.Array, beta: jax.Array, *, eps: float = 1e-5):
    """Batch normalization with batch statistics (training mode) and a hand-derived VJP.

    Forward, per channel over the m = x.size / C elements of all axes but the
    last: mean = Σx/m, var = Σ(x − mean)²/m (biased), inv_std = 1/sqrt(var + eps),
    x_hat = (x − mean)·inv_std, y = gamma·x_hat + beta.

    VJP, with ct_xhat = ct_y·gamma and sums over the same m elements:
    ct_x = inv_std/m · (m·ct_xhat − Σct_xhat − x_hat·Σct_xhat·x_hat)
    + ct_mean/m + ct_var·2·(x − mean)/m,
    ct_gamma = Σ ct_y·x_hat, ct_beta = Σ ct_y. Saves x_hat, inv_std and gamma.
    A batch of one element per channel gives var = 0, x_hat = 0, y = beta and
    ct_x = ct_mean (zero from the y path).

    Args:
      x: floating array [..., C], rank >= 2 (NHWC, or [N, C]).
      gamma: scale [C], same dtype as x.
      beta: shift [C], same dtype as x.
      eps: positive static Python float added to var.

    Returns:
      (y, mean, var): y like x; mean and the biased var [C], for the caller's
      running statistics.

    Derivation: derivations/norm.md#batch_norm_train
    """
    return _batch_norm_train(x, gamma, beta, batch_norm_train_config(x, gamma, beta, eps=eps))


# The references run the rules' forward expressions (`_standardize`), so both
# compute bit-identical values and only the backward passes differ: in a float32
# network, a last-bit difference in the forward can flip a later ReLU's mask.
def batch_norm_train_reference(x, gamma, beta, *, eps=1e-5):
    channels = x.shape[-1:]
    x_hat, mean, var, _ = _standardize(x, _leading_axes(x), eps)
    return gamma * x_hat + beta, mean.reshape(channels), var.reshape(channels)


# ------------------------------------------------------------------ batch_norm_eval
class BatchNormEvalResiduals(NamedTuple):
    x_hat: jax.Array  # [..., C], (x − mean)·inv_std
    inv_std: jax.Array  # [C], 1/sqrt(var + eps)
    gamma: jax.Array  # [C]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _batch_norm_eval(x, gamma, beta, mean, var, config):
    return _batch_norm_eval_fwd(x, gamma, beta, mean, var, config)[0]


# _batch_norm_eval_fwd :: (x, gamma, beta, mean, var, NormConfig) -> (y, BatchNormEvalResiduals)
def _batch_norm_eval_fwd(x, gamma, beta, mean, var, config):
    inv_std = lax.rsqrt(var + config.eps)
    x_hat = (x - mean) * inv_std
    return gamma * x_hat + beta, BatchNormEvalResiduals(x_hat, inv_std, gamma)


# _batch_norm_eval_bwd :: (NormConfig, BatchNormEvalResiduals, ct_y) -> (ct_x, ct_gamma, ct_beta, ct_mean, ct_var)
def _batch_norm_eval_bwd(config, res, ct_y):
    x_hat, inv_std = res.x_hat, res.inv_std
    axes = _leading_axes(x_hat)
    ct_xhat = ct_y * res.gamma
    ct_x = ct_xhat * inv_std
    ct_gamma = jnp.sum(ct_y * x_hat, axis=axes)
    ct_beta = jnp.sum(ct_y, axis=axes)
    ct_mean = -jnp.sum(ct_x, axis=axes)
    ct_var = -0.5 * inv_std * inv_std * jnp.sum(ct_xhat * x_hat, axis=axes)
    return ct_x, ct_gamma, ct_beta, ct_mean, ct_var


_batch_norm_eval.defvjp(_batch_norm_eval_fwd, _batch_norm_eval_bwd)
batch_norm_eval_contributions = _scale_shift_contributions


def batch_norm_eval_config(x, gamma, beta, mean, var, *, eps=1e-5) -> NormConfig:
    """Validate `batch_norm_eval`'s arguments and resolve its static setting."""
    return NormConfig(_check_channel_params("batch_norm_eval", x, eps, gamma=gamma, beta=beta, mean=mean, var=var))


def batch_norm_eval(
    x: jax.Array, gamma: jax.Array, beta: jax.Array, mean: jax.Array, var: jax.Array, *, eps: float = 1e-5
) -> jax.Array:
    """Batch normalization with given (running) statistics and a hand-derived VJP.

    Forward: inv_std = 1/sqrt(var + eps), x_hat = (x − mean)·inv_std,
    y = gamma·x_hat + beta; mean and var are inputs, so x enters elementwise.

    VJP, with ct_xhat = ct_y·gamma and sums over all axes but the last:
    ct_x = ct_xhat·inv_std, ct_gamma = Σ ct_y·x_hat, ct_beta = Σ ct_y,
    ct_mean = −Σ ct_x, ct_var = −½·inv_std²·Σ ct_xhat·x_hat.
    Saves x_hat, inv_std and gamma.

    Args:
      x: floating array [..., C], rank >= 2.
      gamma, beta: scale and shift [C].
      mean, var: statistics [C] (var >= 0); all five share x's dtype.
      eps: positive static Python float added to var.

    Returns:
      y, same shape and dtype as x.

    Derivation: derivations/norm.md#batch_norm_eval
    """
    return _batch_norm_eval(x, gamma, beta, mean, var, batch_norm_eval_config(x, gamma, beta, mean, var, eps=eps))


def batch_norm_eval_reference(x, gamma, beta, mean, var, *, eps=1e-5):
    return gamma * ((x - mean) * lax.rsqrt(var + eps)) + beta


# ----------------------------------------------------------------------- layer_norm
class LayerNormResiduals(NamedTuple):
    x_hat: jax.Array  # [..., C], (x − mean)·inv_std
    inv_std: jax.Array  # [..., 1], one per example
    gamma: jax.Array  # [C]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, gamma, beta, config):
    return _layer_norm_fwd(x, gamma, beta, config)[0]


# _layer_norm_fwd :: (x, gamma, beta, NormConfig) -> (y, LayerNormResiduals)
def _layer_norm_fwd(x, gamma, beta, config):
    x_hat, _, _, inv_std = _standardize(x, (x.ndim - 1,), config.eps)
    return gamma * x_hat + beta, LayerNormResiduals(x_hat, inv_std, gamma)


# _layer_norm_bwd :: (NormConfig, LayerNormResiduals, ct_y) -> (ct_x, ct_gamma, ct_beta)
def _layer_norm_bwd(config, res, ct_y):
    x_hat = res.x_hat
    examples = _leading_axes(x_hat)
    ct_gamma = jnp.sum(ct_y * x_hat, axis=examples)
    ct_beta = jnp.sum(ct_y, axis=examples)
    ct_xhat = ct_y * res.gamma
    ct_x = _standardize_bwd(x_hat, res.inv_std, ct_xhat, (x_hat.ndim - 1,), x_hat.shape[-1])
    return ct_x, ct_gamma, ct_beta


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)
layer_norm_contributions = _scale_shift_contributions


def layer_norm_config(x, gamma, beta, *, eps=1e-5) -> NormConfig:
    """Validate `layer_norm`'s arguments and resolve its static setting."""
    return NormConfig(_check_channel_params("layer_norm", x, eps, gamma=gamma, beta=beta))


def layer_norm(x: jax.Array, gamma: jax.Array, beta: jax.Array, *, eps: float = 1e-5) -> jax.Array:
    """Layer normalization over the channel axis, with a hand-derived VJP.

    Forward, per example over its m = C channels: mean = Σx/C,
    var = Σ(x − mean)²/C, inv_std = 1/sqrt(var + eps),
    x_hat = (x − mean)·inv_std, y = gamma·x_hat + beta.

    VJP, ct_xhat = ct_y·gamma, Σ_c over the channels of one example:
    ct_x = inv_std/C · (C·ct_xhat − Σ_c ct_xhat − x_hat·Σ_c ct_xhat·x_hat);
    ct_gamma = Σ ct_y·x_hat and ct_beta = Σ ct_y over all axes but the last.
    Saves x_hat, inv_std and gamma.

    Args:
      x: floating array [..., C], rank >= 2.
      gamma, beta: scale and shift [C], same dtype as x.
      eps: positive static Python float added to var.

    Returns:
      y, same shape and dtype as x.

    Derivation: derivations/norm.md#layer_norm
    """
    return _layer_norm(x, gamma, beta, layer_norm_config(x, gamma, beta, eps=eps))


def layer_norm_reference(x, gamma, beta, *, eps=1e-5):
    return gamma * _standardize(x, (x.ndim - 1,), eps)[0] + beta


# ----------------------------------------------------------------------- group_norm
class GroupNormConfig(NamedTuple):
    groups: int  # divides C
    eps: float  # added to var, positive


class GroupNormResiduals(NamedTuple):
    x_hat: jax.Array  # [N, ..., C], (x − mean)·inv_std, in x's layout
    inv_std: jax.Array  # [N, 1, ..., 1, G, 1], against x viewed as [N, ..., G, C/G]
    gamma: jax.Array  # [C]


def _grouped(shape, groups):
    """x's shape viewed as [N, ..., G, C/G], and the reduced axes of that view."""
    grouped = (*shape[:-1], groups, shape[-1] // groups)
    return grouped, (*range(1, len(shape) - 1), len(shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _group_norm(x, gamma, beta, config):
    return _group_norm_fwd(x, gamma, beta, config)[0]


# _group_norm_fwd :: (x, gamma, beta, GroupNormConfig) -> (y, GroupNormResiduals)
def _group_norm_fwd(x, gamma, beta, config):
    grouped, axes = _grouped(x.shape, config.groups)
    x_hat, _, _, inv_std = _standardize(x.reshape(grouped), axes, config.eps)
    x_hat = x_hat.reshape(x.shape)
    return gamma * x_hat + beta, GroupNormResiduals(x_hat, inv_std, gamma)


# _group_norm_bwd :: (GroupNormConfig, GroupNormResiduals, ct_y) -> (ct_x, ct_gamma, ct_beta)
def _group_norm_bwd(config, res, ct_y):
    x_hat = res.x_hat
    grouped, axes = _grouped(x_hat.shape, config.groups)
    examples = _leading_axes(x_hat)
    ct_gamma = jnp.sum(ct_y * x_hat, axis=examples)
    ct_beta = jnp.sum(ct_y, axis=examples)
    ct_xhat = (ct_y * res.gamma).reshape(grouped)
    m = _count(grouped, axes)
    ct_x = _standardize_bwd(x_hat.reshape(grouped), res.inv_std, ct_xhat, axes, m)
    return ct_x.reshape(x_hat.shape), ct_gamma, ct_beta


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)
group_norm_contributions = _scale_shift_contributions


def group_norm_config(x, gamma, beta, *, groups, eps=1e-5) -> GroupNormConfig:
    """Validate `group_norm`'s arguments and resolve its static settings."""
    eps = _check_channel_params("group_norm", x, eps, gamma=gamma, beta=beta)
    channels = x.shape[-1]
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"group_norm: argument `groups` must be a positive Python int, got {groups!r}")
    if channels % groups:
        raise ValueError(
            f"group_norm: argument `groups` must divide the {channels} channels of x (last axis), got groups={groups}"
        )
    return GroupNormConfig(groups, eps)


def group_norm(x: jax.Array, gamma: jax.Array, beta: jax.Array, *, groups: int, eps: float = 1e-5) -> jax.Array:
    """Group normalization, channels last, with a hand-derived VJP.

    Forward: view x [N, ..., C] as [N, ..., G, C/G]; per example and group,
    over the m = (size of the middle axes)·C/G elements: mean = Σx/m,
    var = Σ(x − mean)²/m, inv_std = 1/sqrt(var + eps),
    x_hat = (x − mean)·inv_std, y = gamma·x_hat + beta (gamma per channel).

    VJP, ct_xhat = ct_y·gamma, Σ over the m elements of one example's group:
    ct_x = inv_std/m · (m·ct_xhat − Σct_xhat − x_hat·Σct_xhat·x_hat);
    ct_gamma = Σ ct_y·x_hat and ct_beta = Σ ct_y over all axes but the last.
    Saves x_hat, inv_std and gamma. groups = 1 is layer norm over all
    non-batch axes; groups = C is instance norm.

    Args:
      x: floating array [N, ..., C], rank >= 2.
      gamma, beta: scale and shift [C], same dtype as x.
      groups: static positive int dividing C.
      eps: positive static Python float added to var.

    Returns:
      y, same shape and dtype as x.

    Derivation: derivations/norm.md#group_norm
    """
    return _group_norm(x, gamma, beta, group_norm_config(x, gamma, beta, groups=groups, eps=eps))


def group_norm_reference(x, gamma, beta, *, groups, eps=1e-5):
    grouped, axes = _grouped(x.shape, groups)
    return gamma * _standardize(x.reshape(grouped), axes, eps)[0].reshape(x.shape) + beta
