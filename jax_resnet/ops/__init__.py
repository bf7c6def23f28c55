"""Primitives of residual networks, each a `jax.custom_vjp` with a hand-derived
backward pass beside its forward, and a plain-`jnp` `<name>_reference` twin
with the same signature that JAX differentiates.

`opset("rules")` and `opset("autodiff")` return the two sets under the same
names, so models are written once and choose their gradients per call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from jax_resnet.ops import activations, conv, linear, loss, norm, pool, shortcut
from jax_resnet.ops.activations import gelu, leaky_relu, relu, sigmoid, silu, softplus, tanh
from jax_resnet.ops.conv import conv2d
from jax_resnet.ops.linear import dense
from jax_resnet.ops.loss import mse_loss, softmax_cross_entropy
from jax_resnet.ops.norm import batch_norm_eval, batch_norm_train, group_norm, layer_norm
from jax_resnet.ops.pool import avg_pool, global_avg_pool, max_pool
from jax_resnet.ops.shortcut import add, projection, shortcut_pad

__all__ = [
    "activations",
    "conv",
    "linear",
    "loss",
    "norm",
    "pool",
    "shortcut",
    "OpSet",
    "opset",
    "RULES",
    "AUTODIFF",
    "GRAD_MODES",
    "gelu",
    "leaky_relu",
    "relu",
    "sigmoid",
    "silu",
    "softplus",
    "tanh",
    "conv2d",
    "dense",
    "mse_loss",
    "softmax_cross_entropy",
    "batch_norm_eval",
    "batch_norm_train",
    "group_norm",
    "layer_norm",
    "avg_pool",
    "global_avg_pool",
    "max_pool",
    "add",
    "projection",
    "shortcut_pad",
]


class OpSet(NamedTuple):
    """Every op under one name; fields are the rule or its reference twin."""

    relu: Callable
    leaky_relu: Callable
    tanh: Callable
    sigmoid: Callable
    gelu: Callable
    silu: Callable
    softplus: Callable
    dense: Callable
    conv2d: Callable
    batch_norm_train: Callable
    batch_norm_eval: Callable
    layer_norm: Callable
    group_norm: Callable
    max_pool: Callable
    avg_pool: Callable
    global_avg_pool: Callable
    add: Callable
    shortcut_pad: Callable
    projection: Callable
    mse_loss: Callable
    softmax_cross_entropy: Callable


_MODULES = (activations, linear, conv, norm, pool, shortcut, loss)


def _collect(suffix: str) -> OpSet:
    found = {}
    for name in OpSet._fields:
        for module in _MODULES:
            if hasattr(module, name):
                found[name] = getattr(module, name + suffix)
    return OpSet(**found)


RULES = _collect("")
AUTODIFF = _collect("_reference")
GRAD_MODES = {"rules": RULES, "autodiff": AUTODIFF}


def opset(grad: str | OpSet = "rules") -> OpSet:
    """The ops with hand-derived VJPs (`"rules"`) or JAX autodiff (`"autodiff"`).

    An `OpSet` passes through unchanged, so callers can bring their own (for
    example `RULES._replace(relu=my_relu)` to test or time one rule swapped out).
    """
    if isinstance(grad, OpSet):
        return grad
    try:
        return GRAD_MODES[grad]
    except (KeyError, TypeError):
        raise ValueError(f"argument `grad` must be 'rules', 'autodiff' or an OpSet, got {grad!r}") from None
