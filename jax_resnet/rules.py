"""The registry: every hand-derived rule, with its reference twin, an argument
maker, tolerances and its derivation. Tests, `jax-resnet verify`, the
benchmarks and the documentation-coverage test all iterate `REGISTRY`.

An entry is one *configuration* of a rule (conv2d with stride 2 and SAME
padding is one entry, with groups another), so that the settings a residual
network uses are each checked. Settings are bound with `functools.partial`;
the entry's callables take only arrays.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jax_resnet.gradcheck import DEFAULT_RTOL
from jax_resnet.ops import activations, linear, loss, norm


@dataclasses.dataclass(frozen=True)
class Rule:
    """One registered rule.

    Attributes:
      name: unique id, e.g. "conv2d[stride=2,SAME]".
      fn: the rule (a `jax.custom_vjp` behind its public wrapper); arrays only.
      reference: plain-`jnp` twin with the same forward values, differentiated by JAX.
      fwd: the rule's forward pass, `(*args) -> (y, residuals)`: what it saves.
      make_args: `(key, dtype) -> tuple of arrays` for `fn` and `reference`.
      doc: derivation anchor, "family.md#section", under derivations/.
      rtol: tolerance of rule-vs-reference per dtype.
    """

    name: str
    fn: Callable
    reference: Callable
    fwd: Callable
    make_args: Callable[[jax.Array, Any], tuple]
    doc: str
    rtol: Mapping[Any, float] = dataclasses.field(default_factory=lambda: dict(DEFAULT_RTOL))

    @property
    def family(self) -> str:
        return self.doc.split(".md#")[0]

    @property
    def section(self) -> str:
        return self.doc.split("#", 1)[1]


def normal(key, shape, dtype, scale=1.0):
    return scale * jax.random.normal(key, shape, dtype)


def _unary(shape):
    return lambda key, dtype: (normal(key, shape, dtype, 2.0),)


_ACT_SHAPE = (3, 4, 5)

_ACTIVATIONS = [
    Rule("relu", activations.relu, activations.relu_reference, activations._relu_fwd, _unary(_ACT_SHAPE), "activations.md#relu"),
    Rule(
        "leaky_relu",
        partial(activations.leaky_relu, negative_slope=0.1),
        partial(activations.leaky_relu_reference, negative_slope=0.1),
        partial(activations._leaky_relu_fwd, negative_slope=0.1),
        _unary(_ACT_SHAPE),
        "activations.md#leaky_relu",
    ),
    Rule("tanh", activations.tanh, activations.tanh_reference, activations._tanh_fwd, _unary(_ACT_SHAPE), "activations.md#tanh"),
    Rule("sigmoid", activations.sigmoid, activations.sigmoid_reference, activations._sigmoid_fwd, _unary(_ACT_SHAPE), "activations.md#sigmoid"),
    Rule(
        "gelu",
        activations.gelu,
        activations.gelu_reference,
        partial(activations._gelu_fwd, approximate=False),
        _unary(_ACT_SHAPE),
        "activations.md#gelu",
    ),
    Rule(
        "gelu[tanh]",
        partial(activations.gelu, approximate=True),
        partial(activations.gelu_reference, approximate=True),
        partial(activations._gelu_fwd, approximate=True),
        _unary(_ACT_SHAPE),
        "activations.md#gelu",
    ),
    Rule("silu", activations.silu, activations.silu_reference, activations._silu_fwd, _unary(_ACT_SHAPE), "activations.md#silu"),
    Rule("softplus", activations.softplus, activations.softplus_reference, activations._softplus_fwd, _unary(_ACT_SHAPE), "activations.md#softplus"),
]


def _dense_args(batch_shape):
    def make(key, dtype):
        kx, kw, kb = jax.random.split(key, 3)
        return (normal(kx, (*batch_shape, 5), dtype), normal(kw, (5, 3), dtype, 0.5), normal(kb, (3,), dtype))

    return make


_LINEAR = [
    Rule("dense", linear.dense, linear.dense_reference, linear._dense_fwd, _dense_args((4,)), "linear.md#dense"),
    Rule("dense[batch=2x3]", linear.dense, linear.dense_reference, linear._dense_fwd, _dense_args((2, 3)), "linear.md#dense"),
]


def _mse_args(key, dtype):
    ka, ky = jax.random.split(key)
    return normal(ka, (4, 3), dtype), normal(ky, (4, 3), dtype)


def _ce_args(scale):
    def make(key, dtype):
        kz, kl = jax.random.split(key)
        return normal(kz, (6, 5), dtype, scale), jax.random.randint(kl, (6,), 0, 5)

    return make


_LOSS = [
    Rule("mse_loss", loss.mse_loss, loss.mse_loss_reference, loss._mse_loss_fwd, _mse_args, "loss.md#mse_loss"),
    Rule(
        "softmax_cross_entropy",
        loss.softmax_cross_entropy,
        loss.softmax_cross_entropy_reference,
        partial(loss._softmax_cross_entropy_fwd, label_smoothing=0.0),
        _ce_args(1.0),
        "loss.md#softmax_cross_entropy",
    ),
    Rule(
        "softmax_cross_entropy[smooth=0.1,large]",
        partial(loss.softmax_cross_entropy, label_smoothing=0.1),
        partial(loss.softmax_cross_entropy_reference, label_smoothing=0.1),
        partial(loss._softmax_cross_entropy_fwd, label_smoothing=0.1),
        _ce_args(30.0),
        "loss.md#softmax_cross_entropy",
    ),
]

def _norm_args(shape, statistics=False):
    """x [..., C], a random gamma (not all ones, so a wrong ct_gamma shows) and beta;
    with `statistics`, a running mean and a positive running var as well."""

    def make(key, dtype):
        kx, kg, kb, km, kv = jax.random.split(key, 5)
        c = shape[-1]
        args = (normal(kx, shape, dtype, 2.0), 1 + normal(kg, (c,), dtype, 0.5), normal(kb, (c,), dtype))
        if statistics:
            args += (normal(km, (c,), dtype), 0.5 + jax.random.uniform(kv, (c,), dtype))
        return args

    return make


_NORM = [
    Rule(
        "batch_norm_train[nhwc]",
        norm.batch_norm_train,
        norm.batch_norm_train_reference,
        partial(norm._batch_norm_train_fwd, eps=1e-5),
        _norm_args((4, 3, 3, 5)),
        "norm.md#batch_norm_train",
    ),
    Rule(
        "batch_norm_train[2d]",
        norm.batch_norm_train,
        norm.batch_norm_train_reference,
        partial(norm._batch_norm_train_fwd, eps=1e-5),
        _norm_args((6, 5)),
        "norm.md#batch_norm_train",
    ),
    Rule(
        "batch_norm_eval",
        norm.batch_norm_eval,
        norm.batch_norm_eval_reference,
        partial(norm._batch_norm_eval_fwd, eps=1e-5),
        _norm_args((4, 3, 3, 5), statistics=True),
        "norm.md#batch_norm_eval",
    ),
    Rule("layer_norm", norm.layer_norm, norm.layer_norm_reference, partial(norm._layer_norm_fwd, eps=1e-5), _norm_args((3, 4, 6)), "norm.md#layer_norm"),
    Rule(
        "group_norm[groups=3]",
        partial(norm.group_norm, groups=3),
        partial(norm.group_norm_reference, groups=3),
        partial(norm._group_norm_fwd, groups=3, eps=1e-5),
        _norm_args((2, 3, 3, 6)),
        "norm.md#group_norm",
    ),
]

# Each family's entries; a new family adds its list here.
REGISTRY: dict[str, Rule] = {r.name: r for r in [*_ACTIVATIONS, *_LINEAR, *_LOSS, *_NORM]}


def get(name: str) -> Rule:
    """Look up a rule by name, with the known names in the error."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"no rule named {name!r}; registered: {', '.join(sorted(REGISTRY))}") from None
