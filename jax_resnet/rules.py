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
from jax_resnet.ops import activations


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

# Each family's entries; a new family adds its list here.
REGISTRY: dict[str, Rule] = {r.name: r for r in [*_ACTIVATIONS]}


def get(name: str) -> Rule:
    """Look up a rule by name, with the known names in the error."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"no rule named {name!r}; registered: {', '.join(sorted(REGISTRY))}") from None
