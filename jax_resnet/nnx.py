"""Flax NNX modules whose forward passes call the hand-derived rules.

Each module computes with `jax_resnet.ops.opset(grad)`: `grad="rules"` (the
default) runs the `jax.custom_vjp` ops, so `nnx.grad` (and any optax training
loop over it) backpropagates through the hand-derived VJPs; `grad="autodiff"`
runs the reference ops and lets JAX differentiate them. `grad` is a plain
attribute, so `model.set_attributes(grad="autodiff")` switches a whole model.

Layers mirror flax.nnx's own, parameter for parameter, so weights move
between them unchanged:

  Linear     kernel [in, out], bias [out]                       ops.dense
  Conv       kernel [kh, kw, in / groups, out] (HWIO), NHWC;    ops.conv2d
             no bias by default
  Projection kernel [in, out]: a strided 1x1 convolution        ops.projection
  BatchNorm  Param scale, bias; BatchStat mean, var             ops.batch_norm_train / _eval

BatchNorm follows nnx.BatchNorm's convention: `use_running_average=False`
(train mode, also what `model.train()` sets) normalizes with the batch's mean
and biased variance and updates the running statistics once per call,
running = momentum·running + (1 − momentum)·batch; `model.eval()` sets
`use_running_average=True` and normalizes with the running statistics. Unlike
nnx.BatchNorm the default momentum is 0.9 (that of `jax_resnet.blocks`), and
mean and var are stored in `param_dtype` rather than always float32.

Residual blocks and networks are built from the specs of `jax_resnet.blocks`
and `jax_resnet.models`: `Block(spec)` for any `BlockSpec`, `BasicBlock` and
`Bottleneck` for the v1 blocks, and `ResNet(spec)` for a `ResNetSpec`, a
`Model` or a preset name. Given the same weights their forward passes equal
the pure `apply` functions op for op; `from_pure` and `to_pure` move weights
between the pure (params, state) pytrees and the modules:

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jax_resnet import models, nnx as jrnnx
    >>> model = models.tiny()
    >>> params, state = model.init(jax.random.key(0))
    >>> net = jrnnx.from_pure(model, params, state)
    >>> net(jnp.zeros((2, 8, 8, 1))).shape
    (2, 10)
    >>> params, state = jrnnx.to_pure(net)

The custom VJPs have no forward mode, so `jax.jvp`/`jax.hessian` of a module
with `grad="rules"` raise; use `grad="autodiff"` for those.
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

Initializer = Callable[..., jax.Array]

# flax.nnx.Linear's and nnx.Conv's defaults.
default_kernel_init = initializers.lecun_normal()
default_bias_init = initializers.zeros_init()
# The distributions of the pure models' initializers (blocks.he_normal and
# models._init_dense with gain 1): untruncated normals, variance gain / fan_in.
he_normal = initializers.variance_scaling(2.0, "fan_in", "normal")
lecun_normal_untruncated = initializers.variance_scaling(1.0, "fan_in", "normal")


# ------------------------------------------------------------------ validation
def _positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{owner}: argument `{name}` must be a positive int, got {value!r}")
    return int(value)


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
    ):
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
        bias = self.bias[...] if self.use_bias else jnp.zeros((self.out_features,), kernel.dtype)
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
    ):
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
        if self.use_bias:
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
    ):
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
    ):
        owner = type(self).__name__
        self.num_features = _positive_int(owner, "num_features", num_features)
        if use_running_average is not None and not isinstance(use_running_average, bool):
            raise TypeError(
                f"{owner}: argument `use_running_average` must be True, False or None, got {use_running_average!r}"
            )
        self.use_running_average = use_running_average
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 <= momentum <= 1:
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
        # Statistics are state, not a path for gradients (as in blocks.batch_norm).
        batch_mean, batch_var = jax.lax.stop_gradient(batch_mean), jax.lax.stop_gradient(batch_var)
        m = self.momentum
        running_mean, running_var = self.mean[...], self.var[...]
        self.mean[...] = (m * running_mean + (1 - m) * batch_mean).astype(running_mean.dtype)
        self.var[...] = (m * running_var + (1 - m) * batch_var).astype(running_var.dtype)
        return y

    def set_view(self, use_running_average: bool | None = None):
        """Used by `nnx.view(model, use_running_average=...)`, as nnx.BatchNorm's."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def _pure_variables(self):
        return {"gamma": self.scale, "beta": self.bias}, {"mean": self.mean, "var": self.var}


# ---------------------------------------------------------------------- blocks
def _block_input(module, x):
    """Cast x to the dtype the block computes in, so the shortcut and the body agree."""
    _check_features(type(module).__name__, x, module.spec.in_channels, nhwc=True)
    dtype = jnp.result_type(x, module.param_dtype) if module.dtype is None else module.dtype
    return jnp.asarray(x, dtype)


class Block(nnx.Module):
    """Any residual block of `jax_resnet.blocks` as a module; equal to `blocks.apply_block`.

    Submodules carry the pure parameters' names: conv{i} (`Conv`, He-normal),
    bn{i} (`BatchNorm`), and for option-B shortcuts proj (`Projection`) and,
    in v1 blocks, proj_bn. With `zero_init_residual` the last BN of a v1 body
    starts with scale 0.

    Args:
      spec: a `jax_resnet.blocks.BlockSpec` (kind basic, bottleneck,
        preact_basic or preact_bottleneck; shortcut "A" or "B").
      rngs, grad, dtype, param_dtype: as for `Linear`.
    """

    def __init__(
        self, spec: blocks.BlockSpec, *, rngs: nnx.Rngs, grad: str = "rules", dtype=None, param_dtype=jnp.float32
    ):
        owner = type(self).__name__
        if not isinstance(spec, blocks.BlockSpec):
            raise TypeError(
                f"{owner}: argument `spec` must be a jax_resnet.blocks.BlockSpec, got {type(spec).__name__}"
            )
        for field in ("in_channels", "width", "stride"):
            _positive_int(owner, f"spec.{field}", getattr(spec, field))
        self.spec = spec
        self.grad = _grad_mode(owner, grad)
        self.dtype = _float_dtype(owner, "dtype", dtype, optional=True)
        self.param_dtype = _float_dtype(owner, "param_dtype", param_dtype)
        common = dict(rngs=rngs, grad=grad, dtype=dtype, param_dtype=param_dtype)
        convs = spec.convs()
        for i, (k, c_in, c_out, stride) in enumerate(convs):
            setattr(
                self, f"conv{i}", Conv(c_in, c_out, k, strides=stride, padding="SAME", kernel_init=he_normal, **common)
            )
            # v1 normalizes each conv's output, v2 each conv's input.
            last = i == len(convs) - 1 and not spec.preact
            scale_init = initializers.zeros_init() if (last and spec.zero_init_residual) else initializers.ones_init()
            setattr(self, f"bn{i}", BatchNorm(c_in if spec.preact else c_out, scale_init=scale_init, **common))
        if spec.projects:
            self.proj = Projection(
                spec.in_channels, spec.out_channels, strides=spec.stride, kernel_init=he_normal, **common
            )
            if not spec.preact:
                self.proj_bn = BatchNorm(spec.out_channels, **common)

    def _body(self):
        return [(getattr(self, f"conv{i}"), getattr(self, f"bn{i}")) for i in range(len(self.spec.convs()))]

    def _shortcut(self, ops, x):
        spec = self.spec
        if spec.stride == 1 and spec.in_channels == spec.out_channels:
            return x
        if spec.shortcut == "A":
            return ops.shortcut_pad(x, out_channels=spec.out_channels, stride=spec.stride)
        y = self.proj(x)
        return y if spec.preact else self.proj_bn(y)

    def __call__(self, x: jax.Array) -> jax.Array:
        spec = self.spec
        x = _block_input(self, x)
        ops = opset(self.grad)
        body = self._body()
        h, pre = x, None
        for i, (conv, bn) in enumerate(body):
            if spec.preact:
                h = ops.relu(bn(h))
                if i == 0:
                    pre = h
            h = conv(h)
            if not spec.preact:
                h = bn(h)
                if i < len(body) - 1:
                    h = ops.relu(h)
        if spec.residual:
            # v2 projects the pre-activated input (He et al. 2016, §3); identity and option A use x.
            source = pre if (spec.preact and spec.projects) else x
            h = ops.add(h, self._shortcut(ops, source))
        return h if spec.preact else ops.relu(h)

    def _pure_variables(self):
        params, state = {}, {}
        for i, (conv, bn) in enumerate(self._body()):
            params[f"conv{i}"] = conv._pure_variables()[0]
            params[f"bn{i}"], state[f"bn{i}"] = bn._pure_variables()
        if self.spec.projects:
            params["proj"] = self.proj._pure_variables()[0]
            if not self.spec.preact:
                params["proj_bn"], state["proj_bn"] = self.proj_bn._pure_variables()
        return params, state


def _v1_block(owner, kind, in_features, features, strides, shortcut, residual, zero_init_residual):
    in_features = _positive_int(owner, "in_features", in_features)
    features = _positive_int(owner, "features", features)
    strides = _positive_int(owner, "strides", strides)
    if shortcut not in ("A", "B"):
        raise ValueError(f"{owner}: argument `shortcut` must be 'A' or 'B', got {shortcut!r}")
    return blocks.BlockSpec(kind, in_features, features, strides, shortcut, bool(residual), bool(zero_init_residual))


class BasicBlock(Block):
    """v1 basic block: y = relu(bn1(conv3x3(relu(bn0(conv3x3(x))))) + s(x)), out = features.

    Args:
      in_features: channels of x.
      features: channels of both 3x3 convolutions and of the output.
      strides: stride of the first convolution and of the shortcut.
      shortcut: on a shape change, "A" (subsample, zero channels) or "B" (projection + BN).
      residual: False drops the shortcut (the plain twin).
      zero_init_residual: start bn1's scale at 0.
      rngs, grad, dtype, param_dtype: as for `Linear`.
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        *,
        strides: int = 1,
        shortcut: str = "B",
        residual: bool = True,
        zero_init_residual: bool = False,
        rngs: nnx.Rngs,
        grad: str = "rules",
        dtype=None,
        param_dtype=jnp.float32,
    ):
        spec = _v1_block("BasicBlock", "basic", in_features, features, strides, shortcut, residual, zero_init_residual)
        super().__init__(spec, rngs=rngs, grad=grad, dtype=dtype, param_dtype=param_dtype)


class Bottleneck(Block):
    """v1 bottleneck block: conv1x1 → conv3x3 (strided) → conv1x1 to 4·features, each with BN.

    Args: as for `BasicBlock`; the output has 4·features channels.
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        *,
        strides: int = 1,
        shortcut: str = "B",
        residual: bool = True,
        zero_init_residual: bool = False,
        rngs: nnx.Rngs,
        grad: str = "rules",
        dtype=None,
        param_dtype=jnp.float32,
    ):
        spec = _v1_block(
            "Bottleneck", "bottleneck", in_features, features, strides, shortcut, residual, zero_init_residual
        )
        super().__init__(spec, rngs=rngs, grad=grad, dtype=dtype, param_dtype=param_dtype)


# ---------------------------------------------------------------------- ResNet
def _resnet_spec(owner: str, name: str, spec) -> models.ResNetSpec:
    """A ResNetSpec from a spec, a `models.Model` over one, or a preset name."""
    if isinstance(spec, str):
        spec = models.get(spec)
    if isinstance(spec, models.Model):
        spec = spec.spec
    if not isinstance(spec, models.ResNetSpec):
        raise TypeError(
            f"{owner}: argument `{name}` must be a jax_resnet.models.ResNetSpec, a Model built on one "
            f"(e.g. models.resnet20()) or a ResNet preset name such as 'tiny'; got {type(spec).__name__}"
        )
    return spec


class ResNet(nnx.Module):
    """A convolutional ResNet from a `jax_resnet.models.ResNetSpec`; equal to `Model(spec).apply`.

    Submodules: stem (`Conv`), stem_bn, blocks (an `nnx.List` of `Block`),
    final_bn (pre-activation nets) and head (`Linear`); `to_pure` names them
    as `Model.init` does. Train and eval modes are BatchNorm's: `model.train()`
    and `model.eval()`.

    Args:
      spec: a ResNetSpec, a `models.Model` over one (`models.resnet20(num_classes=100)`),
        or a preset name ("tiny", "resnet20", "resnet18", ...).
      rngs: `nnx.Rngs` with a `params` stream; convolutions are He-normal and
        the head N(0, 1/fan_in), the distributions of `Model.init`.
      grad, dtype, param_dtype: as for `Linear`.

    Example:
      >>> from flax import nnx
      >>> net = ResNet("tiny", rngs=nnx.Rngs(0))
      >>> net(jnp.zeros((2, 8, 8, 1))).shape
      (2, 10)
    """

    def __init__(self, spec, *, rngs: nnx.Rngs, grad: str = "rules", dtype=None, param_dtype=jnp.float32):
        owner = type(self).__name__
        spec = _resnet_spec(owner, "spec", spec)
        self.spec = spec
        self.grad = _grad_mode(owner, grad)
        self.dtype = _float_dtype(owner, "dtype", dtype, optional=True)
        self.param_dtype = _float_dtype(owner, "param_dtype", param_dtype)
        common = dict(rngs=rngs, grad=grad, dtype=dtype, param_dtype=param_dtype)
        cifar = spec.stem == "cifar"
        self.stem = Conv(
            spec.in_channels,
            spec.stem_width,
            3 if cifar else 7,
            strides=1 if cifar else 2,
            padding="SAME" if cifar else 3,
            kernel_init=he_normal,
            **common,
        )
        self.stem_bn = None if (spec.preact and cifar) else BatchNorm(spec.stem_width, **common)
        specs = spec.block_specs()
        self.blocks = nnx.List([Block(s, **common) for s in specs])
        channels = specs[-1].out_channels
        self.final_bn = BatchNorm(channels, **common) if spec.preact else None
        self.head = Linear(channels, spec.num_classes, kernel_init=lecun_normal_untruncated, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        spec = self.spec
        _check_features(type(self).__name__, x, spec.in_channels, nhwc=True)
        ops = opset(self.grad)
        h = self.stem(x)
        if self.stem_bn is not None:
            h = ops.relu(self.stem_bn(h))
        if spec.stem == "imagenet":
            h = ops.max_pool(h, window=3, stride=2, padding=1)
        for block in self.blocks:
            h = block(h)
        if self.final_bn is not None:
            h = ops.relu(self.final_bn(h))
        return self.head(ops.global_avg_pool(h))

    def _pure_variables(self):
        params = {"stem": self.stem._pure_variables()[0]}
        state = {}
        if self.stem_bn is not None:
            params["stem_bn"], state["stem_bn"] = self.stem_bn._pure_variables()
        layouts = [block._pure_variables() for block in self.blocks]
        params["blocks"] = [p for p, _ in layouts]
        state["blocks"] = [s for _, s in layouts]
        if self.final_bn is not None:
            params["final_bn"], state["final_bn"] = self.final_bn._pure_variables()
        params["head"] = self.head._pure_variables()[0]
        return params, state


# ------------------------------------------------------------------ conversion
def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _layout(owner: str, module):
    if not hasattr(module, "_pure_variables"):
        raise TypeError(
            f"{owner}: argument `module` must be a jax_resnet.nnx module (Linear, Conv, Projection, "
            f"BatchNorm, Block, BasicBlock, Bottleneck or ResNet), got {type(module).__name__}"
        )
    return module._pure_variables()


def to_pure(module) -> tuple[Any, Any]:
    """The (params, state) pytrees of `jax_resnet.models` / `blocks` holding the module's weights.

    For a `ResNet` they have the structure of `Model(spec).init`'s, for a
    `Block` that of `blocks.init_block`'s; kernel → "w", bias → "b",
    BatchNorm scale/bias → "gamma"/"beta", running mean/var → state.
    The arrays are the module's own (immutable) arrays, not copies.
    """
    params, state = _layout("to_pure", module)
    value = lambda v: v.get_value()  # noqa: E731
    return jax.tree.map(value, params, is_leaf=_is_variable), jax.tree.map(value, state, is_leaf=_is_variable)


def _load(name: str, variables, values) -> None:
    """Set each Variable in `variables` to the array at the same path of `values`."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(variables, is_leaf=_is_variable)
    if jax.tree.structure(values) != treedef:
        want = {jax.tree_util.keystr(path) for path, _ in flat}
        got = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(values)[0]}
        raise ValueError(
            f"from_pure: argument `{name}` does not have the model's layout; "
            f"missing {sorted(want - got) or 'nothing'}, unexpected {sorted(got - want) or 'nothing'} "
            "(does the spec match the one the pytrees were built from?)"
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
    """Build the NNX module for `model` holding the pure pytrees' weights (the inverse of `to_pure`).

    Args:
      model: a `models.ResNetSpec`, a `models.Model` over one or a preset
        name (gives a `ResNet`), or a `blocks.BlockSpec` (gives a `Block`).
      params, state: pytrees as `Model.init` / `blocks.init_block` return
        them; every array must have one floating dtype, which becomes the
        module's param_dtype.
      grad, dtype: as for `Linear`.

    Returns:
      The module in train mode (`use_running_average=False`). Its forward
      equals `Model(spec).apply(params, state, x, train=True)` (`.eval()`:
      train=False) and its BatchStats after a train-mode call equal the new state.
    """
    leaves = jax.tree.leaves(params)
    if not leaves:
        raise ValueError("from_pure: argument `params` holds no arrays")
    param_dtype = jnp.result_type(leaves[0])
    if not jnp.issubdtype(param_dtype, jnp.floating):
        raise TypeError(f"from_pure: argument `params` must hold floating arrays, got dtype {param_dtype}")
    settings = dict(grad=_grad_mode("from_pure", grad), dtype=dtype, param_dtype=param_dtype)
    if isinstance(model, blocks.BlockSpec):
        build = lambda: Block(model, rngs=nnx.Rngs(0), **settings)  # noqa: E731
    else:
        spec = _resnet_spec("from_pure", "model", model)
        build = lambda: ResNet(spec, rngs=nnx.Rngs(0), **settings)  # noqa: E731
    # Only shapes: the initial weights would be overwritten anyway.
    module = nnx.eval_shape(build)
    param_vars, state_vars = module._pure_variables()
    _load("params", param_vars, params)
    _load("state", state_vars, state)
    return module
