"""Models as pure functions: `init(key) -> (params, state)` and
`apply(params, state, x, *, train, grad="rules") -> (out, new_state)`.

One builder per network family, a `Model` over a frozen spec, and presets as
partial applications of the builders (the flax/haiku pattern):

    >>> import jax, jax.numpy as jnp
    >>> from jax_resnet import models
    >>> model = models.resnet20(num_classes=10)
    >>> params, state = model.init(jax.random.key(0))
    >>> logits, state = model.apply(params, state, jnp.zeros((2, 32, 32, 3)), train=True)
    >>> logits.shape
    (2, 10)

`grad="rules"` (default) runs the hand-derived VJPs; `grad="autodiff"` runs
the reference ops and lets JAX differentiate them, so whole-model gradients
can be compared. No global switch: each call chooses.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jax_resnet import blocks
from jax_resnet.ops import OpSet, opset

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid", "gelu", "silu", "softplus", "identity")


def _activation(ops: OpSet, name: str) -> Callable:
    return (lambda x: x) if name == "identity" else getattr(ops, name)


def _init_dense(key, n_in, n_out, dtype, gain=2.0):
    w = jnp.sqrt(gain / n_in) * jax.random.normal(key, (n_in, n_out), dtype)
    return {"w": w, "b": jnp.zeros((n_out,), dtype)}


# ------------------------------------------------------------------------ MLPs
@dataclasses.dataclass(frozen=True)
class MLPSpec:
    """A fully connected network in the seed's notation, with or without skips.

    a = g(W_in·x + b_in); then `depth` hidden layers
    a ← g(W_l·a + b_l + a) (residual) or a ← g(W_l·a + b_l) (plain);
    out = g_out(W_out·a + b_out).
    The residual form puts the skip inside the activation, as the seed's
    corrected a2 = g2(z2 + a0) does (derivations/residual_mlp.md).
    """

    in_features: int
    width: int
    depth: int
    out_features: int
    activation: str = "relu"
    output_activation: str = "identity"
    residual: bool = True

    def __post_init__(self):
        for field in ("activation", "output_activation"):
            if getattr(self, field) not in ACTIVATIONS:
                raise ValueError(f"MLPSpec: `{field}` must be one of {ACTIVATIONS}, got {getattr(self, field)!r}")
        for field in ("in_features", "width", "out_features"):
            if getattr(self, field) < 1:
                raise ValueError(f"MLPSpec: `{field}` must be ≥ 1, got {getattr(self, field)}")
        if self.depth < 0:
            raise ValueError(f"MLPSpec: `depth` must be ≥ 0, got {self.depth}")

    def init(self, key, dtype):
        keys = jax.random.split(key, self.depth + 2)
        params = {
            "in": _init_dense(keys[0], self.in_features, self.width, dtype),
            "hidden": [_init_dense(k, self.width, self.width, dtype) for k in keys[1:-1]],
            "out": _init_dense(keys[-1], self.width, self.out_features, dtype, gain=1.0),
        }
        return params, {}

    def forward(self, ops: OpSet, params, state, x, *, train):
        del train  # no batch statistics in an MLP
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"MLP apply: argument `x` must have {self.in_features} features per example, got shape {x.shape}"
            )
        g, g_out = _activation(ops, self.activation), _activation(ops, self.output_activation)
        a = g(ops.dense(x, params["in"]["w"], params["in"]["b"]))
        for layer in params["hidden"]:
            z = ops.dense(a, layer["w"], layer["b"])
            a = g(ops.add(z, a) if self.residual else z)
        return g_out(ops.dense(a, params["out"]["w"], params["out"]["b"])), state

    def describe(self) -> list[str]:
        kind = "residual" if self.residual else "plain"
        return [f"{kind} MLP: {self.in_features} -> {self.width} x {self.depth} hidden -> {self.out_features}"]


# --------------------------------------------------------------------- ResNets
@dataclasses.dataclass(frozen=True)
class ResNetSpec:
    """A convolutional residual network: stem, stages of blocks, pooled head.

    stem "cifar": 3x3 conv (stride 1); stem "imagenet": 7x7 conv stride 2 and
    3x3 max pool stride 2 (He et al. 2015, Table 1).
    """

    stage_sizes: tuple[int, ...]
    block: str
    widths: tuple[int, ...]
    stem: str
    stem_width: int
    shortcut: str
    num_classes: int
    in_channels: int = 3
    residual: bool = True
    zero_init_residual: bool = False

    def __post_init__(self):
        if len(self.stage_sizes) != len(self.widths):
            raise ValueError(
                f"ResNetSpec: `stage_sizes` {self.stage_sizes} and `widths` {self.widths} must have equal length"
            )
        if self.stem not in ("cifar", "imagenet"):
            raise ValueError(f"ResNetSpec: `stem` must be 'cifar' or 'imagenet', got {self.stem!r}")
        if self.num_classes < 1:
            raise ValueError(f"ResNetSpec: `num_classes` must be ≥ 1, got {self.num_classes}")

    @property
    def preact(self) -> bool:
        return self.block.startswith("preact")

    def block_specs(self) -> list[blocks.BlockSpec]:
        specs, c = [], self.stem_width
        for stage, (n, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for i in range(n):
                spec = blocks.BlockSpec(
                    kind=self.block,
                    in_channels=c,
                    width=width,
                    stride=2 if (i == 0 and stage > 0) else 1,
                    shortcut=self.shortcut,
                    residual=self.residual,
                    zero_init_residual=self.zero_init_residual,
                )
                specs.append(spec)
                c = spec.out_channels
        return specs

    def init(self, key, dtype):
        specs = self.block_specs()
        keys = jax.random.split(key, len(specs) + 2)
        k = 3 if self.stem == "cifar" else 7
        params = {"stem": blocks.init_conv(keys[0], k, self.in_channels, self.stem_width, dtype)}
        state = {}
        if not (self.preact and self.stem == "cifar"):
            params["stem_bn"], state["stem_bn"] = blocks.init_bn(self.stem_width, dtype)
        params["blocks"], state["blocks"] = [], []
        for kb, spec in zip(keys[1:-1], specs):
            p, s = blocks.init_block(kb, spec, dtype)
            params["blocks"].append(p)
            state["blocks"].append(s)
        c = specs[-1].out_channels
        if self.preact:
            params["final_bn"], state["final_bn"] = blocks.init_bn(c, dtype)
        params["head"] = _init_dense(keys[-1], c, self.num_classes, dtype, gain=1.0)
        return params, state

    def forward(self, ops: OpSet, params, state, x, *, train):
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"ResNet apply: argument `x` must be NHWC with {self.in_channels} channels, got shape {tuple(x.shape)}"
            )
        new_state = {}
        if self.stem == "cifar":
            h = ops.conv2d(x, params["stem"]["w"], stride=1, padding="SAME")
        else:
            h = ops.conv2d(x, params["stem"]["w"], stride=2, padding=3)
        if "stem_bn" in params:
            h, new_state["stem_bn"] = blocks.batch_norm(ops, params["stem_bn"], state["stem_bn"], h, train=train)
            h = ops.relu(h)
        if self.stem == "imagenet":
            h = ops.max_pool(h, window=3, stride=2, padding=1)
        new_state["blocks"] = []
        for spec, p, s in zip(self.block_specs(), params["blocks"], state["blocks"]):
            h, s = blocks.apply_block(ops, spec, p, s, h, train=train)
            new_state["blocks"].append(s)
        if self.preact:
            h, new_state["final_bn"] = blocks.batch_norm(ops, params["final_bn"], state["final_bn"], h, train=train)
            h = ops.relu(h)
        h = ops.global_avg_pool(h)
        return ops.dense(h, params["head"]["w"], params["head"]["b"]), new_state

    def describe(self) -> list[str]:
        kind = "ResNet" if self.residual else "plain net"
        lines = [
            f"{kind}: {self.stem} stem ({self.stem_width} channels), {self.block} blocks, shortcut {self.shortcut}"
        ]
        for i, spec in enumerate(self.block_specs()):
            lines.append(
                f"  block {i:3d}: {spec.kind:<17} {spec.in_channels:>5} -> {spec.out_channels:<5} stride {spec.stride}"
            )
        lines.append(f"  head: global average pool, dense -> {self.num_classes}")
        return lines


# ----------------------------------------------------------------------- Model
@functools.lru_cache(maxsize=64)
def _compiled_init(spec, dtype):
    # One compilation for all the random draws: eagerly, every parameter shape
    # would compile a kernel of its own (seconds for a deep net on a CPU).
    return jax.jit(lambda key: spec.init(key, dtype))


@dataclasses.dataclass(frozen=True)
class Model:
    """A spec with pure `init` and `apply`; hashable, so it can be a static arg."""

    spec: Any
    name: str = "model"

    def init(self, key, dtype=jnp.float32):
        """Return (params, state): pytrees of arrays of `dtype`."""
        return _compiled_init(self.spec, jnp.dtype(dtype))(key)

    def apply(self, params, state, x, *, train: bool, grad: str = "rules"):
        """Return (output, new_state); new_state carries updated BatchNorm statistics when train."""
        return self.spec.forward(opset(grad), params, state, x, train=train)


def num_params(params) -> int:
    """Number of trainable scalars in a parameter pytree."""
    return sum(int(p.size) for p in jax.tree.leaves(params))


def summary(model: Model, input_shape: tuple[int, ...]) -> dict:
    """Layers, parameter count and forward FLOPs for one input of `input_shape`.

    FLOPs are XLA's count for the inference forward pass at batch 1 (a
    multiply-add counts as two, so about twice the "multiply-adds" the
    ResNet paper tabulates). Nothing is allocated: shapes only.
    """
    params, state = jax.eval_shape(lambda: model.init(jax.random.key(0)))
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    lowered = jax.jit(lambda p, s, x: model.apply(p, s, x, train=False)[0]).lower(params, state, x)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {
        "model": model.name,
        "input_shape": list(input_shape),
        "params": num_params(params),
        "flops": int(cost["flops"]),
        "layers": model.spec.describe(),
    }


# --------------------------------------------------------------------- presets
def residual_mlp(
    in_features=64, width=64, depth=2, out_features=10, activation="relu", output_activation="identity"
) -> Model:
    """The seed's residual network, generalised to `depth` skip-connected hidden layers.

    Command: jax-resnet train --model residual_mlp
    """
    spec = MLPSpec(in_features, width, depth, out_features, activation, output_activation, residual=True)
    return Model(spec, "residual_mlp")


def plain_mlp(
    in_features=64, width=64, depth=2, out_features=10, activation="relu", output_activation="identity"
) -> Model:
    """`residual_mlp` without the skip connections (the seed's "BP network").

    Command: jax-resnet train --model plain_mlp
    """
    spec = MLPSpec(in_features, width, depth, out_features, activation, output_activation, residual=False)
    return Model(spec, "plain_mlp")


def cifar_resnet(
    depth: int,
    *,
    num_classes=10,
    in_channels=3,
    widths=(16, 32, 64),
    residual=True,
    block="basic",
    zero_init_residual=False,
) -> Model:
    """CIFAR ResNet with 6n+2 layers and option-A shortcuts (He et al. 2015, §4.2).

    Command: jax-resnet train --model resnet20 --dataset cifar10
    """
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(
            f"cifar_resnet: `depth` must be 6n+2 with n ≥ 1 (8, 14, 20, 32, 44, 56, 110, 1202), got {depth}"
        )
    n = (depth - 2) // 6
    spec = ResNetSpec(
        stage_sizes=(n,) * len(widths),
        block=block,
        widths=tuple(widths),
        stem="cifar",
        stem_width=widths[0],
        shortcut="A",
        num_classes=num_classes,
        in_channels=in_channels,
        residual=residual,
        zero_init_residual=zero_init_residual,
    )
    return Model(spec, f"{'resnet' if residual else 'plain'}{depth}")


def imagenet_resnet(
    stage_sizes, block, *, num_classes=1000, in_channels=3, width=64, zero_init_residual=False, name="resnet"
) -> Model:
    """ImageNet ResNet: 7x7 stem, max pool, four stages, option-B projections.

    Command (CPU-sized input; any data set, the head takes its classes):
    jax-resnet train --model resnet18 --dataset cifar10 --data-dir DIR --optimizer momentum --lr 0.1
    """
    spec = ResNetSpec(
        stage_sizes=tuple(stage_sizes),
        block=block,
        widths=tuple(width * 2**i for i in range(4)),
        stem="imagenet",
        stem_width=width,
        shortcut="B",
        num_classes=num_classes,
        in_channels=in_channels,
        zero_init_residual=zero_init_residual,
    )
    return Model(spec, name)


resnet8 = functools.partial(cifar_resnet, 8)
resnet14 = functools.partial(cifar_resnet, 14)
resnet20 = functools.partial(cifar_resnet, 20)
resnet32 = functools.partial(cifar_resnet, 32)
resnet44 = functools.partial(cifar_resnet, 44)
resnet56 = functools.partial(cifar_resnet, 56)
resnet110 = functools.partial(cifar_resnet, 110)
resnet1202 = functools.partial(cifar_resnet, 1202)
plain8 = functools.partial(cifar_resnet, 8, residual=False)
plain14 = functools.partial(cifar_resnet, 14, residual=False)
plain20 = functools.partial(cifar_resnet, 20, residual=False)
plain32 = functools.partial(cifar_resnet, 32, residual=False)
plain44 = functools.partial(cifar_resnet, 44, residual=False)
plain56 = functools.partial(cifar_resnet, 56, residual=False)
plain110 = functools.partial(cifar_resnet, 110, residual=False)
preact_resnet20 = functools.partial(cifar_resnet, 20, block="preact_basic")
resnet18 = functools.partial(imagenet_resnet, (2, 2, 2, 2), "basic", name="resnet18")
resnet34 = functools.partial(imagenet_resnet, (3, 4, 6, 3), "basic", name="resnet34")
resnet50 = functools.partial(imagenet_resnet, (3, 4, 6, 3), "bottleneck", name="resnet50")
resnet101 = functools.partial(imagenet_resnet, (3, 4, 23, 3), "bottleneck", name="resnet101")
resnet152 = functools.partial(imagenet_resnet, (3, 8, 36, 3), "bottleneck", name="resnet152")
preact_resnet18 = functools.partial(imagenet_resnet, (2, 2, 2, 2), "preact_basic", name="preact_resnet18")


def tiny(num_classes=10, in_channels=1) -> Model:
    """A 8-layer CIFAR-style ResNet with narrow stages (8, 16, 32): the test model.

    Command: jax-resnet train --model tiny
    """
    model = cifar_resnet(8, num_classes=num_classes, in_channels=in_channels, widths=(8, 16, 32))
    return Model(model.spec, "tiny")


_PRESET_NAMES = (
    "tiny residual_mlp plain_mlp resnet8 resnet14 resnet20 resnet32 resnet44 resnet56 resnet110 resnet1202 "
    "plain8 plain14 plain20 plain32 plain44 plain56 plain110 preact_resnet20 "
    "resnet18 resnet34 resnet50 resnet101 resnet152 preact_resnet18"
).split()
PRESETS: dict[str, Callable[..., Model]] = {name: globals()[name] for name in _PRESET_NAMES}


def get(name: str, **kwargs) -> Model:
    """Build a preset by name; unknown names list the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name](**kwargs)
