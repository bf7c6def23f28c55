"""Primitives of residual networks, each a `jax.custom_vjp` with a hand-derived
backward pass beside its forward, and a plain-`jnp` `<name>_reference` twin
with the same signature that JAX differentiates.

Each family module lists its public ops in `OPS`; everything here is built
from those lists, by the names every op has (CONTRIBUTING.md):

  <name>            the rule: validates, resolves its settings, calls the core
  <name>_reference  the twin JAX differentiates
  _<name>_fwd       the core's forward, (*arrays[, config]) -> (y, residuals)
  _<name>_bwd       the core's backward, ([config, ]residuals, ct_y) -> cotangents
  <name>_config     (ops with static settings) (*arrays, **settings) -> the
                    hashable config the core takes as its one `nondiff_argnums`
  PARAMS[<name>]    (ops with parameters) the parameters' names among the rule's
                    positional arguments, in the module's `PARAMS` dict
  <name>_contributions  (ops with parameters, where each example's share exists)
                    ([config, ]residuals, ct_y) -> one `contributions.Weight` or
                    `contributions.Vector` per parameter: what each example
                    contributes at each position (per_example, curvature)

`SPECS` holds an `OpSpec` per op, and `opset("rules")` / `opset("autodiff")`
return the two `OpSet`s under the same names, so models are written once and
choose their gradients per call. `jax_resnet.ops.relu` etc. are the rules.

The flat names and the `OpSet` fields are written out below, so that editors
and type checkers see them; `tests/test_rules.py::test_ops_lists_are_the_specs`
keeps both equal to `SPECS`, which the family modules' `OPS` tuples define.
"""

from __future__ import annotations

import inspect
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

# The families, in `OpSet` order; a new family adds its module here.
FAMILIES = (activations, linear, conv, norm, pool, shortcut, loss)


class OpSpec(NamedTuple):
    """One op's public surface, read off its family module by name.

    Attributes:
      name: the op's name, e.g. "conv2d"; also its `OpSet` field.
      family: its module's name, also its document: derivations/<family>.md.
      fn: the rule, the public wrapper around the `custom_vjp` core.
      reference: the plain-`jnp` twin, same signature and forward values.
      config: `(*arrays, **settings) -> config`, the checks and the static
        settings resolved for these arrays; None for an op without settings.
      fwd: the core's forward, `(*arrays[, config]) -> (y, residuals)`.
      bwd: the core's backward, `([config, ]residuals, ct_y) -> cotangents`, one per array.
      params: the positions of the parameters among the rule's positional arguments
        (dense: (1, 2) for w and b); () for an op without parameters.
      contributions: `([config, ]residuals, ct_y) -> forms`, one `contributions.Weight` or
        `contributions.Vector` per parameter, in `params` order: what each example
        contributes to it at each position; None where no example's share exists
        (batch_norm_train) or the op has no parameters.
    """

    name: str
    family: str
    fn: Callable
    reference: Callable
    config: Callable | None
    fwd: Callable
    bwd: Callable
    params: tuple[int, ...] = ()
    contributions: Callable | None = None

    @property
    def doc(self) -> str:
        """The derivation anchor, "<family>.md#<name>"."""
        return f"{self.family}.md#{self.name}"

    def saved(self, *arrays, **settings):
        """`(y, residuals)`: the forward the rule runs under differentiation, for
        these arrays and settings (keywords), and what it saves for the backward."""
        if self.config is None:
            if settings:
                raise TypeError(f"{self.name} has no settings, got {', '.join(sorted(settings))}")
            return self.fwd(*arrays)
        return self.fwd(*arrays, self.config(*arrays, **settings))

    def forward(self, config, *arrays):
        """The core's forward, `(y, residuals)`, with `config` (None for an op without settings)."""
        return self.fwd(*arrays) if self.config is None else self.fwd(*arrays, config)

    def backward(self, config, res, ct_y):
        """The core's backward: one cotangent per array of `forward`."""
        return self.bwd(res, ct_y) if self.config is None else self.bwd(config, res, ct_y)

    def contribute(self, config, res, ct_y):
        """The parameters' contribution forms from the core's residuals and output cotangent."""
        return self.contributions(res, ct_y) if self.config is None else self.contributions(config, res, ct_y)


def _spec(module, name: str) -> OpSpec:
    family = module.__name__.rsplit(".", 1)[1]
    missing = [a for a in (name, f"{name}_reference", f"_{name}_fwd", f"_{name}_bwd") if not hasattr(module, a)]
    if missing:
        raise AttributeError(
            f"{module.__name__}.OPS lists {name!r}, but the module has no {', '.join(missing)}; "
            f"an op needs {name}, _{name}_fwd, _{name}_bwd and {name}_reference (CONTRIBUTING.md)"
        )
    fn = getattr(module, name)
    arguments = list(inspect.signature(fn).parameters)
    names = getattr(module, "PARAMS", {}).get(name, ())
    unknown = [p for p in names if p not in arguments]
    if unknown:
        raise AttributeError(f"{module.__name__}.PARAMS[{name!r}] names {unknown}, not arguments of {name}{arguments}")
    return OpSpec(
        name,
        family,
        fn,
        getattr(module, f"{name}_reference"),
        getattr(module, f"{name}_config", None),
        getattr(module, f"_{name}_fwd"),
        getattr(module, f"_{name}_bwd"),
        tuple(arguments.index(p) for p in names),
        getattr(module, f"{name}_contributions", None),
    )


SPECS: dict[str, OpSpec] = {name: _spec(module, name) for module in FAMILIES for name in module.OPS}


class OpSet(NamedTuple):
    """Every op under one name; fields are the rules or their reference twins, in `SPECS` order."""

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


if OpSet._fields != tuple(SPECS):
    raise ImportError(
        f"jax_resnet.ops.OpSet lists {OpSet._fields}, but the families' OPS give {tuple(SPECS)}: "
        "a new op adds its field to OpSet and its name to the imports and __all__ here (CONTRIBUTING.md)"
    )

RULES = OpSet(*(spec.fn for spec in SPECS.values()))
AUTODIFF = OpSet(*(spec.reference for spec in SPECS.values()))
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


__all__ = [
    "activations",
    "conv",
    "linear",
    "loss",
    "norm",
    "pool",
    "shortcut",
    "FAMILIES",
    "OpSpec",
    "SPECS",
    "OpSet",
    "opset",
    "RULES",
    "AUTODIFF",
    "GRAD_MODES",
    # The rules, flat (`jax_resnet.ops.conv2d`), in `SPECS` order.
    "relu",
    "leaky_relu",
    "tanh",
    "sigmoid",
    "gelu",
    "silu",
    "softplus",
    "dense",
    "conv2d",
    "batch_norm_train",
    "batch_norm_eval",
    "layer_norm",
    "group_norm",
    "max_pool",
    "avg_pool",
    "global_avg_pool",
    "add",
    "shortcut_pad",
    "projection",
    "mse_loss",
    "softmax_cross_entropy",
]
