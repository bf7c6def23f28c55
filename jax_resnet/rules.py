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
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax

from jax_resnet.gradcheck import DEFAULT_RTOL
from jax_resnet.ops import activations, conv, linear, loss, norm, pool, shortcut


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
    Rule(
        "relu",
        activations.relu,
        activations.relu_reference,
        activations._relu_fwd,
        _unary(_ACT_SHAPE),
        "activations.md#relu",
    ),
    Rule(
        "leaky_relu",
        partial(activations.leaky_relu, negative_slope=0.1),
        partial(activations.leaky_relu_reference, negative_slope=0.1),
        partial(activations._leaky_relu_fwd, negative_slope=0.1),
        _unary(_ACT_SHAPE),
        "activations.md#leaky_relu",
    ),
    Rule(
        "tanh",
        activations.tanh,
        activations.tanh_reference,
        activations._tanh_fwd,
        _unary(_ACT_SHAPE),
        "activations.md#tanh",
    ),
    Rule(
        "sigmoid",
        activations.sigmoid,
        activations.sigmoid_reference,
        activations._sigmoid_fwd,
        _unary(_ACT_SHAPE),
        "activations.md#sigmoid",
    ),
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
    Rule(
        "silu",
        activations.silu,
        activations.silu_reference,
        activations._silu_fwd,
        _unary(_ACT_SHAPE),
        "activations.md#silu",
    ),
    Rule(
        "softplus",
        activations.softplus,
        activations.softplus_reference,
        activations._softplus_fwd,
        _unary(_ACT_SHAPE),
        "activations.md#softplus",
    ),
]


def _dense_args(batch_shape):
    def make(key, dtype):
        kx, kw, kb = jax.random.split(key, 3)
        return (normal(kx, (*batch_shape, 5), dtype), normal(kw, (5, 3), dtype, 0.5), normal(kb, (3,), dtype))

    return make


_LINEAR = [
    Rule("dense", linear.dense, linear.dense_reference, linear._dense_fwd, _dense_args((4,)), "linear.md#dense"),
    Rule(
        "dense[batch=2x3]",
        linear.dense,
        linear.dense_reference,
        linear._dense_fwd,
        _dense_args((2, 3)),
        "linear.md#dense",
    ),
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
    Rule(
        "layer_norm",
        norm.layer_norm,
        norm.layer_norm_reference,
        partial(norm._layer_norm_fwd, eps=1e-5),
        _norm_args((3, 4, 6)),
        "norm.md#layer_norm",
    ),
    Rule(
        "group_norm[groups=3]",
        partial(norm.group_norm, groups=3),
        partial(norm.group_norm_reference, groups=3),
        partial(norm._group_norm_fwd, groups=3, eps=1e-5),
        _norm_args((2, 3, 3, 6)),
        "norm.md#group_norm",
    ),
]


def _conv(name, x_shape, w_shape, **settings):
    """A conv2d entry: the settings bound into fn, reference and fwd (whose
    static config is resolved from the arrays, as the public wrapper does)."""

    def make(key, dtype):
        kx, kw = jax.random.split(key)
        return normal(kx, x_shape, dtype), normal(kw, w_shape, dtype, 0.5)

    def fwd(x, w):
        return conv._conv2d_fwd(x, w, conv.conv2d_config(x, w, **settings))

    return Rule(
        name, partial(conv.conv2d, **settings), partial(conv.conv2d_reference, **settings), fwd, make, "conv.md#conv2d"
    )


_CONV = [
    _conv("conv2d[3x3,s1,SAME]", (2, 6, 6, 3), (3, 3, 3, 4)),
    _conv("conv2d[3x3,s2,SAME]", (2, 8, 7, 3), (3, 3, 3, 4), stride=2),
    _conv("conv2d[3x3,s1,VALID]", (2, 6, 5, 3), (3, 3, 3, 4), padding="VALID"),
    _conv("conv2d[3x3,s1,pad=((2,0),(1,3))]", (2, 5, 6, 2), (3, 3, 2, 3), padding=((2, 0), (1, 3))),
    _conv("conv2d[3x3,d2,SAME]", (2, 7, 7, 2), (3, 3, 2, 3), dilation=2),
    _conv("conv2d[3x3,g2,SAME]", (2, 6, 6, 4), (3, 3, 2, 6), groups=2),
    _conv("conv2d[3x3,depthwise,SAME]", (2, 6, 6, 3), (3, 3, 1, 6), groups=3),
    _conv("conv2d[1x1,s2,VALID]", (2, 6, 6, 3), (1, 1, 3, 5), stride=2, padding="VALID"),  # rem = 1
    _conv("conv2d[7x7,s2,SAME]", (2, 9, 9, 3), (7, 7, 3, 4), stride=2),  # the ResNet stem
    _conv("conv2d[3x3,s3,pad=1,rem=(1,2)]", (2, 8, 9, 2), (3, 3, 2, 3), stride=3, padding=1),
]


def _pool(name, op, x_shape, **settings):
    """A max_pool or avg_pool entry: the settings bound into fn and reference; fwd
    resolves the static geometry from x, as the public wrapper does."""
    core_fwd = getattr(pool, f"_{op}_fwd")

    def fwd(x):
        return core_fwd(x, pool._geometry(op, x.shape, **settings))

    return Rule(
        name,
        partial(getattr(pool, op), **settings),
        partial(getattr(pool, f"{op}_reference"), **settings),
        fwd,
        _unary(x_shape),
        f"pool.md#{op}",
    )


_POOL = [
    _pool(
        "max_pool[3x3,s2,SAME]", "max_pool", (2, 8, 8, 3), window=3, stride=2, padding="SAME"
    ),  # the ResNet stem; pads (0, 1)
    _pool(
        "max_pool[2x2,s2,VALID]", "max_pool", (2, 7, 7, 3), window=2, stride=2, padding="VALID"
    ),  # last row/column unread
    _pool("max_pool[3x3,s1,pad=((1,0),(2,1))]", "max_pool", (2, 6, 5, 2), window=3, stride=1, padding=((1, 0), (2, 1))),
    _pool("avg_pool[2x2,s2,VALID]", "avg_pool", (2, 7, 6, 3), window=2, stride=2, padding="VALID"),
    _pool("avg_pool[3x3,s1,SAME]", "avg_pool", (2, 6, 6, 2), window=3, stride=1, padding="SAME"),
    Rule(
        "global_avg_pool",
        pool.global_avg_pool,
        pool.global_avg_pool_reference,
        lambda x: pool._global_avg_pool_fwd(x, x.shape[1:3]),
        _unary((2, 5, 4, 6)),
        "pool.md#global_avg_pool",
    ),
]


def _add_args(key, dtype):
    ka, kb = jax.random.split(key)
    return normal(ka, (2, 4, 4, 6), dtype), normal(kb, (2, 4, 4, 6), dtype)


def _shortcut_pad(name, x_shape, **settings):
    def fwd(x):
        return shortcut._shortcut_pad_fwd(x, *shortcut._shortcut_pad_settings(x, **settings))

    return Rule(
        name,
        partial(shortcut.shortcut_pad, **settings),
        partial(shortcut.shortcut_pad_reference, **settings),
        fwd,
        _unary(x_shape),
        "shortcut.md#shortcut_pad",
    )


def _projection(name, x_shape, w_shape, **settings):
    def make(key, dtype):
        kx, kw = jax.random.split(key)
        return normal(kx, x_shape, dtype), normal(kw, w_shape, dtype, 0.5)

    def fwd(x, w):
        return shortcut._projection_fwd(x, w, *shortcut._projection_settings(x, w, **settings))

    return Rule(
        name,
        partial(shortcut.projection, **settings),
        partial(shortcut.projection_reference, **settings),
        fwd,
        make,
        "shortcut.md#projection",
    )


_SHORTCUT = [
    Rule("add", shortcut.add, shortcut.add_reference, shortcut._add_fwd, _add_args, "shortcut.md#add"),
    _shortcut_pad("shortcut_pad[s2,4->8]", (2, 8, 7, 4), out_channels=8, stride=2),  # row 7 is never read; column 6 is
    _shortcut_pad("shortcut_pad[s1,3->6]", (2, 5, 5, 3), out_channels=6, stride=1),  # odd split: 1 before, 2 after
    _projection("projection[s2]", (2, 7, 6, 3), (3, 6), stride=2),  # row 6 is read; column 5 is never read
    _projection("projection[s1]", (2, 5, 5, 4), (4, 6), stride=1),
]

# Each family's entries; a new family adds its list here.
REGISTRY: dict[str, Rule] = {r.name: r for r in [*_ACTIVATIONS, *_LINEAR, *_LOSS, *_NORM, *_CONV, *_POOL, *_SHORTCUT]}


def get(name: str) -> Rule:
    """Look up a rule by name, with the known names in the error."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"no rule named {name!r}; registered: {', '.join(sorted(REGISTRY))}") from None
