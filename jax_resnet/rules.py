"""The registry: every hand-derived rule, with its reference twin, an argument
maker, tolerances and its derivation. Tests, `jax-resnet verify`, the
benchmarks and the documentation-coverage test all iterate `REGISTRY`.

An entry is one *configuration* of an op (conv2d with stride 2 and SAME
padding is one entry, with groups another), so that the settings a residual
network uses are each checked. Entries are built by `entry` from the op's
public surface, `jax_resnet.ops.SPECS[op]`: its settings are bound into the
rule, the reference and the saved-residuals forward, so the entry's callables
take only arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax

from jax_resnet.gradcheck import DEFAULT_RTOL
from jax_resnet.ops import SPECS

__all__ = [
    "Rule",
    "entry",
    "normal",
    "REGISTRY",
    "get",
]


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


def entry(name: str, make_args: Callable[[jax.Array, Any], tuple], **settings) -> Rule:
    """The entry `name` = "<op>" or "<op>[<what this configuration is>]", for the
    op's settings given as keywords (none: its defaults)."""
    spec = SPECS[name.split("[", 1)[0]]
    bind = (lambda f: partial(f, **settings)) if settings else (lambda f: f)
    return Rule(name, bind(spec.fn), bind(spec.reference), partial(spec.saved, **settings), make_args, spec.doc)


def normal(key, shape, dtype, scale=1.0):
    return scale * jax.random.normal(key, shape, dtype)


def _unary(shape):
    return lambda key, dtype: (normal(key, shape, dtype, 2.0),)


def _x_w(x_shape, w_shape):
    """x, and a weight w at half the scale, for conv2d and projection."""

    def make(key, dtype):
        kx, kw = jax.random.split(key)
        return normal(kx, x_shape, dtype), normal(kw, w_shape, dtype, 0.5)

    return make


_ACT = _unary((3, 4, 5))

_ACTIVATIONS = [
    entry("relu", _ACT),
    entry("leaky_relu", _ACT, negative_slope=0.1),
    entry("tanh", _ACT),
    entry("sigmoid", _ACT),
    entry("gelu", _ACT),
    entry("gelu[tanh]", _ACT, approximate=True),
    entry("silu", _ACT),
    entry("softplus", _ACT),
]


def _dense_args(batch_shape):
    def make(key, dtype):
        kx, kw, kb = jax.random.split(key, 3)
        return (normal(kx, (*batch_shape, 5), dtype), normal(kw, (5, 3), dtype, 0.5), normal(kb, (3,), dtype))

    return make


_LINEAR = [
    entry("dense", _dense_args((4,))),
    entry("dense[batch=2x3]", _dense_args((2, 3))),
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
    entry("mse_loss", _mse_args),
    entry("softmax_cross_entropy", _ce_args(1.0)),
    entry("softmax_cross_entropy[smooth=0.1,large]", _ce_args(30.0), label_smoothing=0.1),
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
    entry("batch_norm_train[nhwc]", _norm_args((4, 3, 3, 5))),
    entry("batch_norm_train[2d]", _norm_args((6, 5))),
    entry("batch_norm_eval", _norm_args((4, 3, 3, 5), statistics=True)),
    entry("layer_norm", _norm_args((3, 4, 6))),
    entry("group_norm[groups=3]", _norm_args((2, 3, 3, 6)), groups=3),
]

_CONV = [
    entry("conv2d[3x3,s1,SAME]", _x_w((2, 6, 6, 3), (3, 3, 3, 4))),
    entry("conv2d[3x3,s2,SAME]", _x_w((2, 8, 7, 3), (3, 3, 3, 4)), stride=2),
    entry("conv2d[3x3,s1,VALID]", _x_w((2, 6, 5, 3), (3, 3, 3, 4)), padding="VALID"),
    entry("conv2d[3x3,s1,pad=((2,0),(1,3))]", _x_w((2, 5, 6, 2), (3, 3, 2, 3)), padding=((2, 0), (1, 3))),
    entry("conv2d[3x3,d2,SAME]", _x_w((2, 7, 7, 2), (3, 3, 2, 3)), dilation=2),
    entry("conv2d[3x3,g2,SAME]", _x_w((2, 6, 6, 4), (3, 3, 2, 6)), groups=2),
    entry("conv2d[3x3,depthwise,SAME]", _x_w((2, 6, 6, 3), (3, 3, 1, 6)), groups=3),
    entry("conv2d[1x1,s2,VALID]", _x_w((2, 6, 6, 3), (1, 1, 3, 5)), stride=2, padding="VALID"),  # rem = 1
    entry("conv2d[7x7,s2,SAME]", _x_w((2, 9, 9, 3), (7, 7, 3, 4)), stride=2),  # the ResNet stem
    entry("conv2d[3x3,s3,pad=1,rem=(1,2)]", _x_w((2, 8, 9, 2), (3, 3, 2, 3)), stride=3, padding=1),
]

_POOL = [
    # The ResNet stem; pads (0, 1).
    entry("max_pool[3x3,s2,SAME]", _unary((2, 8, 8, 3)), window=3, stride=2, padding="SAME"),
    # The last row and column are never read.
    entry("max_pool[2x2,s2,VALID]", _unary((2, 7, 7, 3)), window=2, stride=2, padding="VALID"),
    entry("max_pool[3x3,s1,pad=((1,0),(2,1))]", _unary((2, 6, 5, 2)), window=3, stride=1, padding=((1, 0), (2, 1))),
    entry("avg_pool[2x2,s2,VALID]", _unary((2, 7, 6, 3)), window=2, stride=2, padding="VALID"),
    entry("avg_pool[3x3,s1,SAME]", _unary((2, 6, 6, 2)), window=3, stride=1, padding="SAME"),
    entry("global_avg_pool", _unary((2, 5, 4, 6))),
]


def _add_args(key, dtype):
    ka, kb = jax.random.split(key)
    return normal(ka, (2, 4, 4, 6), dtype), normal(kb, (2, 4, 4, 6), dtype)


_SHORTCUT = [
    entry("add", _add_args),
    # Row 7 is never read; column 6 is.
    entry("shortcut_pad[s2,4->8]", _unary((2, 8, 7, 4)), out_channels=8, stride=2),
    # An odd split: 1 zero channel before, 2 after.
    entry("shortcut_pad[s1,3->6]", _unary((2, 5, 5, 3)), out_channels=6, stride=1),
    # Row 6 is read; column 5 is never read.
    entry("projection[s2]", _x_w((2, 7, 6, 3), (3, 6)), stride=2),
    entry("projection[s1]", _x_w((2, 5, 5, 4), (4, 6)), stride=1),
]

# Each family's entries; a new family adds its list here.
REGISTRY: dict[str, Rule] = {r.name: r for r in [*_ACTIVATIONS, *_LINEAR, *_LOSS, *_NORM, *_CONV, *_POOL, *_SHORTCUT]}


def get(name: str) -> Rule:
    """Look up a rule by name, with the known names in the error."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"no rule named {name!r}; registered: {', '.join(sorted(REGISTRY))}") from None
