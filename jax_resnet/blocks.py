"""Residual blocks composed from the ops, as pure (init, apply) function pairs.

A block's apply takes an `OpSet` (`jax_resnet.ops.opset("rules")` or
`opset("autodiff")`), so the same code runs with the hand-derived rules or with
the reference ops that JAX differentiates. Parameters and BatchNorm running
statistics are separate pytrees; `apply(..., train=True)` returns the updated
statistics, computed from the batch exactly once.

Kinds (He et al. 2015, "Deep Residual Learning"; He et al. 2016, "Identity
Mappings in Deep Residual Networks"):

- basic (v1):       y = relu(bn2(conv3x3(relu(bn1(conv3x3(x))))) + s(x))
- bottleneck (v1):  y = relu(bn3(conv1x1(relu(bn2(conv3x3(relu(bn1(conv1x1(x)))))))) + s(x))
- preact_basic (v2): h = relu(bn1(x)); y = conv3x3(relu(bn2(conv3x3(h)))) + s(x or h)
- preact_bottleneck (v2): the same with the 1x1-3x3-1x1 body.

A bottleneck's 3x3 convolution is grouped when `groups` > 1: ResNeXt's block
(Xie et al. 2017, "Aggregated Residual Transformations", Fig. 3(c)). A Wide
ResNet's block (Zagoruyko & Komodakis 2016) is preact_basic at a larger width.
Each kind is one row of `KINDS`: its convolutions and its apply function.

Shortcut s: identity when shapes agree, otherwise option "A" (strided
subsampling, zero-padded channels, no parameters) or option "B" (1x1
projection and BatchNorm).

Normalisation `norm`: "batch" (BatchNorm, statistics over the batch, the
papers' choice) or "group" (GroupNorm, Wu & He 2018: statistics per example
over groups of channels, so examples do not interact and per-example
gradients exist; `jax_resnet.per_example`). Either way a norm layer holds
`gamma` and `beta` under the same keys (`bn0`, `proj_bn`, ...), so the two
layouts differ only in GroupNorm having no running statistics (its state is
`{}`). `residual=False` drops the shortcut: the plain
twin used in the BP-vs-ResNet study. Derivation: derivations/blocks.md.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from jax_resnet.ops import OpSet

__all__ = [
    "BN_MOMENTUM",
    "BN_EPS",
    "NORMS",
    "GN_EPS",
    "BlockKind",
    "Conv",
    "KINDS",
    "BlockSpec",
    "he_normal",
    "init_conv",
    "init_dense",
    "init_bn",
    "check_norm",
    "init_norm",
    "normalize",
    "running_statistics",
    "batch_norm",
    "init_block",
    "apply_block",
]


BN_MOMENTUM = 0.9  # running = momentum · running + (1 − momentum) · batch
BN_EPS = 1e-5
NORMS = ("batch", "group")
GN_EPS = 1e-5


class BlockKind(NamedTuple):
    """One row of the block table: what a kind needs, so that a new kind is one row here.

    Attributes:
      expansion: output channels per unit of `width`.
      convs: `spec -> [Conv, ...]`, the body's convolutions in order
        (parameters `conv0`, `conv1`, ...).
      apply: `(ops, spec, params, state, x, *, train) -> (y, new_state)`, how
        the layers are arranged: `_apply_v1` or `_apply_v2`, or a new function
        for a new arrangement.
      preact: v2 (BN-ReLU before each convolution, nothing after the add; a
        network normalises once at its stem and once before its head) instead
        of v1 (BN after each convolution, ReLU after the add): where
        `init_block` puts the norms and which weight starts at zero for
        `zero_init_residual`.
    """

    expansion: int
    convs: Callable[[BlockSpec], list[Conv]]
    apply: Callable[..., tuple[Any, dict]]
    preact: bool


class Conv(NamedTuple):
    """One convolution of a block's body: a `kernel`×`kernel` kernel, `groups` channel groups."""

    kernel: int
    in_channels: int
    out_channels: int
    stride: int
    groups: int = 1


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Static description of one residual block.

    `groups` and `base_width` are torchvision's names for ResNeXt's cardinality
    C and bottleneck width d (Xie et al. 2017): a bottleneck body's 3x3
    convolution is grouped, with width · base_width / 64 · groups channels
    (`width` itself when groups = 1 and base_width = 64, a plain ResNet).
    """

    kind: str
    in_channels: int
    width: int  # the body's channels (a bottleneck's before grouping); output is width · expansion
    stride: int = 1
    shortcut: str = "B"  # "A" or "B", used only when the shape changes
    residual: bool = True
    zero_init_residual: bool = False
    norm: str = "batch"  # "batch" or "group"
    norm_groups: int = 32  # GroupNorm's groups, at most: gcd(norm_groups, channels) per layer
    groups: int = 1  # channel groups of the grouped convolution (ResNeXt's cardinality)
    base_width: int = 64  # channels per group per 64 of `width` (ResNeXt's d)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"BlockSpec: `kind` must be one of {tuple(KINDS)}, got {self.kind!r}")
        if self.shortcut not in ("A", "B"):
            raise ValueError(f"BlockSpec: `shortcut` must be 'A' or 'B', got {self.shortcut!r}")
        check_norm("BlockSpec", self.norm, self.norm_groups)
        for field in ("in_channels", "width", "stride", "groups", "base_width"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockSpec: `{field}` must be a positive int, got {value!r}")
        if (self.groups, self.base_width) != (1, 64) and self.convs() == dataclasses.replace(
            self, groups=1, base_width=64
        ).convs():
            raise ValueError(
                f"BlockSpec: kind {self.kind!r} has no grouped convolution, so `groups` and `base_width` would "
                f"change nothing (use a bottleneck kind); got groups={self.groups}, base_width={self.base_width}"
            )
        for conv in self.convs():
            if min(conv.in_channels, conv.out_channels) < conv.groups:
                raise ValueError(
                    f"BlockSpec: every convolution needs ≥ 1 channel per group; `width`={self.width}, "
                    f"`groups`={self.groups} and `base_width`={self.base_width} give "
                    f"{conv.in_channels} -> {conv.out_channels} in {conv.groups} group(s)"
                )

    @property
    def row(self) -> BlockKind:
        return KINDS[self.kind]

    @property
    def out_channels(self) -> int:
        return self.width * self.row.expansion

    @property
    def preact(self) -> bool:
        return self.row.preact

    @property
    def projects(self) -> bool:
        """True when the shortcut needs parameters (option B on a shape change)."""
        return self.residual and self.changes_shape and self.shortcut == "B"

    @property
    def changes_shape(self) -> bool:
        return self.stride != 1 or self.in_channels != self.out_channels

    def convs(self) -> list[Conv]:
        """The body's convolutions, in order (its row's rule)."""
        return self.row.convs(self)


# ------------------------------------------------------------------- bodies
def _basic_convs(spec: BlockSpec) -> list[Conv]:
    """Two 3x3 convolutions, the stride on the first (He et al. 2015, Fig. 2)."""
    return [Conv(3, spec.in_channels, spec.width, spec.stride), Conv(3, spec.width, spec.out_channels, 1)]


def _bottleneck_convs(spec: BlockSpec) -> list[Conv]:
    """1x1 reduce, 3x3 (grouped when `groups` > 1: ResNeXt's aggregated transformations, Xie et al. 2017,
    Fig. 3(c)), 1x1 expand; the stride on the 3x3 (ResNet v1.5, as in torchvision: the same parameter count)."""
    inner = spec.width * spec.base_width // 64 * spec.groups
    return [
        Conv(1, spec.in_channels, inner, 1),
        Conv(3, inner, inner, spec.stride, spec.groups),
        Conv(1, inner, spec.out_channels, 1),
    ]


# ------------------------------------------------------------------ parameters
def he_normal(key, shape, fan_in, dtype, gain=2.0):
    """N(0, gain/fan_in): gain 2 for a layer followed by ReLU (He et al. 2015, "Delving Deep into
    Rectifiers"), 1 for a network's linear head."""
    return math.sqrt(gain / fan_in) * jax.random.normal(key, shape, dtype)


def init_conv(key, k, c_in, c_out, dtype, scale=1.0, groups=1):
    """{"w": HWIO kernel [k, k, c_in / groups, c_out]}, He-normal over its fan-in k·k·c_in/groups, times `scale`."""
    fan_in = k * k * c_in // groups
    return {"w": scale * he_normal(key, (k, k, c_in // groups, c_out), fan_in, dtype)}


def init_dense(key, n_in, n_out, dtype, gain=2.0):
    """{"w": [n_in, n_out] He-normal with `gain`, "b": zeros}."""
    return {"w": he_normal(key, (n_in, n_out), n_in, dtype, gain), "b": jnp.zeros((n_out,), dtype)}


def init_bn(c, dtype, scale=1.0):
    params = {"gamma": jnp.full((c,), scale, dtype), "beta": jnp.zeros((c,), dtype)}
    state = {"mean": jnp.zeros((c,), dtype), "var": jnp.ones((c,), dtype)}
    return params, state


def check_norm(owner: str, norm: str, norm_groups: int) -> None:
    """Raise ValueError naming `owner` unless `norm` is in NORMS and `norm_groups` a positive int."""
    if norm not in NORMS:
        raise ValueError(f"{owner}: `norm` must be one of {NORMS}, got {norm!r}")
    if isinstance(norm_groups, bool) or not isinstance(norm_groups, int) or norm_groups < 1:
        raise ValueError(f"{owner}: `norm_groups` must be a positive int, got {norm_groups!r}")


def init_norm(c, dtype, norm="batch", scale=1.0):
    """(params, state) of one norm layer over c channels; GroupNorm keeps no state."""
    params, state = init_bn(c, dtype, scale)
    return params, (state if norm == "batch" else {})


def normalize(ops: OpSet, norm: str, norm_groups: int, params, state, x, *, train):
    """The norm layer `norm` ("batch" or "group") on x [N, ..., C]; returns (y, new_state).

    GroupNorm uses gcd(norm_groups, C) groups, so one setting fits every width
    of a network (32 and C = 16 give 16 groups of one channel).
    """
    if norm == "batch":
        return batch_norm(ops, params, state, x, train=train)
    groups = math.gcd(norm_groups, x.shape[-1])
    return ops.group_norm(x, params["gamma"], params["beta"], groups=groups, eps=GN_EPS), state


def running_statistics(state, mean, var, momentum=BN_MOMENTUM):
    """BatchNorm's running averages after one training batch, in the dtypes of `state`:
    running ← momentum · running + (1 − momentum) · batch, for "mean" and "var".

    The batch statistics enter as state, not as a path for gradients (`stop_gradient`).
    Derivation: derivations/blocks.md#batchnorm-running-statistics-are-state
    """
    batch = {"mean": jax.lax.stop_gradient(mean), "var": jax.lax.stop_gradient(var)}
    return {k: (momentum * state[k] + (1 - momentum) * batch[k]).astype(state[k].dtype) for k in ("mean", "var")}


def batch_norm(ops: OpSet, params, state, x, *, train):
    """BatchNorm over all axes but channels; returns (y, new_state)."""
    if train:
        y, mean, var = ops.batch_norm_train(x, params["gamma"], params["beta"], eps=BN_EPS)
        return y, running_statistics(state, mean, var)
    y = ops.batch_norm_eval(x, params["gamma"], params["beta"], state["mean"], state["var"], eps=BN_EPS)
    return y, state


def init_block(key, spec: BlockSpec, dtype=jnp.float32):
    """Parameters and BatchNorm state of one block.

    `zero_init_residual` makes the residual branch output zero at
    initialisation, so the block starts as its shortcut (Goyal et al. 2017):
    v1 sets the scale of the body's last BatchNorm to 0; v2, whose body ends
    in a convolution, sets that convolution's kernel to 0.
    """
    convs = spec.convs()
    keys = jax.random.split(key, len(convs) + 1)
    params, state = {}, {}
    for i, conv in enumerate(convs):
        last = i == len(convs) - 1 and spec.zero_init_residual
        kernel_scale = 0.0 if last and spec.preact else 1.0
        params[f"conv{i}"] = init_conv(
            keys[i], conv.kernel, conv.in_channels, conv.out_channels, dtype, kernel_scale, conv.groups
        )
        # v1 normalises each conv's output; v2 normalises each conv's input.
        bn_channels = conv.in_channels if spec.preact else conv.out_channels
        scale = 0.0 if last and not spec.preact else 1.0
        params[f"bn{i}"], state[f"bn{i}"] = init_norm(bn_channels, dtype, spec.norm, scale)
    if spec.projects:
        params["proj"] = {"w": he_normal(keys[-1], (spec.in_channels, spec.out_channels), spec.in_channels, dtype)}
        if not spec.preact:
            params["proj_bn"], state["proj_bn"] = init_norm(spec.out_channels, dtype, spec.norm)
    return params, state


# ----------------------------------------------------------------------- apply
def _norm(ops: OpSet, spec: BlockSpec, params, state, x, *, train):
    return normalize(ops, spec.norm, spec.norm_groups, params, state, x, train=train)


def _conv(ops: OpSet, conv: Conv, params, x):
    return ops.conv2d(x, params["w"], stride=conv.stride, padding="SAME", groups=conv.groups)


def _shortcut(ops: OpSet, spec: BlockSpec, params, state, x, *, train):
    if not spec.changes_shape:
        return x, {}
    if spec.shortcut == "A":
        return ops.shortcut_pad(x, out_channels=spec.out_channels, stride=spec.stride), {}
    y = ops.projection(x, params["proj"]["w"], stride=spec.stride)
    if spec.preact:
        return y, {}
    y, bn_state = _norm(ops, spec, params["proj_bn"], state["proj_bn"], y, train=train)
    return y, {"proj_bn": bn_state}


def _apply_v1(ops: OpSet, spec: BlockSpec, params, state, x, *, train):
    """y = relu(body(x) + s(x)), body = (conv, BN, ReLU)… with no ReLU after the last BN."""
    new_state = {}
    h = x
    n = len(spec.convs())
    for i, conv in enumerate(spec.convs()):
        h = _conv(ops, conv, params[f"conv{i}"], h)
        h, new_state[f"bn{i}"] = _norm(ops, spec, params[f"bn{i}"], state[f"bn{i}"], h, train=train)
        if i < n - 1:
            h = ops.relu(h)
    if spec.residual:
        s, shortcut_state = _shortcut(ops, spec, params, state, x, train=train)
        new_state.update(shortcut_state)
        h = ops.add(h, s)
    return ops.relu(h), new_state


def _apply_v2(ops: OpSet, spec: BlockSpec, params, state, x, *, train):
    """y = body(x) + s(x), body = (BN, ReLU, conv)…; nothing after the add."""
    new_state = {}
    h = x
    pre = None
    for i, conv in enumerate(spec.convs()):
        h, new_state[f"bn{i}"] = _norm(ops, spec, params[f"bn{i}"], state[f"bn{i}"], h, train=train)
        h = ops.relu(h)
        if i == 0:
            pre = h
        h = _conv(ops, conv, params[f"conv{i}"], h)
    if spec.residual:
        # Option B projects the pre-activated input (He et al. 2016, §3); identity and option A use x itself.
        s, shortcut_state = _shortcut(ops, spec, params, state, pre if spec.projects else x, train=train)
        new_state.update(shortcut_state)
        h = ops.add(h, s)
    return h, new_state


def apply_block(ops: OpSet, spec: BlockSpec, params, state, x, *, train):
    """Run one block; returns (y, new_state)."""
    chex.assert_rank(x, 4)  # NHWC
    chex.assert_axis_dimension(x, 3, spec.in_channels)
    return spec.row.apply(ops, spec, params, state, x, train=train)


# The block table. A new kind is one row here: its convolutions (a rule above, or a new one) and its
# apply (`_apply_v1` or `_apply_v2`, or one new function for a new arrangement of the layers), plus
# its section in derivations/blocks.md.
KINDS: dict[str, BlockKind] = {
    "basic": BlockKind(expansion=1, convs=_basic_convs, apply=_apply_v1, preact=False),
    "bottleneck": BlockKind(expansion=4, convs=_bottleneck_convs, apply=_apply_v1, preact=False),
    "preact_basic": BlockKind(expansion=1, convs=_basic_convs, apply=_apply_v2, preact=True),
    "preact_bottleneck": BlockKind(expansion=4, convs=_bottleneck_convs, apply=_apply_v2, preact=True),
}
