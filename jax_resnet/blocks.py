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
from typing import NamedTuple

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
    "KINDS",
    "BlockSpec",
    "he_normal",
    "init_conv",
    "init_bn",
    "check_norm",
    "init_norm",
    "normalize",
    "batch_norm",
    "init_block",
    "apply_block",
]


BN_MOMENTUM = 0.9  # running = momentum · running + (1 − momentum) · batch
BN_EPS = 1e-5
NORMS = ("batch", "group")
GN_EPS = 1e-5


class BlockKind(NamedTuple):
    """One row of the block table: the body's shape and where normalisation sits.

    bottleneck: the body is 1x1-3x3-1x1 (output width · 4) instead of 3x3-3x3.
    preact: v2 (BN-ReLU before each convolution, nothing after the add) instead
    of v1 (BN after each convolution, ReLU after the add).
    """

    expansion: int
    bottleneck: bool
    preact: bool


# Adding a block kind is one row here; a new arrangement of the layers is one
# more apply function beside `_apply_v1` and `_apply_v2`.
KINDS = {
    "basic": BlockKind(expansion=1, bottleneck=False, preact=False),
    "bottleneck": BlockKind(expansion=4, bottleneck=True, preact=False),
    "preact_basic": BlockKind(expansion=1, bottleneck=False, preact=True),
    "preact_bottleneck": BlockKind(expansion=4, bottleneck=True, preact=True),
}


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Static description of one residual block."""

    kind: str
    in_channels: int
    width: int  # channels of the 3x3 convolutions; output is width · expansion
    stride: int = 1
    shortcut: str = "B"  # "A" or "B", used only when the shape changes
    residual: bool = True
    zero_init_residual: bool = False
    norm: str = "batch"  # "batch" or "group"
    norm_groups: int = 32  # GroupNorm's groups, at most: gcd(norm_groups, channels) per layer

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"BlockSpec: `kind` must be one of {tuple(KINDS)}, got {self.kind!r}")
        if self.shortcut not in ("A", "B"):
            raise ValueError(f"BlockSpec: `shortcut` must be 'A' or 'B', got {self.shortcut!r}")
        check_norm("BlockSpec", self.norm, self.norm_groups)

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

    def convs(self) -> list[tuple[int, int, int, int]]:
        """(kernel, in, out, stride) of the body's convolutions, in order."""
        c, w, o, s = self.in_channels, self.width, self.out_channels, self.stride
        if not self.row.bottleneck:
            return [(3, c, w, s), (3, w, o, 1)]
        # Stride on the 3x3 convolution (ResNet v1.5, as in torchvision); same parameter count.
        return [(1, c, w, 1), (3, w, w, s), (1, w, o, 1)]


# ------------------------------------------------------------------ parameters
def he_normal(key, shape, fan_in, dtype):
    """N(0, 2/fan_in) (He et al. 2015, "Delving Deep into Rectifiers")."""
    return math.sqrt(2.0 / fan_in) * jax.random.normal(key, shape, dtype)


def init_conv(key, k, c_in, c_out, dtype, scale=1.0):
    return {"w": scale * he_normal(key, (k, k, c_in, c_out), k * k * c_in, dtype)}


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


def batch_norm(ops: OpSet, params, state, x, *, train):
    """BatchNorm over all axes but channels; returns (y, new_state)."""
    if train:
        y, mean, var = ops.batch_norm_train(x, params["gamma"], params["beta"], eps=BN_EPS)
        mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
        new_state = {
            "mean": BN_MOMENTUM * state["mean"] + (1 - BN_MOMENTUM) * mean,
            "var": BN_MOMENTUM * state["var"] + (1 - BN_MOMENTUM) * var,
        }
        return y, new_state
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
    for i, (k, c_in, c_out, _) in enumerate(convs):
        last = i == len(convs) - 1 and spec.zero_init_residual
        params[f"conv{i}"] = init_conv(keys[i], k, c_in, c_out, dtype, 0.0 if last and spec.preact else 1.0)
        # v1 normalises each conv's output; v2 normalises each conv's input.
        bn_channels = c_in if spec.preact else c_out
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
    for i, (_, _, _, stride) in enumerate(spec.convs()):
        h = ops.conv2d(h, params[f"conv{i}"]["w"], stride=stride, padding="SAME")
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
    for i, (_, _, _, stride) in enumerate(spec.convs()):
        h, new_state[f"bn{i}"] = _norm(ops, spec, params[f"bn{i}"], state[f"bn{i}"], h, train=train)
        h = ops.relu(h)
        if i == 0:
            pre = h
        h = ops.conv2d(h, params[f"conv{i}"]["w"], stride=stride, padding="SAME")
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
    apply = _apply_v2 if spec.preact else _apply_v1
    return apply(ops, spec, params, state, x, train=train)
