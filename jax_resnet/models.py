"""Models as pure functions: `init(key) -> (params, state)` and
`apply(params, state, x, *, train, grad="rules") -> (out, new_state)`.

One builder per network family, a `Model` over a frozen spec, and presets as
partial applications of the builders (the flax/haiku pattern):

    >>> import jax, jax.numpy as jnp
    >>> from jax_resnet import models
    >>> model = models.tiny(num_classes=10)  # resnet20(), resnet50(), ... the same way
    >>> params, state = model.init(jax.random.key(0))
    >>> x = jnp.zeros((2, *model.spec.input_shape()), jnp.float32)
    >>> logits, state = model.apply(params, state, x, train=True)
    >>> logits.shape
    (2, 10)

`grad="rules"` (default) runs the hand-derived VJPs; `grad="autodiff"` runs
the reference ops and lets JAX differentiate them, so whole-model gradients
can be compared. No global switch: each call chooses.

Every spec (a network family) answers the same questions itself, so the
trainer, the studies and the CLI never dispatch on its type: the `Spec`
protocol below declares them, and every family implements it
(`tests/test_api.py` checks each one).

Weight decay applies to the leaves `weight_paths` names (`kernel_mask`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from jax_resnet import blocks, reversible
from jax_resnet._compile import compile_once
from jax_resnet.ops import OpSet, activations, opset

# ImageNet stem: (convolution padding, max-pool padding).
STEM_PADDINGS = {"torchvision": (3, 1), "same": ("SAME", "SAME")}
# The activation rules (ops/activations.py lists them), and no activation at all.
ACTIVATIONS = (*activations.OPS, "identity")


def _activation(ops: OpSet, name: str) -> Callable:
    return (lambda x: x) if name == "identity" else getattr(ops, name)


Hook = Callable[[int, Any], Any]


def _no_hook(i, h):
    return h


@runtime_checkable
class Spec(Protocol):
    """What a network family answers: the contract `Model` (and every study) relies on.

    A spec is a frozen dataclass (hashable: it is part of compiled functions' cache keys).
    """

    def init(self, key: jax.Array, dtype: Any) -> tuple[Any, Any]:
        """(params, state): pytrees of arrays of `dtype`."""
        ...

    def forward(self, ops: OpSet, params: Any, state: Any, x: jax.Array, *, train: bool, hook: Hook = _no_hook):
        """(out, new_state): the one place the family's layers are sequenced.

        `hook(i, h) -> h` sees the activation entering block i (the head's
        input is the last point): how studies reach inside the network without
        copying it.
        """
        ...

    def hook_points(self) -> list[str]:
        """Names of the points `hook` sees, in order."""
        ...

    def weight_paths(self) -> list[tuple[str, tuple]]:
        """(name, path into params) of each conv/dense kernel, input side first."""
        ...

    def describe(self) -> list[str]:
        """Lines for `jax-resnet info`."""
        ...

    def input_shape(self) -> tuple[int, ...]:
        """One example's usual shape."""
        ...

    def for_data(self, image_shape: tuple[int, ...], num_classes: int | None = None) -> Spec:
        """The same family sized for a data set (one example's shape; None keeps the classes)."""
        ...


def _init_runs(init, keys, specs, dtype) -> tuple[list, list]:
    """`init(key, spec, dtype) -> (params, state)` for each key and spec, as two lists.

    Each run of equal consecutive specs is drawn by one `jax.vmap`-ed call:
    the same values as one call per layer (JAX's random functions give the
    same numbers under `vmap` over keys), but one compiled draw per run
    instead of per layer. A 56-layer net's initialisation compiles several
    times faster.
    """
    params, states = [], []
    start = 0
    for spec, run in itertools.groupby(specs):
        n = len(list(run))
        run_keys = keys[start : start + n]
        start += n
        if n == 1:
            p, s = init(run_keys[0], spec, dtype)
            params.append(p)
            states.append(s)
            continue
        p, s = jax.vmap(lambda k, spec=spec: init(k, spec, dtype))(run_keys)
        params += [jax.tree.map(lambda a, j=j: a[j], p) for j in range(n)]
        states += [jax.tree.map(lambda a, j=j: a[j], s) for j in range(n)]
    return params, states


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
            "in": blocks.init_dense(keys[0], self.in_features, self.width, dtype),
            "hidden": _init_runs(
                lambda k, _, dt: (blocks.init_dense(k, self.width, self.width, dt), {}),
                keys[1:-1],
                [None] * self.depth,
                dtype,
            )[0],
            "out": blocks.init_dense(keys[-1], self.width, self.out_features, dtype, gain=1.0),
        }
        return params, {}

    def forward(self, ops: OpSet, params, state, x, *, train, hook=_no_hook):
        del train  # no batch statistics in an MLP
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.in_features:
            raise ValueError(
                f"MLP apply: argument `x` must have {self.in_features} features per example, got shape {x.shape}"
            )
        g, g_out = _activation(ops, self.activation), _activation(ops, self.output_activation)
        a = g(ops.dense(x, params["in"]["w"], params["in"]["b"]))
        for i, layer in enumerate(params["hidden"]):
            a = hook(i, a)
            z = ops.dense(a, layer["w"], layer["b"])
            a = g(ops.add(z, a) if self.residual else z)
        a = hook(len(params["hidden"]), a)
        return g_out(ops.dense(a, params["out"]["w"], params["out"]["b"])), state

    def hook_points(self) -> list[str]:
        return [f"hidden{i}" for i in range(self.depth)] + ["out"]

    def weight_paths(self) -> list[tuple[str, tuple]]:
        hidden = [(f"hidden{i}", ("hidden", i, "w")) for i in range(self.depth)]
        return [("in", ("in", "w")), *hidden, ("out", ("out", "w"))]

    def describe(self) -> list[str]:
        kind = "residual" if self.residual else "plain"
        return [f"{kind} MLP: {self.in_features} -> {self.width} x {self.depth} hidden -> {self.out_features}"]

    def input_shape(self) -> tuple[int, ...]:
        return (self.in_features,)

    def for_data(self, image_shape: tuple[int, ...], num_classes: int | None = None) -> MLPSpec:
        out = self.out_features if num_classes is None else num_classes
        return dataclasses.replace(self, in_features=math.prod(image_shape), out_features=out)


# --------------------------------------------------------------------- ResNets
@dataclasses.dataclass(frozen=True)
class ResNetSpec:
    """A convolutional residual network: stem, stages of blocks, pooled head.

    stem "cifar": 3x3 conv (stride 1); stem "imagenet": 7x7 conv stride 2 and
    3x3 max pool stride 2 (He et al. 2015, Table 1). `stem_padding` of the
    ImageNet stem: "torchvision" pads the convolution by 3 and the pool by 1
    on every side (torchvision, the Flax examples); "same" uses XLA's SAME
    (Haiku, Keras), which at even input sizes puts the odd row and column at
    the end instead, so weights brought from those libraries give their
    logits only with the padding they were trained with.

    v1 nets (basic, bottleneck): stem conv, BN, ReLU. Pre-activation (v2)
    nets normalise once at the stem, as Haiku's ResNetV2 does: the stem is a
    bare convolution, every block (the first included) starts with BN-ReLU,
    and a final BN-ReLU precedes the pool (He et al. 2016, "Identity Mappings
    in Deep Residual Networks").

    `norm`: "batch" (BatchNorm, as in the papers) or "group" (GroupNorm with
    gcd(norm_groups, C) groups per layer, Wu & He 2018), in every place a
    BatchNorm would sit; the parameter count is the same.

    `groups`, `base_width` (bottleneck kinds): the 3x3 convolution of every
    block is grouped, ResNeXt's cardinality and bottleneck width
    (`blocks.BlockSpec`).
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
    stem_padding: str = "torchvision"
    norm: str = "batch"
    norm_groups: int = 32
    groups: int = 1
    base_width: int = 64

    def __post_init__(self):
        blocks.check_norm("ResNetSpec", self.norm, self.norm_groups)
        if self.stem_padding not in STEM_PADDINGS:
            raise ValueError(
                f"ResNetSpec: `stem_padding` must be one of {tuple(STEM_PADDINGS)}, got {self.stem_padding!r}"
            )
        if self.block not in blocks.KINDS:
            raise ValueError(f"ResNetSpec: `block` must be one of {tuple(blocks.KINDS)}, got {self.block!r}")
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
        return blocks.KINDS[self.block].preact

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
                    norm=self.norm,
                    norm_groups=self.norm_groups,
                    groups=self.groups,
                    base_width=self.base_width,
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
        if not self.preact:
            params["stem_bn"], state["stem_bn"] = blocks.init_norm(self.stem_width, dtype, self.norm)
        params["blocks"], state["blocks"] = _init_runs(blocks.init_block, keys[1:-1], specs, dtype)
        c = specs[-1].out_channels
        if self.preact:
            params["final_bn"], state["final_bn"] = blocks.init_norm(c, dtype, self.norm)
        params["head"] = blocks.init_dense(keys[-1], c, self.num_classes, dtype, gain=1.0)
        return params, state

    def forward(self, ops: OpSet, params, state, x, *, train, hook=_no_hook):
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"ResNet apply: argument `x` must be NHWC with {self.in_channels} channels, got shape {tuple(x.shape)}"
            )
        new_state = {}
        if self.stem == "cifar":
            h = ops.conv2d(x, params["stem"]["w"], stride=1, padding="SAME")
        else:
            conv_pad, pool_pad = STEM_PADDINGS[self.stem_padding]
            h = ops.conv2d(x, params["stem"]["w"], stride=2, padding=conv_pad)
        if not self.preact:
            h, new_state["stem_bn"] = self._norm(ops, params["stem_bn"], state["stem_bn"], h, train=train)
            h = ops.relu(h)
        if self.stem == "imagenet":
            h = ops.max_pool(h, window=3, stride=2, padding=pool_pad)
        new_state["blocks"] = []
        for i, (spec, p, s) in enumerate(zip(self.block_specs(), params["blocks"], state["blocks"])):
            h, s = blocks.apply_block(ops, spec, p, s, hook(i, h), train=train)
            new_state["blocks"].append(s)
        h = hook(len(params["blocks"]), h)
        if self.preact:
            h, new_state["final_bn"] = self._norm(ops, params["final_bn"], state["final_bn"], h, train=train)
            h = ops.relu(h)
        h = ops.global_avg_pool(h)
        return ops.dense(h, params["head"]["w"], params["head"]["b"]), new_state

    def _norm(self, ops: OpSet, params, state, x, *, train):
        return blocks.normalize(ops, self.norm, self.norm_groups, params, state, x, train=train)

    def hook_points(self) -> list[str]:
        return [f"block{i}" for i in range(sum(self.stage_sizes))] + ["head"]

    def weight_paths(self) -> list[tuple[str, tuple]]:
        paths: list[tuple[str, tuple]] = [("stem", ("stem", "w"))]
        for i, spec in enumerate(self.block_specs()):
            paths += [(f"block{i}.conv{j}", ("blocks", i, f"conv{j}", "w")) for j in range(len(spec.convs()))]
            if spec.projects:
                paths.append((f"block{i}.proj", ("blocks", i, "proj", "w")))
        return [*paths, ("head", ("head", "w"))]

    def input_shape(self) -> tuple[int, ...]:
        side = 224 if self.stem == "imagenet" else 32
        return (side, side, self.in_channels)

    def for_data(self, image_shape: tuple[int, ...], num_classes: int | None = None) -> ResNetSpec:
        if len(image_shape) != 3:
            raise ValueError(f"ResNetSpec.for_data: argument `image_shape` must be (H, W, C), got {image_shape}")
        k = self.num_classes if num_classes is None else num_classes
        return dataclasses.replace(self, in_channels=image_shape[-1], num_classes=k)

    def describe(self) -> list[str]:
        kind = "ResNet" if self.residual else "plain net"
        norm = "BatchNorm" if self.norm == "batch" else f"GroupNorm (≤ {self.norm_groups} groups)"
        grouped = f" ({self.groups} groups of {self.base_width} per 64 channels)" if self.groups > 1 else ""
        lines = [
            f"{kind}: {self.stem} stem ({self.stem_width} channels), {self.block} blocks{grouped}, "
            f"shortcut {self.shortcut}, {norm}"
        ]
        for i, spec in enumerate(self.block_specs()):
            lines.append(
                f"  block {i:3d}: {spec.kind:<17} {spec.in_channels:>5} -> {spec.out_channels:<5} stride {spec.stride}"
            )
        lines.append(f"  head: global average pool, dense -> {self.num_classes}")
        return lines


# ------------------------------------------------------------------- RevNets
@dataclasses.dataclass(frozen=True)
class RevNetSpec:
    """A reversible residual network (Gomez et al. 2017): stem, stages of couplings, pooled head.

    stem: a bare 3x3 convolution to `stem_width` channels. Each stage is a
    run of couplings y1 = x1 + F(x2), y2 = x2 + G(y1) at one resolution
    (`jax_resnet.reversible`), F and G pre-activation bodies of kind
    `block` ("basic": two 3x3 convolutions; "bottleneck": 1x1-3x3-1x1); the
    first coupling of a stage that changes the shape (stride 2 after the
    first stage, or more channels) is a non-reversible one with option-A
    (`shortcut="A"`) or option-B shortcuts, the rest form one reversible stage. A final BN-ReLU precedes
    the global average pool and the dense head.

    `widths`: Table 1's channels per stage; a stage outputs width · expansion
    channels (×4 for bottleneck). Under `grad="rules"` (or any OpSet but the
    autodiff one) each reversible stage stores only its output; under
    `grad="autodiff"` JAX differentiates the same network storing every
    activation, or with `remat=True` rematerialises each coupling
    (`jax.checkpoint`, the usual JAX answer to memory, for comparison).
    `segment=k` (rules): store every k-th coupling's output in each
    reversible stage, bounding the float32 reconstruction error by that of k
    couplings (`reversible.stage`; derivations/reversible.md#error-analysis).
    """

    stage_sizes: tuple[int, ...]
    block: str
    widths: tuple[int, ...]
    stem_width: int
    num_classes: int
    in_channels: int = 3
    shortcut: str = "A"
    remat: bool = False
    segment: int | None = None
    unroll: bool = False  # the stages' forward scans unrolled (`summary` counts FLOPs so)

    def __post_init__(self):
        if self.block not in reversible.BLOCKS:
            raise ValueError(f"RevNetSpec: `block` must be one of {reversible.BLOCKS}, got {self.block!r}")
        if len(self.stage_sizes) != len(self.widths) or not self.stage_sizes:
            raise ValueError(
                f"RevNetSpec: `stage_sizes` {self.stage_sizes} and `widths` {self.widths} must have equal, "
                "nonzero length"
            )
        if min(self.stage_sizes) < 1:
            raise ValueError(f"RevNetSpec: every stage needs ≥ 1 coupling, got `stage_sizes` {self.stage_sizes}")
        if self.num_classes < 1:
            raise ValueError(f"RevNetSpec: `num_classes` must be ≥ 1, got {self.num_classes}")
        self.stages()  # CouplingSpec checks the channel counts

    def stages(self) -> list[tuple[reversible.CouplingSpec | None, reversible.CouplingSpec, int]]:
        """Per stage: (the non-reversible first coupling or None, the reversible coupling, how many)."""
        out: list[tuple[reversible.CouplingSpec | None, reversible.CouplingSpec, int]] = []
        c = self.stem_width
        for s, (n, width) in enumerate(zip(self.stage_sizes, self.widths)):
            first = reversible.CouplingSpec(self.block, c, width, 2 if s > 0 else 1, self.shortcut)
            rev = reversible.CouplingSpec(self.block, first.out_channels, width)
            out.append((None, rev, n) if first.reversible else (first, rev, n - 1))
            c = first.out_channels
        return out

    @property
    def out_channels(self) -> int:
        return self.stages()[-1][1].out_channels

    def init(self, key, dtype):
        keys = jax.random.split(key, 2 * len(self.stage_sizes) + 2)
        params = {"stem": blocks.init_conv(keys[0], 3, self.in_channels, self.stem_width, dtype)}
        state = {}
        params["stages"], state["stages"] = [], []
        for s, (down, rev, n) in enumerate(self.stages()):
            p, st = {}, {}
            if down is not None:
                p["down"], st["down"] = reversible.init_coupling(keys[1 + 2 * s], down, dtype)
            if n:
                p["rev"], st["rev"] = reversible.init_stage(keys[2 + 2 * s], rev, n, dtype)
            params["stages"].append(p)
            state["stages"].append(st)
        params["final_bn"], state["final_bn"] = blocks.init_bn(self.out_channels, dtype)
        params["head"] = blocks.init_dense(keys[-1], self.out_channels, self.num_classes, dtype, gain=1.0)
        return params, state

    def forward(self, ops: OpSet, params, state, x, *, train, hook=_no_hook):
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"RevNet apply: argument `x` must be NHWC with {self.in_channels} channels, got shape {tuple(x.shape)}"
            )
        h = ops.conv2d(x, params["stem"]["w"], stride=1, padding="SAME")
        new_state: dict[str, Any] = {"stages": []}
        for s, ((down, rev, n), p, st) in enumerate(zip(self.stages(), params["stages"], state["stages"])):
            x1, x2 = jnp.split(hook(s, h), 2, axis=-1)
            new_st = {}
            if down is not None:
                x1, x2, new_st["down"] = reversible.coupling(ops, down, p["down"], st["down"], x1, x2, train=train)
            if n:
                x1, x2, new_st["rev"] = reversible.stage(
                    ops,
                    rev,
                    p["rev"],
                    st["rev"],
                    x1,
                    x2,
                    train=train,
                    remat=self.remat,
                    segment=self.segment,
                    unroll=self.unroll,
                )
            h = jnp.concatenate([x1, x2], axis=-1)
            new_state["stages"].append(new_st)
        h = hook(len(self.stage_sizes), h)
        h, new_state["final_bn"] = blocks.batch_norm(ops, params["final_bn"], state["final_bn"], h, train=train)
        h = ops.global_avg_pool(ops.relu(h))
        return ops.dense(h, params["head"]["w"], params["head"]["b"]), new_state

    def hook_points(self) -> list[str]:
        return [f"stage{s}" for s in range(len(self.stage_sizes))] + ["head"]

    def stacked_paths(self) -> list[tuple]:
        """The subtrees of `params` whose leaves are stacked on a leading axis of couplings (the
        reversible stages', run by one `lax.scan`): per-coupling quantities slice them alike."""
        return [("stages", s, "rev") for s, (_, _, n) in enumerate(self.stages()) if n]

    def weight_paths(self) -> list[tuple[str, tuple]]:
        """Each kernel; a reversible stage's are stacked, one array [couplings, ...] per position."""
        paths: list[tuple[str, tuple]] = [("stem", ("stem", "w"))]
        for s, (down, rev, n) in enumerate(self.stages()):
            for part, spec in (("down", down), ("rev", rev if n else None)):
                if spec is None:
                    continue
                for fn in ("f", "g"):
                    convs = getattr(spec, fn).convs()
                    paths += [
                        (f"stage{s}.{part}.{fn}.conv{j}", ("stages", s, part, fn, f"conv{j}", "w"))
                        for j in range(len(convs))
                    ]
                if spec.projects:
                    paths += [(f"stage{s}.{part}.{n}", ("stages", s, part, n, "w")) for n in ("proj1", "proj2")]
        return [*paths, ("head", ("head", "w"))]

    def describe(self) -> list[str]:
        lines = [f"RevNet: cifar stem ({self.stem_width} channels), {self.block} couplings, F and G pre-activation"]
        for s, (down, rev, n) in enumerate(self.stages()):
            if down is not None:
                lines.append(
                    f"  stage {s}: coupling {down.in_channels:>4} -> {down.out_channels:<4} stride {down.stride} "
                    f"(not reversible: option-{down.shortcut} shortcuts)"
                )
            if n:
                lines.append(
                    f"  stage {s}: {n} reversible couplings {rev.out_channels:>4} channels "
                    f"(F, G: {rev.f.in_channels} -> {rev.f.out_channels} each)"
                )
        lines.append(f"  head: BN, ReLU, global average pool, dense -> {self.num_classes}")
        return lines

    def input_shape(self) -> tuple[int, ...]:
        return (32, 32, self.in_channels)

    def for_data(self, image_shape: tuple[int, ...], num_classes: int | None = None) -> RevNetSpec:
        if len(image_shape) != 3:
            raise ValueError(f"RevNetSpec.for_data: argument `image_shape` must be (H, W, C), got {image_shape}")
        k = self.num_classes if num_classes is None else num_classes
        return dataclasses.replace(self, in_channels=image_shape[-1], num_classes=k)


# The network families: each implements `Spec` (mypy checks this tuple; tests/test_api.py checks the signatures).
FAMILIES: tuple[type[Spec], ...] = (MLPSpec, ResNetSpec, RevNetSpec)


# ----------------------------------------------------------------------- Model
@functools.lru_cache(maxsize=64)
def _compiled_init(spec, dtype):
    # One compilation for all the random draws (eagerly, every parameter shape
    # would compile a kernel of its own), without XLA's backend optimisations.
    return compile_once(jax.jit(lambda key: spec.init(key, dtype)), jax.random.key(0))


@dataclasses.dataclass(frozen=True)
class Model:
    """A spec with pure `init` and `apply`; hashable, so it can be a static arg."""

    spec: Spec
    name: str = "model"

    def init(self, key, dtype=jnp.float32):
        """Return (params, state): pytrees of arrays of `dtype`.

        Called eagerly it runs one program compiled for this spec (cached);
        under `jit`/`eval_shape` it is traced into the caller's program.
        """
        if isinstance(key, jax.core.Tracer):
            return self.spec.init(key, jnp.dtype(dtype))
        return _compiled_init(self.spec, jnp.dtype(dtype))(key)

    def apply(self, params, state, x, *, train: bool, grad: str | OpSet = "rules", hook=_no_hook):
        """Return (output, new_state); new_state carries updated BatchNorm statistics when train.

        Args:
          grad: "rules" (hand-derived VJPs), "autodiff" (reference ops), or an
            `OpSet` of your own (e.g. one rule swapped out, to test or measure it).
          hook: `hook(i, h) -> h`, called on the activation entering each block
            and on the head's input (`spec.hook_points()` names them).
        """
        return self.spec.forward(opset(grad), params, state, x, train=train, hook=hook)

    def for_data(self, image_shape: tuple[int, ...], num_classes: int | None = None) -> Model:
        """The same network with its input (one example's shape) and head
        (None: unchanged) sized for a data set."""
        return dataclasses.replace(self, spec=self.spec.for_data(tuple(image_shape), num_classes))

    def kernel_mask(self, params):
        """A pytree of bools over `params`: True at conv/dense kernels (`spec.weight_paths`).

        Weight decay applies there, not to biases or BatchNorm scales and shifts.
        """
        kernels = {path for _, path in self.spec.weight_paths()}
        return jax.tree_util.tree_map_with_path(lambda key_path, _: path_of(key_path) in kernels, params)


# ------------------------------------------------------------- paths into params
def path_of(key_path) -> tuple:
    """A `jax.tree_util` key path as a tuple of dict keys and list indices: the form of `Spec.weight_paths`."""
    return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in key_path)


def subtree(tree, path: tuple):
    """`tree[path[0]][path[1]]...`: the node at a path as `weight_paths` and `path_of` write it."""
    for key in path:
        tree = tree[key]
    return tree


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
    spec: Any = model.spec
    if getattr(spec, "unroll", None) is False:
        # XLA's cost analysis counts a loop's body once: count a scanned network's layers unrolled.
        model = dataclasses.replace(model, spec=dataclasses.replace(spec, unroll=True))
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    lowered = jax.jit(lambda p, s, x: model.apply(p, s, x, train=False)[0]).lower(params, state, x)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost is None:
        raise RuntimeError(f"summary: XLA gave no cost analysis for {model.name} on {jax.default_backend()}")
    return {
        "model": model.name,
        "input_shape": list(input_shape),
        "params": num_params(params),
        "flops": int(cost["flops"]),
        "layers": model.spec.describe(),
    }


# --------------------------------------------------------------------- presets
def mlp(
    in_features=64,
    width=64,
    depth=2,
    out_features=10,
    activation="relu",
    output_activation="identity",
    *,
    residual=True,
) -> Model:
    """The seed's residual network, generalised to `depth` skip-connected hidden layers
    (`residual_mlp`), or the same without the skip connections (`plain_mlp`, the seed's "BP network").

    Command: jax-resnet train --model residual_mlp   (or plain_mlp)
    """
    spec = MLPSpec(in_features, width, depth, out_features, activation, output_activation, residual=residual)
    return Model(spec, "residual_mlp" if residual else "plain_mlp")


def resnet(
    stage_sizes,
    block,
    widths,
    *,
    stem="cifar",
    stem_width=16,
    shortcut="B",
    num_classes=10,
    in_channels=3,
    dropout=0.0,
    **options,
) -> Model:
    """Any `ResNetSpec` from its stages: the builder under `cifar_resnet` and `imagenet_resnet`, and of the
    families made of existing block kinds (ResNeXt, Wide ResNets), whose presets are its arguments.

    Args:
      stage_sizes, block, widths: blocks per stage, their kind (`blocks.KINDS`), `width` per stage.
      stem, stem_width, shortcut, num_classes, in_channels: as in `ResNetSpec`.
      dropout: must be 0. Wide ResNets may drop out between a block's convolutions
        (Zagoruyko & Komodakis 2016, §2.4), but `Model.apply` takes no random key, so
        no forward pass here can draw a dropout mask.
      **options: the other `ResNetSpec` fields (`groups`, `base_width`, `norm`, ...).

    Command: jax-resnet train --model wrn16_8 --dataset cifar10 --data-dir DIR --optimizer momentum --lr 0.1
    """
    if dropout:
        raise ValueError(
            f"resnet: `dropout` must be 0, got {dropout!r}: dropout is not supported, because Model.apply "
            "takes no random key to draw its masks from (train without it, as the presets do)"
        )
    spec = ResNetSpec(
        stage_sizes=tuple(stage_sizes),
        block=block,
        widths=tuple(widths),
        stem=stem,
        stem_width=stem_width,
        shortcut=shortcut,
        num_classes=num_classes,
        in_channels=in_channels,
        **options,
    )
    return Model(spec, "resnet")


def cifar_resnet(
    depth: int,
    *,
    num_classes=10,
    in_channels=3,
    widths=(16, 32, 64),
    residual=True,
    block="basic",
    zero_init_residual=False,
    shortcut="A",
    norm="batch",
    norm_groups=32,
) -> Model:
    """CIFAR ResNet with 6n+2 layers and option-A shortcuts (He et al. 2015, §4.2).

    `shortcut="B"` projects instead; `norm="group"` puts GroupNorm where BatchNorm
    sits (`resnet20_gn`, for per-example gradients and DP-SGD).

    Command: jax-resnet train --model resnet20 --dataset cifar10
    """
    if (depth - 2) % 6 or depth < 8:
        raise ValueError(
            f"cifar_resnet: `depth` must be 6n+2 with n ≥ 1 (8, 14, 20, 32, 44, 56, 110, 1202), got {depth}"
        )
    n = (depth - 2) // 6
    options = dict(residual=residual, zero_init_residual=zero_init_residual, norm=norm, norm_groups=norm_groups)
    model = resnet(
        (n,) * len(widths),
        block,
        widths,
        stem_width=widths[0],
        shortcut=shortcut,
        num_classes=num_classes,
        in_channels=in_channels,
        **options,
    )
    return dataclasses.replace(model, name=f"{'resnet' if residual else 'plain'}{depth}")


def imagenet_resnet(
    stage_sizes,
    block,
    *,
    num_classes=1000,
    in_channels=3,
    width=64,
    zero_init_residual=False,
    stem_padding="torchvision",
    norm="batch",
    norm_groups=32,
) -> Model:
    """ImageNet ResNet: 7x7 stem, max pool, one stage per entry of `stage_sizes`
    (four in the presets; widths `width`, 2·`width`, ...), option-B projections.

    `stem_padding`: "torchvision" (default) or "same" (Haiku, Keras); see `ResNetSpec`.
    `norm="group"`: GroupNorm in place of BatchNorm (`resnet18_gn`).

    Command (CPU-sized input; any data set, the head takes its classes):
    jax-resnet train --model resnet18 --dataset cifar10 --data-dir DIR --optimizer momentum --lr 0.1
    """
    model = resnet(
        stage_sizes,
        block,
        [width * 2**i for i in range(len(stage_sizes))],
        stem="imagenet",
        stem_width=width,
        num_classes=num_classes,
        in_channels=in_channels,
        zero_init_residual=zero_init_residual,
        stem_padding=stem_padding,
        norm=norm,
        norm_groups=norm_groups,
    )
    depth = 2 + sum(stage_sizes) * len(blocks.BlockSpec(block, width, width).convs())
    return dataclasses.replace(model, name=f"resnet{depth}")


def revnet(
    stage_sizes,
    block,
    widths,
    *,
    stem_width=32,
    num_classes=10,
    in_channels=3,
    shortcut="A",
    remat=False,
    segment=None,
) -> Model:
    """A CIFAR RevNet (Gomez et al. 2017, Table 1): 3x3 stem, reversible stages, pooled head.

    Depth = 2 + (couplings) · 2 · (convolutions per residual function): two
    for basic, three for bottleneck F and G.

    Command: jax-resnet train --model revnet38 --dataset cifar10 --data-dir DIR
    """
    spec = RevNetSpec(
        stage_sizes=tuple(stage_sizes),
        block=block,
        widths=tuple(widths),
        stem_width=stem_width,
        num_classes=num_classes,
        in_channels=in_channels,
        shortcut=shortcut,
        remat=remat,
        segment=segment,
    )
    convs = 3 if block == "bottleneck" else 2
    return Model(spec, f"revnet{2 + 2 * convs * sum(stage_sizes)}")


PRESETS: dict[str, Callable[..., Model]] = {}


def _preset(name: str, builder: Callable[..., Model], *args, **kwargs) -> Callable[..., Model]:
    """Register `builder(*args, **kwargs)` as the preset `name`; keyword overrides pass through."""

    def build(**overrides) -> Model:
        return dataclasses.replace(builder(*args, **{**kwargs, **overrides}), name=name)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = builder.__doc__
    PRESETS[name] = build
    return build


def _tiny(num_classes=10, in_channels=1) -> Model:
    """A 8-layer CIFAR-style ResNet with narrow stages (8, 16, 32): the test model.

    Command: jax-resnet train --model tiny
    """
    return cifar_resnet(8, num_classes=num_classes, in_channels=in_channels, widths=(8, 16, 32))


tiny = _preset("tiny", _tiny)
residual_mlp = _preset("residual_mlp", mlp, residual=True)
plain_mlp = _preset("plain_mlp", mlp, residual=False)
resnet8 = _preset("resnet8", cifar_resnet, 8)
resnet14 = _preset("resnet14", cifar_resnet, 14)
resnet20 = _preset("resnet20", cifar_resnet, 20)
resnet32 = _preset("resnet32", cifar_resnet, 32)
resnet44 = _preset("resnet44", cifar_resnet, 44)
resnet56 = _preset("resnet56", cifar_resnet, 56)
resnet110 = _preset("resnet110", cifar_resnet, 110)
resnet1202 = _preset("resnet1202", cifar_resnet, 1202)
plain8 = _preset("plain8", cifar_resnet, 8, residual=False)
plain14 = _preset("plain14", cifar_resnet, 14, residual=False)
plain20 = _preset("plain20", cifar_resnet, 20, residual=False)
plain32 = _preset("plain32", cifar_resnet, 32, residual=False)
plain44 = _preset("plain44", cifar_resnet, 44, residual=False)
plain56 = _preset("plain56", cifar_resnet, 56, residual=False)
plain110 = _preset("plain110", cifar_resnet, 110, residual=False)
preact_resnet20 = _preset("preact_resnet20", cifar_resnet, 20, block="preact_basic")
resnet18 = _preset("resnet18", imagenet_resnet, (2, 2, 2, 2), "basic")
resnet34 = _preset("resnet34", imagenet_resnet, (3, 4, 6, 3), "basic")
resnet50 = _preset("resnet50", imagenet_resnet, (3, 4, 6, 3), "bottleneck")
resnet101 = _preset("resnet101", imagenet_resnet, (3, 4, 23, 3), "bottleneck")
resnet152 = _preset("resnet152", imagenet_resnet, (3, 8, 36, 3), "bottleneck")
preact_resnet18 = _preset("preact_resnet18", imagenet_resnet, (2, 2, 2, 2), "preact_basic")
# Gomez et al. 2017, Table 1: units per stage and channels (stem, then per stage).
revnet38 = _preset("revnet38", revnet, (3, 3, 3), "basic", (32, 64, 112))
revnet110 = _preset("revnet110", revnet, (9, 9, 9), "basic", (32, 64, 128))
# RevNet-164 with option-B (projection) shortcuts where the shape changes, as the
# bottleneck ResNet-164 it is compared with (He et al. 2016); tests/test_reversible.py counts it.
revnet164 = _preset("revnet164", revnet, (9, 9, 9), "bottleneck", (32, 64, 128), shortcut="B")
# ResNeXt-29 (Xie et al. 2017, §5.3 and Table 7): a 64-channel 3x3 stem, three stages of three bottleneck
# blocks (width 64, 128, 256: outputs 256, 512, 1024), cardinality C with bottleneck width d = 64 in the
# first stage (grouped 3x3 of C·d·2^stage channels), option-B projections; tests/test_models.py counts them.
resnext29_8x64d = _preset("resnext29_8x64d", resnet, (3, 3, 3), "bottleneck", (64, 128, 256), stem_width=64, groups=8)
resnext29_16x64d = _preset(
    "resnext29_16x64d", resnet, (3, 3, 3), "bottleneck", (64, 128, 256), stem_width=64, groups=16
)
# Wide ResNets WRN-d-k (Zagoruyko & Komodakis 2016, Table 1): a 16-channel 3x3 stem, (d − 4)/6 pre-activation
# basic blocks per stage of widths 16k, 32k, 64k, 1x1 projections where the shape changes; without dropout.
wrn28_10 = _preset("wrn28_10", resnet, (4, 4, 4), "preact_basic", (160, 320, 640))
wrn16_8 = _preset("wrn16_8", resnet, (2, 2, 2), "preact_basic", (128, 256, 512))
# GroupNorm twins, whose examples do not interact: per-example gradients and DP-SGD
# (jax_resnet.per_example). 16 groups at CIFAR widths (16, 32, 64), 32 (Wu & He 2018) at ImageNet's.
resnet20_gn = _preset("resnet20_gn", cifar_resnet, 20, norm="group", norm_groups=16)
resnet18_gn = _preset("resnet18_gn", imagenet_resnet, (2, 2, 2, 2), "basic", norm="group", norm_groups=32)
# The test model's GroupNorm twin (8 groups): small enough for DP-SGD on MNIST on a CPU.
tiny_gn = _preset("tiny_gn", cifar_resnet, 8, widths=(8, 16, 32), norm="group", norm_groups=8)


def get(name: str, **kwargs) -> Model:
    """Build a preset by name (its `Model.name` is `name`); unknown names list the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name](**kwargs)


__all__ = [
    "STEM_PADDINGS",
    "ACTIVATIONS",
    "Hook",
    "Spec",
    "MLPSpec",
    "ResNetSpec",
    "RevNetSpec",
    "FAMILIES",
    "Model",
    "path_of",
    "subtree",
    "num_params",
    "summary",
    "mlp",
    "cifar_resnet",
    "imagenet_resnet",
    "resnet",
    "revnet",
    "PRESETS",
    "tiny",
    "residual_mlp",
    "plain_mlp",
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
    "resnet1202",
    "plain8",
    "plain14",
    "plain20",
    "plain32",
    "plain44",
    "plain56",
    "plain110",
    "preact_resnet20",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "preact_resnet18",
    "revnet38",
    "revnet110",
    "revnet164",
    "resnext29_8x64d",
    "resnext29_16x64d",
    "wrn28_10",
    "wrn16_8",
    "resnet20_gn",
    "resnet18_gn",
    "tiny_gn",
    "get",
]
