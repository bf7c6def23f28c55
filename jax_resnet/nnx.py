"""Flax NNX modules over the hand-derived rules: single-op layers, and thin
holders of the pure models' weights.

Every module computes with `jax_resnet.ops.opset(grad)`: `grad="rules"` (the
default) runs the `jax.custom_vjp` ops, so `nnx.grad` (and any optax training
loop over it) backpropagates through the hand-derived VJPs; `grad="autodiff"`
runs the reference ops and lets JAX differentiate them. `grad` is a plain
attribute, so `module.set_attributes(grad="autodiff")` switches a whole module.

Networks and blocks are not written again here. `Network(model)` holds the
(params, state) of `model.init` as `nnx.Param` and `nnx.BatchStat` variables,
in the pure pytrees' layout, and its call is `model.apply`: any model of
`jax_resnet.models` (CIFAR and ImageNet ResNets, pre-activation and plain
nets, the MLPs). `Block(spec)` does the same around `blocks.init_block` /
`blocks.apply_block`. Train and eval modes are BatchNorm's flag
`use_running_average`, which `module.train()` sets False (batch statistics;
the BatchStats are updated once per call) and `module.eval()` True (the
running statistics, left unchanged). `from_pure` and `to_pure` move weights
between the pure pytrees and the modules:

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jax_resnet import models, nnx as jrnnx
    >>> net = jrnnx.Network(models.tiny(), rngs=nnx.Rngs(0))
    >>> net(jnp.zeros((2, 8, 8, 1))).shape
    (2, 10)
    >>> params, state = jrnnx.to_pure(net)  # Model.init's layout: params["blocks"][0]["conv0"]["w"], ...
    >>> params["blocks"][0]["conv0"]["w"].shape
    (3, 3, 8, 8)
    >>> again = jrnnx.from_pure(models.tiny(), params, state)

The single-op layers mirror flax.nnx's own, parameter for parameter, so
weights move between them unchanged:

  Linear     kernel [in, out], bias [out]                       ops.dense
  Conv       kernel [kh, kw, in / groups, out] (HWIO), NHWC;    ops.conv2d
             no bias by default
  Projection kernel [in, out]: a strided 1x1 convolution        ops.projection
  BatchNorm  Param scale, bias; BatchStat mean, var             ops.batch_norm_train / _eval

BatchNorm follows nnx.BatchNorm's convention: `use_running_average=False`
normalizes with the batch's mean and biased variance and updates the running
statistics once per call, running = momentum·running + (1 − momentum)·batch;
`use_running_average=True` normalizes with the running statistics. Unlike
nnx.BatchNorm the default momentum is 0.9 (that of `jax_resnet.blocks`), and
mean and var are stored in `param_dtype` rather than always float32.

The custom VJPs have no forward mode, so `jax.jvp` of a module with
`grad="rules"` raises JAX's forward-mode TypeError; for Hessian-vector
products use `jax_resnet.hvp` (reverse over reverse) on the pure function
(`to_pure`), and `grad="autodiff"` for forward mode of the network itself.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import initializers

from jax_resnet import blocks, models
from jax_resnet.ops import GRAD_MODES, _checks, opset

__all__ = [
    "default_kernel_init",
    "default_bias_init",
    "Linear",
    "Conv",
    "Projection",
    "BatchNorm",
    "Network",
    "Block",
    "to_pure",
    "from_pure",
]


Initializer = Callable[..., jax.Array]

# flax.nnx.Linear's and nnx.Conv's defaults.
default_kernel_init = initializers.lecun_normal()
default_bias_init = initializers.zeros_init()


# ------------------------------------------------------------------ validation
def _positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner}: argument `{name}` must be a positive int, got {value!r}")
    return int(value)


def _is_real(value: object) -> bool:
    """A real number, not a bool (numpy scalars too: `numbers.Real` registers them; `float` does not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _grad_mode(owner: str, grad) -> str:
    if not isinstance(grad, str) or grad not in GRAD_MODES:
        raise ValueError(f"{owner}: argument `grad` must be one of {tuple(GRAD_MODES)}, got {grad!r}")
    return grad


def _float_dtype(owner: str, name: str, dtype, *, optional: bool = False):
    if dtype is None and optional:
        return None
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or not jnp.issubdtype(resolved, jnp.floating):
        allowed = "None or a floating dtype" if optional else "a floating dtype"
        raise TypeError(f"{owner}: argument `{name}` must be {allowed} (e.g. jnp.float32), got {dtype!r}")
    return resolved


def _check_features(owner: str, x, features: int, *, nhwc: bool = False, min_rank: int = 1) -> None:
    """Raise unless x is an array whose last axis has `features` entries (and is NHWC if asked)."""
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"{owner}: argument `x` must be an array, got {type(x).__name__}")
    if nhwc and len(shape) != 4:
        raise ValueError(
            f"{owner}: argument `x` must be NHWC (rank 4) with {features} channels, got shape {tuple(shape)}"
        )
    if len(shape) < min_rank or shape[-1] != features:
        raise ValueError(
            f"{owner}: argument `x` must have {features} features in its last axis "
            f"(rank >= {min_rank}), got shape {tuple(shape)}"
        )


def _promote(dtype, *arrays):
    """Cast every array to `dtype`, or to their common dtype when it is None (as flax does)."""
    dtype = jnp.result_type(*arrays) if dtype is None else dtype
    return tuple(jnp.asarray(a, dtype) for a in arrays)


# ---------------------------------------------------------------------- layers
class Linear(nnx.Module):
    """y = x·kernel + bias over the last axis, through `ops.dense` (a hand-derived VJP).

    VJP: ct_x = ct_y·kernelᵀ, ct_kernel = Σ_batch xᵀ·ct_y, ct_bias = Σ_batch ct_y
    (derivations/linear.md#dense).

    Args:
      in_features, out_features: positive ints.
      use_bias: add `bias` (a zero bias enters the rule when False).
      dtype: computation dtype; None promotes the input and the parameters.
      param_dtype: dtype of kernel and bias.
      kernel_init, bias_init: flax initializers (flax.nnx.Linear's defaults).
      rngs: `nnx.Rngs` with a `params` stream.
      grad: "rules" (hand-derived VJP) or "autodiff".
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool = True,
        dtype=None,
        param_dtype=jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        rngs: nnx.Rngs,
        grad: str = "rules",
    ) -> None:
        owner = type(self).__name__
        self.in_features = _positive_int(owner, "in_features", in_features)
        self.out_features = _positive_int(owner, "out_features", out_features)
        self.use_bias = bool(use_bias)
        self.dtype = _float_dtype(owner, "dtype", dtype, optional=True)
        self.param_dtype = _float_dtype(owner, "param_dtype", param_dtype)
        self.grad = _grad_mode(owner, grad)
        self.kernel = nnx.Param(kernel_init(rngs.params(), (self.in_features, self.out_features), self.param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (self.out_features,), self.param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_features(type(self).__name__, x, self.in_features)
        kernel = self.kernel[...]
        bias = jnp.zeros((self.out_features,), kernel.dtype) if self.bias is None else self.bias[...]
        x, kernel, bias = _promote(self.dtype, x, kernel, bias)
        return opset(self.grad).dense(x, kernel, bias)

    def _pure_variables(self):
        params = {"w": self.kernel, "b": self.bias} if self.use_bias else {"w": self.kernel}
        return params, {}


class Conv(nnx.Module):
    """2-D convolution of an NHWC input with an HWIO kernel, through `ops.conv2d`.

    The convolution's VJP is hand-derived (derivations/conv.md#conv2d); the
    optional bias is a broadcast add that JAX differentiates.

    Args:
      in_features, out_features: channels; both divisible by feature_group_count.
      kernel_size: int or (kh, kw).
      strides: int or (sh, sw).
      padding: "SAME" (as flax and XLA: the odd pixel at the end), "VALID",
        an int, or ((top, bottom), (left, right)).
      kernel_dilation: int or (dh, dw).
      feature_group_count: groups; in_features gives a depthwise convolution.
      use_bias: add a per-channel `bias` (default False: ResNets follow with BatchNorm).
      dtype, param_dtype, kernel_init, bias_init, rngs, grad: as for `Linear`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size,
        *,
        strides=1,
        padding="SAME",
        kernel_dilation=1,
        feature_group_count: int = 1,
        use_bias: bool = False,
        dtype=None,
        param_dtype=jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        bias_init: Initializer = default_bias_init,
        rngs: nnx.Rngs,
        grad: str = "rules",
    ) -> None:
        owner = type(self).__name__
        self.in_features = _positive_int(owner, "in_features", in_features)
        self.out_features = _positive_int(owner, "out_features", out_features)
        self.kernel_size = _checks.pair(owner, "kernel_size", kernel_size)
        self.strides = _checks.pair(owner, "strides", strides)
        self.kernel_dilation = _checks.pair(owner, "kernel_dilation", kernel_dilation)
        self.padding = _checks.padding_form(owner, padding)  # sizes are checked by conv2d at call time
        groups = _positive_int(owner, "feature_group_count", feature_group_count)
        if self.in_features % groups or self.out_features % groups:
            raise ValueError(
                f"{owner}: argument `feature_group_count` must divide in_features={self.in_features} "
                f"and out_features={self.out_features}, got {groups}"
            )
        self.feature_group_count = groups
        self.use_bias = bool(use_bias)
        self.dtype = _float_dtype(owner, "dtype", dtype, optional=True)
        self.param_dtype = _float_dtype(owner, "param_dtype", param_dtype)
        self.grad = _grad_mode(owner, grad)
        shape = (*self.kernel_size, self.in_features // groups, self.out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape, self.param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (self.out_features,), self.param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_features(type(self).__name__, x, self.in_features, nhwc=True)
        x, kernel = _promote(self.dtype, x, self.kernel[...])
        y = opset(self.grad).conv2d(
            x,
            kernel,
            stride=self.strides,
            padding=self.padding,
            dilation=self.kernel_dilation,
            groups=self.feature_group_count,
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y

    def _pure_variables(self):
        params = {"w": self.kernel, "b": self.bias} if self.use_bias else {"w": self.kernel}
        return params, {}


class Projection(nnx.Module):
    """The option-B shortcut: y = x[:, ::sh, ::sw, :]·kernel, through `ops.projection`.

    Equal to a 1x1 `Conv` with the same stride and kernel[None, None], but its
    rule saves only the strided slice of x (derivations/shortcut.md#projection).

    Args:
      in_features, out_features: channels.
      strides: int or (sh, sw).
      dtype, param_dtype, kernel_init, rngs, grad: as for `Linear`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        strides=1,
        dtype=None,
        param_dtype=jnp.float32,
        kernel_init: Initializer = default_kernel_init,
        rngs: nnx.Rngs,
        grad: str = "rules",
    ) -> None:
        owner = type(self).__name__
        self.in_features = _positive_int(owner, "in_features", in_features)
        self.out_features = _positive_int(owner, "out_features", out_features)
        self.strides = _checks.pair(owner, "strides", strides)
        self.dtype = _float_dtype(owner, "dtype", dtype, optional=True)
        self.param_dtype = _float_dtype(owner, "param_dtype", param_dtype)
        self.grad = _grad_mode(owner, grad)
        self.kernel = nnx.Param(kernel_init(rngs.params(), (self.in_features, self.out_features), self.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        _check_features(type(self).__name__, x, self.in_features, nhwc=True)
        x, kernel = _promote(self.dtype, x, self.kernel[...])
        return opset(self.grad).projection(x, kernel, stride=self.strides)

    def _pure_variables(self):
        return {"w": self.kernel}, {}


class BatchNorm(nnx.Module):
    """Batch normalization over all axes but the last, through the BN rules.

    Train mode (`use_running_average=False`): y = scale·(x − mean_B)/sqrt(var_B + ε) + bias
    with the batch's mean and biased variance (`ops.batch_norm_train`), and
    mean ← momentum·mean + (1 − momentum)·mean_B, var likewise, once per call.
    Eval mode (`use_running_average=True`): the same with the running mean and
    var (`ops.batch_norm_eval`). Derivations: derivations/norm.md.

    Args:
      num_features: channels, x's last axis.
      use_running_average: the mode (nnx.BatchNorm's flag; `model.train()`
        sets it False, `model.eval()` True); a call may override it.
      momentum: in [0, 1]; 0.9 as in `jax_resnet.blocks` (nnx.BatchNorm's
        default is 0.99).
      epsilon: positive, added to the variance.
      dtype: computation dtype; None promotes the input and the variables.
      param_dtype: dtype of scale, bias and of the running mean and var.
      scale_init, bias_init: flax initializers (ones, zeros).
      rngs, grad: as for `Linear`.
    """

    def __init__(
        self,
        num_features: int,
        *,
        use_running_average: bool | None = False,
        momentum: float = blocks.BN_MOMENTUM,
        epsilon: float = blocks.BN_EPS,
        dtype=None,
        param_dtype=jnp.float32,
        scale_init: Initializer = initializers.ones_init(),  # noqa: B008 (flax.nnx.BatchNorm's signature)
        bias_init: Initializer = initializers.zeros_init(),  # noqa: B008
        rngs: nnx.Rngs,
        grad: str = "rules",
    ) -> None:
        owner = type(self).__name__
        self.num_features = _positive_int(owner, "num_features", num_features)
        if use_running_average is not None and not isinstance(use_running_average, bool):
            raise TypeError(
                f"{owner}: argument `use_running_average` must be True, False or None, got {use_running_average!r}"
            )
        self.use_running_average = use_running_average
        if not _is_real(momentum) or not 0 <= momentum <= 1:
            raise ValueError(f"{owner}: argument `momentum` must be a number in [0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.epsilon = _checks.positive_float(owner, "epsilon", epsilon)
        self.dtype = _float_dtype(owner, "dtype", dtype, optional=True)
        self.param_dtype = _float_dtype(owner, "param_dtype", param_dtype)
        self.grad = _grad_mode(owner, grad)
        shape = (self.num_features,)
        self.scale = nnx.Param(scale_init(rngs.params(), shape, self.param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), shape, self.param_dtype))
        self.mean = nnx.BatchStat(jnp.zeros(shape, self.param_dtype))
        self.var = nnx.BatchStat(jnp.ones(shape, self.param_dtype))

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        owner = type(self).__name__
        mode = self.use_running_average if use_running_average is None else use_running_average
        if mode is None:
            raise ValueError(
                f"{owner}: no mode given; pass `use_running_average` to the constructor or the call, "
                "or set it with model.train() / model.eval()"
            )
        _check_features(owner, x, self.num_features, min_rank=2)
        ops = opset(self.grad)
        x, scale, bias = _promote(self.dtype, x, self.scale[...], self.bias[...])
        if mode:
            mean, var = (jnp.asarray(s, x.dtype) for s in (self.mean[...], self.var[...]))
            return ops.batch_norm_eval(x, scale, bias, mean, var, eps=self.epsilon)
        y, batch_mean, batch_var = ops.batch_norm_train(x, scale, bias, eps=self.epsilon)
        running = {"mean": self.mean[...], "var": self.var[...]}
        new = blocks.running_statistics(running, batch_mean, batch_var, self.momentum)
        self.mean[...], self.var[...] = new["mean"], new["var"]
        return y

    def set_view(self, use_running_average: bool | None = None):
        """Used by `nnx.view(model, use_running_average=...)`, as nnx.BatchNorm's."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def _pure_variables(self):
        return {"gamma": self.scale, "beta": self.bias}, {"mean": self.mean, "var": self.var}


# ---------------------------------------------------- holders of pure weights
def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _values(variables):
    return jax.tree.map(lambda v: v.get_value(), variables, is_leaf=_is_variable)


class _PureHolder(nnx.Module):
    """A pure (params, state) pair as `nnx.Param` / `nnx.BatchStat` variables around a pure apply.

    Subclasses pass their pure `init(key, dtype) -> (params, state)` to this
    constructor and define `_apply(params, state, x, *, train) -> (out, new_state)`.
    """

    def __init__(self, owner: str, init, *, rngs, grad, dtype, param_dtype, use_running_average):
        self.grad = _grad_mode(owner, grad)
        self.dtype = _float_dtype(owner, "dtype", dtype, optional=True)
        self.param_dtype = _float_dtype(owner, "param_dtype", param_dtype)
        if not isinstance(use_running_average, bool):
            raise TypeError(
                f"{owner}: argument `use_running_average` must be True or False, got {use_running_average!r}"
            )
        self.use_running_average = use_running_average
        params, state = init(rngs.params(), self.param_dtype)
        # nnx.data: flax 0.12 takes a plain pytree of Variables as a Module's data only when told.
        self.params = nnx.data(jax.tree.map(nnx.Param, params))
        self.state = nnx.data(jax.tree.map(nnx.BatchStat, state))

    def _apply(self, params, state, x, *, train):
        """The pure apply, `(params, state, x, *, train) -> (out, new_state)`: each subclass's own."""
        raise NotImplementedError

    def _check_input(self, x) -> None:
        if not hasattr(x, "shape"):
            raise TypeError(f"{type(self).__name__}: argument `x` must be an array, got {type(x).__name__}")

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """The pure apply on the held weights; in train mode the BatchStats take the new state.

        Args:
          x: the input the pure apply takes.
          use_running_average: overrides the attribute for this call.
        """
        self._check_input(x)
        eval_mode = self.use_running_average if use_running_average is None else use_running_average
        params, state = _values(self.params), _values(self.state)
        dtype = jnp.result_type(x, *jax.tree.leaves(params)) if self.dtype is None else self.dtype

        def cast(tree):
            return jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)

        out, new_state = self._apply(cast(params), cast(state), cast(x), train=not eval_mode)
        if not eval_mode:
            jax.tree.map(
                lambda v, s: v.set_value(jnp.asarray(s, v.get_value().dtype)),
                self.state,
                new_state,
                is_leaf=_is_variable,
            )
        return out

    def set_view(self, use_running_average: bool | None = None):
        """Used by `nnx.view(module, use_running_average=...)`, as nnx.BatchNorm's."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def _pure_variables(self):
        return self.params, self.state


def _model(owner: str, name: str, model) -> models.Model:
    """A `models.Model` from a Model, a `models.Spec`, or a preset name."""
    if isinstance(model, str):
        try:
            return models.get(model)
        except ValueError as e:
            raise ValueError(f"{owner}: argument `{name}`: {e}") from None
    if isinstance(model, models.Model):
        return model
    if isinstance(model, models.Spec):
        return models.Model(model)
    raise TypeError(
        f"{owner}: argument `{name}` must be a jax_resnet.models.Model (e.g. models.resnet20()), a "
        f"jax_resnet.models.Spec (e.g. a models.ResNetSpec) or a preset name such as 'tiny' (for one block use Block); "
        f"got {type(model).__name__}"
    )


class Network(_PureHolder):
    """Any model of `jax_resnet.models` as a module: its weights as variables, its call `model.apply`.

    Attributes `params` and `state` hold `model.init`'s pytrees with each array
    an `nnx.Param` / `nnx.BatchStat` (paths such as
    ("params", "blocks", 0, "conv0", "w")); `to_pure` reads them back.

    Args:
      model: a `models.Model` (`models.resnet20(num_classes=100)`,
        `models.residual_mlp()`), a spec it wraps, or a preset name ("tiny",
        "resnet18", "plain_mlp", ...).
      rngs: `nnx.Rngs` whose `params` stream gives `model.init` its key, so
        the weights are those `model.init(rngs.params(), param_dtype)` draws.
      grad: "rules" (hand-derived VJPs) or "autodiff".
      dtype: computation dtype: params, state and x are cast to it before
        `model.apply`; None computes in the common dtype of x and the params.
        The new BatchNorm statistics are cast back to `param_dtype`.
      param_dtype: dtype of the variables.
      use_running_average: False (train mode, `.train()`) or True (eval mode,
        `.eval()`).

    Example:
      >>> from flax import nnx
      >>> from jax_resnet import models
      >>> mlp = Network(models.residual_mlp(in_features=4, width=8), rngs=nnx.Rngs(0))
      >>> mlp(jnp.zeros((3, 4))).shape
      (3, 10)
    """

    def __init__(
        self,
        model,
        *,
        rngs: nnx.Rngs,
        grad: str = "rules",
        dtype=None,
        param_dtype=jnp.float32,
        use_running_average: bool = False,
    ) -> None:
        owner = type(self).__name__
        self.model = _model(owner, "model", model)
        settings = dict(grad=grad, dtype=dtype, param_dtype=param_dtype, use_running_average=use_running_average)
        super().__init__(owner, self.model.init, rngs=rngs, **settings)

    def _apply(self, params, state, x, *, train):
        return self.model.apply(params, state, x, train=train, grad=self.grad)


class Block(_PureHolder):
    """One residual block of `jax_resnet.blocks` as a module: `blocks.init_block`'s weights, `apply_block`'s call.

    Args:
      spec: a `jax_resnet.blocks.BlockSpec` (a kind of `blocks.KINDS`;
        shortcut "A" or "B").
      rngs, grad, dtype, param_dtype, use_running_average: as for `Network`.

    Example:
      >>> from flax import nnx
      >>> from jax_resnet import blocks
      >>> block = Block(blocks.BlockSpec("basic", 4, 4), rngs=nnx.Rngs(0))
      >>> block(jnp.zeros((2, 6, 6, 4))).shape
      (2, 6, 6, 4)
    """

    def __init__(
        self,
        spec: blocks.BlockSpec,
        *,
        rngs: nnx.Rngs,
        grad: str = "rules",
        dtype=None,
        param_dtype=jnp.float32,
        use_running_average: bool = False,
    ) -> None:
        owner = type(self).__name__
        if not isinstance(spec, blocks.BlockSpec):
            raise TypeError(
                f"{owner}: argument `spec` must be a jax_resnet.blocks.BlockSpec, got {type(spec).__name__}"
            )
        self.spec = spec

        def init(key, dtype):
            return blocks.init_block(key, spec, dtype)

        settings = dict(grad=grad, dtype=dtype, param_dtype=param_dtype, use_running_average=use_running_average)
        super().__init__(owner, init, rngs=rngs, **settings)

    def _check_input(self, x) -> None:
        _check_features(type(self).__name__, x, self.spec.in_channels, nhwc=True)

    def _apply(self, params, state, x, *, train):
        return blocks.apply_block(opset(self.grad), self.spec, params, state, x, train=train)


# ------------------------------------------------------------------ conversion
def to_pure(module) -> tuple[Any, Any]:
    """The (params, state) pytrees of `jax_resnet.models` / `blocks` holding the module's weights.

    For a `Network` they have the structure of `model.init`'s, for a `Block`
    that of `blocks.init_block`'s; for the layers kernel → "w", bias → "b",
    BatchNorm scale/bias → "gamma"/"beta", running mean/var → state.
    The arrays are the module's own (immutable) arrays, not copies.
    """
    if not hasattr(module, "_pure_variables"):
        raise TypeError(
            "to_pure: argument `module` must be a jax_resnet.nnx module (Network, Block, Linear, Conv, "
            f"Projection or BatchNorm), got {type(module).__name__}"
        )
    params, state = module._pure_variables()
    return _values(params), _values(state)


def _load(name: str, variables, values) -> None:
    """Set each Variable in `variables` to the array at the same path of `values`."""
    treedef: Any  # jaxlib's PyTreeDef, which has no type stubs
    flat, treedef = jax.tree_util.tree_flatten_with_path(variables, is_leaf=_is_variable)
    if jax.tree.structure(values) != treedef:
        expected = {jax.tree_util.keystr(path) for path, _ in flat}
        given = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(values)[0]}
        raise ValueError(
            f"from_pure: argument `{name}` does not have the model's layout; "
            f"missing {sorted(expected - given) or 'nothing'}, unexpected {sorted(given - expected) or 'nothing'} "
            "(does the model match the one the pytrees were built from?)"
        )
    for (path, variable), value in zip(flat, treedef.flatten_up_to(values)):
        want = variable.get_value()
        if jnp.shape(value) != want.shape or jnp.result_type(value) != want.dtype:
            raise ValueError(
                f"from_pure: `{name}{jax.tree_util.keystr(path)}` must have shape {tuple(want.shape)} and dtype "
                f"{want.dtype}, got shape {tuple(jnp.shape(value))} and dtype {jnp.result_type(value)}"
            )
        variable.set_value(jnp.asarray(value))


def from_pure(model, params, state, *, grad: str = "rules", dtype=None):
    """The module for `model` holding the pure pytrees' weights (the inverse of `to_pure`).

    Args:
      model: a `blocks.BlockSpec` (gives a `Block`), or anything `Network`
        takes: a `models.Model`, a spec, a preset name (gives a `Network`).
      params, state: pytrees as `model.init` / `blocks.init_block` return
        them; every array must have one floating dtype, which becomes the
        module's param_dtype.
      grad, dtype: as for `Network`.

    Returns:
      The module in train mode (`use_running_average=False`). Its call
      equals `model.apply(params, state, x, train=True)` (`.eval()`:
      train=False) and its BatchStats after a train-mode call equal the new state.
    """
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError("from_pure: argument `params` holds no arrays")
    param_dtype = jnp.result_type(leaves[0])
    if not jnp.issubdtype(param_dtype, jnp.floating):
        raise TypeError(f"from_pure: argument `params` must hold floating arrays, got dtype {param_dtype}")
    settings = dict(grad=_grad_mode("from_pure", grad), dtype=dtype, param_dtype=param_dtype)
    build: Callable[[], _PureHolder]
    if isinstance(model, blocks.BlockSpec):
        build = lambda: Block(model, rngs=nnx.Rngs(0), **settings)  # noqa: E731
    else:
        model = _model("from_pure", "model", model)
        build = lambda: Network(model, rngs=nnx.Rngs(0), **settings)  # noqa: E731
    # Only shapes: the initial weights would be overwritten anyway.
    module = nnx.eval_shape(build)
    _load("params", module.params, params)
    _load("state", module.state, state)
    return module
