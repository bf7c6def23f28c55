"""`jax-resnet bench`: one training step, three ways, side by side in one process.

For every workload the same step — forward, backward, and an optax update
(SGD with momentum 0.9) on softmax cross-entropy — is compiled and timed for:

  rules     the library, `model.apply(..., grad="rules")`: hand-derived VJPs;
  autodiff  the library, `model.apply(..., grad="autodiff")`: reference ops, JAX's VJPs;
  flax      an independent peer written with Flax's own layers (`nnx.Conv`,
            `nnx.BatchNorm`, `nnx.Linear`, `nnx.relu`, `nnx.max_pool`, `jnp`),
            the same architecture: layer for layer the same shapes, and the
            parameter counts are asserted equal.

All three steps are pure functions `step(carry, x, y) -> (carry, loss)`
compiled with `jax.jit(step, donate_argnums=0)`, so the parameters, the
BatchNorm statistics and the optimizer state are donated alike. The Flax peer
is trained with `nnx.Optimizer` and `nnx.value_and_grad`; its step is the
split/merge form that Flax's performance guide recommends for the lowest
per-call overhead: `nnx.split((model, optimizer))` once, then a `jax.jit`
function that `nnx.merge`s the graph, updates in place and returns
`nnx.state(...)`. `nnx.jit` compiles the same computation but walks the
object graph in Python on every call: on 2 CPU cores the MLP's step took
about 1.5 ms through `nnx.jit`, 0.7 ms through `nnx.cached_partial` and
0.3 ms split/merge. Being pure, the peer's step is lowered and measured
exactly as the library's.

Figures per workload and method (JSON field names; each a stable contract):

  step_time_ms        median over rounds of the mean step time within a round;
                      each round runs every method in turn (rotating which goes
                      first), so drift in the machine's load hits all alike;
  step_time_ms_min, step_time_ms_max   the fastest and the slowest round;
  round_step_times_ms every round's mean step time, in order;
  rounds, steps_per_round  how many rounds ran, and steps per method in each;
  ratio_to_autodiff   median over rounds of (step time / autodiff's step time
                      in the same round): a ratio within one round compares
                      steps taken under the same load;
  ratio_to_autodiff_min, ratio_to_autodiff_max  its range over the rounds;
  compile_time_s      `jax.jit(step).lower(...).compile()`, median of
                      `COMPILE_REPEATS` compilations from new step functions
                      (the last executable is the one timed);
  compile_time_s_min, compile_time_s_max, compile_times_s  their range and all of them;
  temp_memory_bytes   `compiled.memory_analysis().temp_size_in_bytes`: XLA's
                      scratch for the step (activations kept for the backward
                      pass, gradients, intermediates), excluding arguments and outputs;
  examples_per_second batch / step time.

Every row carries the environment (device, platform, versions, CPU cores, date).

How far to trust a ratio: the report gives the range of the per-round ratio,
and calls a goal met or missed only when the whole range lies on one side
of it ("within noise" otherwise; `goals`). A min–max range does not shrink
with more rounds (more rounds only sample the tails better); it shrinks with
longer rounds, each averaging more steps, and with a quieter machine. The
defaults, `ROUNDS` rounds of at least `ROUND_SECONDS` per method, aim at a
rules/autodiff range within ±3% (`SPREAD_TARGET`) on an idle 2-core CPU;
the report says, per workload, whether it got there.

Command (the full run takes about 6 minutes on 2 CPU cores):

    jax-resnet bench --json bench.json --markdown bench.md
    jax-resnet bench --workload resnet20
    jax-resnet bench --quick        # tiny sizes, seconds; numbers are not meaningful
    benchmarks/gpu.sh               # the same on a CUDA GPU (installs jax[cuda12] into .venv-gpu)

A new workload (a reversible stack, per-example gradients) is one more entry
in `WORKLOADS`; one whose step differs from the plain training step passes its
own `library_step` / `peer_step` builders. The DP-SGD workloads (`kind="dp"`,
`jax-resnet bench --dp`) and the curvature workloads (`kind="curvature"`,
`jax-resnet bench --curvature`) are entries too: a kind (`KINDS`) names its
methods' baseline and its flag, its methods are `DP_METHODS` or
`CURVATURE_METHODS`, and every flag works for them as for the others.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jax_resnet import blocks, curvature, models, per_example
from jax_resnet import dp as dp_lib
from jax_resnet import step as step_lib
from jax_resnet.environment import record as environment_record
from jax_resnet.ops import AUTODIFF, RULES, SPECS, OpSet

__all__ = [
    "METHODS",
    "LEARNING_RATE",
    "optimizer",
    "PeerMLP",
    "PeerBasicBlock",
    "PeerResNet",
    "peer_num_params",
    "library_step",
    "peer_step",
    "Kind",
    "KINDS",
    "Workload",
    "WORKLOADS",
    "get_workload",
    "Prepared",
    "init_library",
    "build_peer",
    "prepare",
    "ablation_opsets",
    "prepare_ablation",
    "prepare_step",
    "time_interleaved",
    "spread",
    "spread_fields",
    "environment",
    "bench_workload",
    "GOALS",
    "SAMPLES",
    "SPREAD_TARGET",
    "judge",
    "goals",
    "ratio_spread",
    "format_table",
    "format_markdown",
    "ROUNDS",
    "ROUND_SECONDS",
    "COMPILE_REPEATS",
    "benchmark",
    "DP_METHODS",
    "dp_config",
    "dp_method_step",
    "dp_methods",
    "prepare_dp",
    "format_ablation_table",
    "DP_GOALS",
    "dp_goals",
    "format_dp_markdown",
    "format_dp_table",
    "CURVATURE_METHODS",
    "curvature_methods",
    "jacrev_diag_ggn",
    "kfac_jax_estimator",
    "kfac_jax_step",
    "curvature_method_step",
    "backward_pass",
    "kfac_jax_failure",
    "kfac_jax_unavailable",
    "prepare_curvature",
    "CURVATURE_GOALS",
    "curvature_goals",
    "format_curvature_table",
    "format_curvature_markdown",
]

METHODS = ("rules", "autodiff", "flax")
LEARNING_RATE = 0.01


def optimizer() -> optax.GradientTransformation:
    """The optax transform every method trains with: SGD with momentum 0.9."""
    return step_lib.make_optimizer("momentum", LEARNING_RATE)


# ------------------------------------------------------------------ Flax peers
class PeerMLP(nnx.Module):
    """`models.residual_mlp` in nnx layers: a = relu(in(x)); a ← relu(hidden_l(a) + a); out(a)."""

    def __init__(
        self, in_features: int, width: int, depth: int, out_features: int, *, dtype=jnp.float32, rngs: nnx.Rngs
    ):
        linear = functools.partial(nnx.Linear, param_dtype=dtype, rngs=rngs)
        self.inp = linear(in_features, width)
        self.hidden = nnx.List([linear(width, width) for _ in range(depth)])
        self.out = linear(width, out_features)

    def __call__(self, x):
        a = nnx.relu(self.inp(x.reshape(x.shape[0], -1)))
        for layer in self.hidden:
            a = nnx.relu(layer(a) + a)
        return self.out(a)

    def load(self, params, state) -> None:
        """Copy the weights of `models.residual_mlp`'s pure params in."""
        del state
        for layer, p in zip([self.inp, *self.hidden, self.out], [params["in"], *params["hidden"], params["out"]]):
            _fill(layer.kernel, p["w"])
            _fill(layer.bias, p["b"])


def _bn(channels: int, dtype, rngs) -> nnx.BatchNorm:
    return nnx.BatchNorm(
        channels,
        use_running_average=False,
        # jax_resnet.blocks' settings (nnx's default momentum is 0.99).
        momentum=blocks.BN_MOMENTUM,
        epsilon=blocks.BN_EPS,
        param_dtype=dtype,
        rngs=rngs,
    )


def _fill(variable: nnx.Variable | None, value) -> None:
    """Set an nnx variable the peer always has (Flax types a bias or a scale as optional)."""
    if variable is None:
        raise ValueError("the Flax peer lacks a variable the library's model has")
    variable.set_value(value)


def _load_bn(bn: nnx.BatchNorm, params, state) -> None:
    _fill(bn.scale, params["gamma"])
    _fill(bn.bias, params["beta"])
    bn.mean.set_value(state["mean"])
    bn.var.set_value(state["var"])


class PeerBasicBlock(nnx.Module):
    """relu(bn1(conv3x3(relu(bn0(conv3x3_s(x))))) + shortcut(x)), shortcut A or B on a shape change."""

    def __init__(self, c_in: int, c_out: int, stride: int, shortcut: str, *, dtype, rngs: nnx.Rngs):
        conv = functools.partial(nnx.Conv, use_bias=False, param_dtype=dtype, rngs=rngs)
        self.conv0 = conv(c_in, c_out, (3, 3), strides=stride, padding="SAME")
        self.bn0 = _bn(c_out, dtype, rngs)
        self.conv1 = conv(c_out, c_out, (3, 3), padding="SAME")
        self.bn1 = _bn(c_out, dtype, rngs)
        self.stride = stride
        self.pad_channels = c_out - c_in
        self.projects = (stride != 1 or c_in != c_out) and shortcut == "B"
        self.subsamples = (stride != 1 or c_in != c_out) and shortcut == "A"
        if self.projects:
            self.proj = conv(c_in, c_out, (1, 1), strides=stride, padding="VALID")
            self.proj_bn = _bn(c_out, dtype, rngs)

    def shortcut(self, x):
        if self.projects:
            return self.proj_bn(self.proj(x))
        if self.subsamples:
            # Option A: every stride-th pixel, zero channels split evenly around the old ones.
            s, extra = self.stride, self.pad_channels
            return jnp.pad(x[:, ::s, ::s, :], ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        return x

    def __call__(self, x):
        h = nnx.relu(self.bn0(self.conv0(x)))
        h = self.bn1(self.conv1(h))
        return nnx.relu(h + self.shortcut(x))

    def load(self, params, state) -> None:
        self.conv0.kernel.set_value(params["conv0"]["w"])
        self.conv1.kernel.set_value(params["conv1"]["w"])
        _load_bn(self.bn0, params["bn0"], state["bn0"])
        _load_bn(self.bn1, params["bn1"], state["bn1"])
        if self.projects:
            # The library's projection is a [C_in, C_out] matrix; nnx.Conv's 1x1 kernel is HWIO.
            self.proj.kernel.set_value(params["proj"]["w"].reshape(1, 1, *params["proj"]["w"].shape))
            _load_bn(self.proj_bn, params["proj_bn"], state["proj_bn"])


class PeerResNet(nnx.Module):
    """A v1 ResNet of basic blocks in nnx layers.

    stem "cifar": conv3x3, BN, relu. stem "imagenet": conv7x7 stride 2 (padding 3),
    BN, relu, max pool 3x3 stride 2 (padding 1). Stage i has stage_sizes[i]
    blocks of widths[i] channels, stride 2 at the first block of every stage
    but the first. Head: global average pool, linear.
    """

    def __init__(
        self,
        stage_sizes,
        widths,
        *,
        stem: str,
        shortcut: str,
        num_classes: int,
        in_channels=3,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if stem == "cifar":
            self.stem = nnx.Conv(
                in_channels, widths[0], (3, 3), padding="SAME", use_bias=False, param_dtype=dtype, rngs=rngs
            )
        else:
            self.stem = nnx.Conv(
                in_channels,
                widths[0],
                (7, 7),
                strides=2,
                padding=((3, 3), (3, 3)),
                use_bias=False,
                param_dtype=dtype,
                rngs=rngs,
            )
        self.stem_bn = _bn(widths[0], dtype, rngs)
        self.pools = stem == "imagenet"
        blocks, c = [], widths[0]
        for stage, (n, width) in enumerate(zip(stage_sizes, widths)):
            for i in range(n):
                blocks.append(
                    PeerBasicBlock(c, width, 2 if (i == 0 and stage > 0) else 1, shortcut, dtype=dtype, rngs=rngs)
                )
                c = width
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(c, num_classes, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.stem_bn(self.stem(x)))
        if self.pools:
            h = nnx.max_pool(h, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for block in self.blocks:
            h = block(h)
        return self.head(jnp.mean(h, axis=(1, 2)))

    def load(self, params, state) -> None:
        """Copy the weights and BatchNorm statistics of the library's pure (params, state) in."""
        self.stem.kernel.set_value(params["stem"]["w"])
        _load_bn(self.stem_bn, params["stem_bn"], state["stem_bn"])
        for block, p, s in zip(self.blocks, params["blocks"], state["blocks"]):
            block.load(p, s)
        self.head.kernel.set_value(params["head"]["w"])
        _fill(self.head.bias, params["head"]["b"])


def peer_num_params(module: nnx.Module) -> int:
    """Trainable scalars of an nnx module (its nnx.Param variables; BatchNorm statistics are not)."""
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


# ---------------------------------------------------------------------- steps
# A step is pure: step(carry, x, y) -> (carry, loss), the carry donated.
def library_step(model: models.Model, grad: str | OpSet, tx: optax.GradientTransformation) -> Callable:
    """The library's training step (`step.update_fn`); carry = (params, state, opt_state)."""
    update = step_lib.update_fn(model, tx, grad)

    def step(carry, x, y):
        params, state, opt_state, loss, _ = update(*carry, x, y)
        return (params, state, opt_state), loss

    return step


def peer_step(graphdef) -> Callable:
    """The Flax peer's training step over nnx.split((model, nnx.Optimizer)); carry = that state."""

    def loss_fn(net, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(net(x), y).mean()

    def step(carry, x, y):
        net, opt = nnx.merge(graphdef, carry)
        loss, grads = nnx.value_and_grad(loss_fn)(net, x, y)
        opt.update(net, grads)
        return nnx.state((net, opt)), loss

    return step


# ------------------------------------------------------------------ workloads
class Kind(NamedTuple):
    """A kind of workload: the method its ratios are taken against, the flag of `jax-resnet bench`
    that selects it (None: none, the default), and what the kind is called in messages."""

    baseline: str
    flag: str | None
    noun: str


KINDS = {
    "step": Kind("autodiff", None, "training-step"),
    "dp": Kind("non_private", "--dp", "DP"),
    "curvature": Kind("train_step", "--curvature", "curvature"),
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark: a library model, the batch it trains on, and the methods compared.

    `kind` says which methods it compares and against which baseline (`KINDS`):
    a training-step workload ("step") compares `METHODS` against "autodiff":
    `peer(dtype, rngs)` builds the Flax nnx module, which has `load(params, state)`
    to take the library model's weights. A DP workload ("dp", `jax-resnet
    bench --dp`) compares `DP_METHODS` against "non_private" and has no peer; a
    curvature workload ("curvature", `jax-resnet bench --curvature`) compares
    `CURVATURE_METHODS` against "train_step", with BatchNorm in the curvature
    quantities in training mode or, `curvature_train=False`, on its running statistics.
    `batch`/`example_shape` are the full run's sizes, `quick_batch`/`quick_example_shape`
    those of `--quick`.
    """

    name: str
    description: str
    model: Callable[[], models.Model]
    num_classes: int
    batch: int
    example_shape: tuple[int, ...]
    quick_batch: int
    quick_example_shape: tuple[int, ...]
    peer: Callable[..., nnx.Module] | None = None
    library_step: Callable = library_step
    peer_step: Callable = peer_step
    kind: str = "step"
    curvature_train: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Workload {self.name!r}: `kind` must be one of {tuple(KINDS)}, got {self.kind!r}")

    @property
    def dp(self) -> bool:
        return self.kind == "dp"

    @property
    def baseline(self) -> str:
        """The method every ratio is taken against."""
        return KINDS[self.kind].baseline

    def sizes(self, quick: bool) -> tuple[int, tuple[int, ...]]:
        return (self.quick_batch, self.quick_example_shape) if quick else (self.batch, self.example_shape)


WORKLOADS: list[Workload] = [
    Workload(
        name="residual_mlp",
        description="the seed's residual MLP, 64 -> 64 x 2 hidden -> 10, digits-sized input",
        model=lambda: models.residual_mlp(in_features=64, width=64, depth=2, out_features=10),
        peer=lambda dtype, rngs: PeerMLP(64, 64, 2, 10, dtype=dtype, rngs=rngs),
        num_classes=10,
        batch=128,
        example_shape=(64,),
        quick_batch=16,
        quick_example_shape=(64,),
    ),
    Workload(
        name="resnet20",
        description="CIFAR ResNet-20 (option-A shortcuts), 32x32x3, 10 classes",
        model=lambda: models.resnet20(num_classes=10),
        peer=lambda dtype, rngs: PeerResNet(
            (3, 3, 3), (16, 32, 64), stem="cifar", shortcut="A", num_classes=10, dtype=dtype, rngs=rngs
        ),
        num_classes=10,
        batch=128,
        example_shape=(32, 32, 3),
        quick_batch=4,
        quick_example_shape=(8, 8, 3),
    ),
    Workload(
        name="resnet18",
        description="ResNet-18 (7x7 stem, max pool, option-B projections), 64x64x3, 1000 classes",
        model=lambda: models.resnet18(num_classes=1000),
        peer=lambda dtype, rngs: PeerResNet(
            (2, 2, 2, 2), (64, 128, 256, 512), stem="imagenet", shortcut="B", num_classes=1000, dtype=dtype, rngs=rngs
        ),
        num_classes=1000,
        batch=32,
        example_shape=(64, 64, 3),
        quick_batch=2,
        quick_example_shape=(32, 32, 3),
    ),
    Workload(
        name="dp_residual_mlp",
        description="DP-SGD step: the seed's residual MLP, 64 -> 64 x 2 hidden -> 10, expected batch 256",
        model=lambda: models.residual_mlp(in_features=64, width=64, depth=2, out_features=10),
        num_classes=10,
        batch=256,
        example_shape=(64,),
        quick_batch=16,
        quick_example_shape=(64,),
        kind="dp",
    ),
    Workload(
        name="dp_resnet20_gn",
        description="DP-SGD step: CIFAR ResNet-20 with GroupNorm (16 groups), 32x32x3, expected batch 256",
        model=lambda: models.resnet20_gn(num_classes=10),
        num_classes=10,
        batch=256,
        example_shape=(32, 32, 3),
        quick_batch=4,
        quick_example_shape=(8, 8, 3),
        kind="dp",
    ),
    Workload(
        name="curvature_residual_mlp",
        description="curvature: the seed's residual MLP, 64 -> 64 x 2 hidden -> 10, batch 128",
        model=lambda: models.residual_mlp(in_features=64, width=64, depth=2, out_features=10),
        num_classes=10,
        batch=128,
        example_shape=(64,),
        quick_batch=8,
        quick_example_shape=(64,),
        kind="curvature",
    ),
    Workload(
        name="curvature_resnet20_gn",
        description="curvature: CIFAR ResNet-20 with GroupNorm (16 groups), 32x32x3, batch 128",
        model=lambda: models.resnet20_gn(num_classes=10),
        num_classes=10,
        batch=128,
        example_shape=(32, 32, 3),
        quick_batch=4,
        quick_example_shape=(8, 8, 3),
        kind="curvature",
    ),
    Workload(
        name="curvature_resnet20",
        description="curvature: CIFAR ResNet-20 (BatchNorm; the curvature on its running statistics), "
        "32x32x3, batch 128",
        model=lambda: models.resnet20(num_classes=10),
        num_classes=10,
        batch=128,
        example_shape=(32, 32, 3),
        quick_batch=4,
        quick_example_shape=(8, 8, 3),
        kind="curvature",
        curvature_train=False,
    ),
]


def get_workload(name: str) -> Workload:
    for w in WORKLOADS:
        if w.name == name:
            return w
    raise ValueError(f"unknown workload {name!r}; choose one of: {', '.join(w.name for w in WORKLOADS)}")


# ---------------------------------------------------------------- measurement
@dataclasses.dataclass
class Prepared:
    """One method's compiled step, its running carry and its batch."""

    method: str
    compiled: Any
    carry: Any
    batch: tuple
    compile_times_s: list[float]
    temp_memory_bytes: int | None
    num_params: int
    unavailable: str | None = None  # why a peer could not run here: its row says so instead of a number

    def run(self, steps: int) -> float:
        """Run `steps` steps; return the mean seconds per step, waiting for the last."""
        start = time.perf_counter()
        for _ in range(steps):
            self.carry, _ = self.compiled(self.carry, *self.batch)
        jax.block_until_ready(self.carry)
        return (time.perf_counter() - start) / steps


def _compile(step: Callable, carry, batch) -> tuple[Any, float]:
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(carry, *batch).compile()
    return compiled, time.perf_counter() - start


def init_library(model: models.Model, key, dtype=jnp.float32):
    """The library model's (params, state), as host (numpy) arrays, so every user gets its own device copy."""
    return jax.device_get(model.init(key, dtype))


def build_peer(workload: Workload, params, state, dtype=jnp.float32) -> nnx.Module:
    """The workload's Flax peer holding the library's weights and BatchNorm statistics.

    Built abstractly (`nnx.eval_shape`: Flax's initialisers never run), then filled by `load`.
    """
    make = workload.peer
    if make is None:
        raise ValueError(f"workload {workload.name!r} has no Flax peer")
    net: Any = nnx.eval_shape(lambda: make(dtype, nnx.Rngs(0)))
    net.load(*jax.device_put((params, state)))
    return net


def prepare(
    workload: Workload,
    quick: bool,
    seed: int = 0,
    dtype=jnp.float32,
    compile_repeats: int = 1,
    log: Callable[[str], None] = lambda s: None,
    ablate: bool = False,
) -> list[Prepared]:
    """Build, initialise and compile the workload's methods on one random batch, in the
    order of their rows (`prepare_dp` for a DP workload, `prepare_curvature` for a curvature
    workload, `prepare_ablation` with `ablate`)."""
    if workload.dp:
        return prepare_dp(workload, quick, seed, compile_repeats, log)
    if workload.kind == "curvature":
        return prepare_curvature(workload, quick, seed, compile_repeats, log)
    if ablate:
        return prepare_ablation(workload, quick, seed, dtype)
    return prepare_step(workload, quick, seed, dtype, compile_repeats)


def ablation_opsets() -> dict[str, OpSet]:
    """ "rules", then the rules with one family's ops (`ops.FAMILIES`) swapped for their
    reference twins, one family at a time ("autodiff <family>"), then "autodiff"."""
    variants = {"rules": RULES}
    for family in dict.fromkeys(spec.family for spec in SPECS.values()):
        swapped = {name: AUTODIFF._asdict()[name] for name, spec in SPECS.items() if spec.family == family}
        variants[f"autodiff {family}"] = RULES._replace(**swapped)
    variants["autodiff"] = AUTODIFF
    return variants


def prepare_ablation(workload: Workload, quick: bool, seed: int = 0, dtype=jnp.float32) -> list[Prepared]:
    """The library's training step once per `ablation_opsets` variant (`jax-resnet bench --ablate`):
    which rule family makes the hand-derived step faster or slower, leaner or larger, than autodiff's."""
    batch_size, example_shape = workload.sizes(quick)
    k_x, k_y, k_init = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k_x, (batch_size, *example_shape), dtype)
    y = jax.random.randint(k_y, (batch_size,), 0, workload.num_classes, jnp.int32)
    tx, model = optimizer(), workload.model()
    params, state = init_library(model, k_init, dtype)
    prepared = []
    for name, ops in ablation_opsets().items():
        carry = jax.device_put((params, state, tx.init(params)))
        compiled, seconds = _compile(library_step(model, ops, tx), carry, (x, y))
        memory = compiled.memory_analysis()
        temp = None if memory is None else int(memory.temp_size_in_bytes)
        prepared.append(Prepared(name, compiled, carry, (x, y), [seconds], temp, models.num_params(params)))
    return prepared


def prepare_step(
    workload: Workload, quick: bool, seed: int = 0, dtype=jnp.float32, compile_repeats: int = 1
) -> list[Prepared]:
    """Build, initialise and compile the three methods' steps on one random batch.

    All three start from the same weights, the library model's initial ones.
    Each method is compiled `compile_repeats` times, the methods taking turns,
    every time from a new step function (so no cache of JAX's serves a
    repeat); the last executable is the one timed.
    """
    batch_size, example_shape = workload.sizes(quick)
    k_x, k_y, k_init = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k_x, (batch_size, *example_shape), dtype)
    y = jax.random.randint(k_y, (batch_size,), 0, workload.num_classes, jnp.int32)
    tx = optimizer()
    model = workload.model()
    params, state = init_library(model, k_init, dtype)
    net = build_peer(workload, params, state, dtype)
    n_library, n_peer = models.num_params(params), peer_num_params(net)
    if n_peer != n_library:
        raise AssertionError(
            f"{workload.name}: the Flax peer has {n_peer:,} parameters, the library model {n_library:,}; they must be the same architecture"
        )
    graphdef, peer_carry = nnx.split((net, nnx.Optimizer(net, tx, wrt=nnx.Param)))

    library_carry = jax.jit(lambda params, state: (params, state, tx.init(params)))
    carries = {m: peer_carry if m == "flax" else library_carry(params, state) for m in METHODS}

    def new_step(method):
        return workload.peer_step(graphdef) if method == "flax" else workload.library_step(model, method, tx)

    compiled: dict = {}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(compile_repeats):
        for method in METHODS:
            compiled[method], seconds = _compile(new_step(method), carries[method], (x, y))
            times[method].append(seconds)
    prepared = []
    for method in METHODS:
        memory = compiled[method].memory_analysis()
        temp = None if memory is None else int(memory.temp_size_in_bytes)
        n = n_peer if method == "flax" else n_library
        prepared.append(Prepared(method, compiled[method], carries[method], (x, y), times[method], temp, n))
    return prepared


def time_interleaved(
    prepared: Sequence[Prepared],
    rounds: int,
    min_round_s: float,
    budget_s: float = math.inf,
    warmup: int = 2,
    equal_time: bool = False,
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per step of each method in every round, rounds interleaved; and each method's steps per round.

    After `warmup` steps each, every round runs each method for the same
    number of steps (chosen so the slowest takes about `min_round_s`), or with
    `equal_time` for about `min_round_s` each (each its own number of steps,
    a method faster than that timed once more over a round's worth of steps to count them:
    where one method is a thousand times slower than another, the same number
    of steps would time the fast one for a few milliseconds per round), the
    method that goes first rotating from round to round. Rounds stop at
    `rounds`, or once `budget_s` has passed and at least 5 are done.

    Returns:
      ({method: [mean seconds per step in round r, for each round]}, {method: steps per round})
    """
    for _ in range(max(warmup, 1)):
        single = [p.run(1) for p in prepared]
    count = lambda seconds: max(1, min(10_000, math.ceil(min_round_s / max(seconds, 1e-9))))
    if equal_time:
        # One step after one warmup is a poor measure of a fast method (a first call's costs, a
        # scheduler's pause): those get their count from a round's worth of steps.
        single = [p.run(count(s)) if count(s) > 1 else s for p, s in zip(prepared, single)]
    slowest = count(max(single))
    steps = {p.method: count(s) if equal_time else slowest for p, s in zip(prepared, single)}
    times: dict[str, list[float]] = {p.method: [] for p in prepared}
    start = time.perf_counter()
    for r in range(rounds):
        shift = r % len(prepared)
        for p in [*prepared[shift:], *prepared[:shift]]:
            times[p.method].append(p.run(steps[p.method]))
        if r + 1 >= min(5, rounds) and time.perf_counter() - start > budget_s:
            break
    return times, steps


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(min, median, max) of `values`."""
    return min(values), statistics.median(values), max(values)


def spread_fields(name: str, values: Sequence[float], scale: float = 1.0) -> dict:
    """Row fields `name` (the median), `name_min` and `name_max` of `values`, each times `scale`."""
    low, median, high = spread(values)
    return {name: median * scale, f"{name}_min": low * scale, f"{name}_max": high * scale}


def _round_fields(times: Sequence[float], steps: int, batch_size: int, example_shape, num_params: int) -> dict:
    """The row fields every timed method shares: sizes and the rounds' step times."""
    return {
        "batch_size": batch_size,
        "example_shape": list(example_shape),
        "num_params": num_params,
        "rounds": len(times),
        "steps_per_round": steps,
        "round_step_times_ms": [t * 1e3 for t in times],
    }


def environment(quick: bool) -> dict:
    """Where and when the numbers were taken (`jax_resnet.environment.record`, and `quick`); stored with every row."""
    return {**environment_record(), "quick": quick}


def bench_workload(
    workload: Workload,
    *,
    quick: bool,
    rounds: int,
    min_round_s: float,
    budget_s: float,
    env: dict,
    compile_repeats: int = 1,
    log: Callable[[str], None] = lambda s: None,
    ablate: bool = False,
) -> list[dict]:
    """Rows (one per method, or with `ablate` one per `ablation_opsets` variant) for one
    workload; field names are a stable contract.

    Ratios are to the workload's baseline (`ratio_to_autodiff`; for a DP
    workload `ratio_to_non_private`, with `memory_ratio_to_non_private` and the
    DP step's `padded_rows`; for a curvature workload `ratio_to_train_step` and
    `memory_ratio_to_train_step`, with `num_classes` and `curvature_train`). A
    method that could not run here (`Prepared.unavailable`) has a row with the
    reason in `unavailable` and no figures."""
    prepared = prepare(workload, quick, compile_repeats=compile_repeats, log=log, ablate=ablate)
    timed = [p for p in prepared if p.unavailable is None]
    # A curvature workload's methods differ in cost by orders of magnitude (a training step
    # against per-example Jacobians), and its slowest take seconds to minutes per call on a CPU:
    # each method timed for about a round's time, and one untimed call after compiling, not two.
    curvature_kind = workload.kind == "curvature"
    per_round, steps = time_interleaved(
        timed, rounds, min_round_s, budget_s, warmup=1 if curvature_kind else 2, equal_time=curvature_kind
    )
    batch_size, example_shape = workload.sizes(quick)
    base = next(p for p in prepared if p.method == workload.baseline)
    rows = []
    for p in prepared:
        if p.unavailable is not None:
            rows.append(
                {
                    "workload": workload.name,
                    "method": p.method,
                    "unavailable": p.unavailable,
                    "batch_size": batch_size,
                    "example_shape": list(example_shape),
                    "environment": env,
                }
            )
            continue
        times = per_round[p.method]
        ratios = [t / b for t, b in zip(times, per_round[base.method])]
        row = {
            "workload": workload.name,
            "method": p.method,
            **spread_fields("step_time_ms", times, 1e3),
            **spread_fields(f"ratio_to_{base.method}", ratios),
            **spread_fields("compile_time_s", p.compile_times_s),
            "temp_memory_bytes": p.temp_memory_bytes,
            "examples_per_second": batch_size / statistics.median(times),
            **_round_fields(times, steps[p.method], batch_size, example_shape, p.num_params),
            "compile_times_s": list(p.compile_times_s),
            "environment": env,
        }
        if workload.kind != "step":
            mine, theirs = p.temp_memory_bytes, base.temp_memory_bytes
            row[f"memory_ratio_to_{base.method}"] = mine / theirs if mine and theirs else None
        if workload.dp:
            row["padded_rows"] = len(p.batch[0]) - batch_size
        if workload.kind == "curvature":
            row["num_classes"] = workload.num_classes
            row["curvature_train"] = workload.curvature_train
        rows.append(row)
    return rows


# -------------------------------------------------------------------- reports
# (label, field, the method rules is compared with, the largest ratio that meets the goal)
GOALS = (
    ("step time ≤ 0.9× autodiff", "step_time_ms", "autodiff", 0.9),
    ("compiled memory ≤ 0.75× autodiff", "temp_memory_bytes", "autodiff", 0.75),
    ("step time ≤ 1.0× Flax peer", "step_time_ms", "flax", 1.0),
    ("compile time ≤ 1.2× autodiff", "compile_time_s", "autodiff", 1.2),
)
# Where a measured field's samples are: one per round (step time), one per compilation.
SAMPLES = {"step_time_ms": "round_step_times_ms", "compile_time_s": "compile_times_s"}
# How far the per-round rules/autodiff ratio may stray from its median (half its range)
# before the report calls the measurement too noisy to carry a goal.
SPREAD_TARGET = 0.03


def _samples(row: dict, field: str) -> list | None:
    if row[field] is None:
        return None
    return row[SAMPLES[field]] if field in SAMPLES else [row[field]]


def judge(a: list | None, b: list | None, limit: float, scale: float = 1.0):
    """(low, median, high, verdict) of the ratios a_k / (scale·b_k), sample by sample: "met" when
    the whole range is within `limit`, "missed" when none of it is, "within noise" otherwise, "n/a"
    (and Nones) when either side was not measured."""
    ratios = None if a is None or b is None else [u / (scale * v) for u, v in zip(a, b) if v]
    if not ratios:
        return None, None, None, "n/a"
    low, ratio, high = spread(ratios)
    return low, ratio, high, "met" if high <= limit else "missed" if low > limit else "within noise"


def goals(rows: list[dict]) -> list[dict]:
    """Per workload and goal: rules' value, the other's, and the ratio rules / other.

    The ratio is taken per sample (per round for step time, per compilation
    for compile time; memory is exact): `ratio` is the median, `ratio_min`
    and `ratio_max` the range. `verdict` is "met" when the whole range meets
    the goal, "missed" when none of it does, and "within noise" otherwise;
    `met` is True, False or None (within noise, or not measured). A report,
    not an assertion.
    """
    out = []
    for name in dict.fromkeys(r["workload"] for r in rows):
        by_method = {r["method"]: r for r in rows if r["workload"] == name}
        for label, field, against, limit in GOALS:
            low, ratio, high, verdict = judge(
                _samples(by_method["rules"], field), _samples(by_method[against], field), limit
            )
            out.append(
                {
                    "workload": name,
                    "goal": label,
                    "field": field,
                    "limit": limit,
                    "rules": by_method["rules"][field],
                    "other": by_method[against][field],
                    "ratio": ratio,
                    "ratio_min": low,
                    "ratio_max": high,
                    "verdict": verdict,
                    "met": {"met": True, "missed": False}.get(verdict),
                }
            )
    return out


def ratio_spread(row: dict) -> float:
    """Half the range of a row's per-round ratio to autodiff, relative to its median (0.03: ±3%)."""
    return (row["ratio_to_autodiff_max"] - row["ratio_to_autodiff_min"]) / (2 * row["ratio_to_autodiff"])


def _ms(t: float) -> str:
    return f"{t:.1f}" if t >= 10 else f"{t:.3f}"


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def _range(low: float, mid: float, high: float, fmt: Callable[[float], str]) -> str:
    return fmt(mid) if low == high else f"{fmt(mid)} ({fmt(low)}–{fmt(high)})"


def _verdict(g) -> str:
    if g["verdict"] == "n/a":
        return "n/a"
    detail = f"{g['ratio']:.3f}×"
    if g["ratio_min"] != g["ratio_max"]:
        detail += f", range {g['ratio_min']:.3f}–{g['ratio_max']:.3f}×"
    if g["field"] == "temp_memory_bytes":
        # A ratio of 1.000× can hide a few bytes of buffer packing, or megabytes: say which.
        diff = g["rules"] - g["other"]
        detail += f", {'+' if diff >= 0 else '−'}{_bytes(abs(diff))}"
    return f"{g['verdict']} ({detail})"


def _bytes(n: int) -> str:
    return f"{n} B" if n < 2**10 else f"{n / 2**10:.1f} KiB" if n < 2**20 else f"{n / 2**20:.1f} MiB"


def _env_line(env: dict) -> str:
    return (
        f"{env['device']} ({env['platform']}), {env['cpu_count']} CPU cores, jax {env['jax']}, "
        f"flax {env['flax']}, optax {env['optax']}, {env['date']}"
        + (" — quick mode, not meaningful" if env["quick"] else "")
    )


def _spread_lines(rows: list[dict]) -> list[str]:
    """One line per workload: how much the rules/autodiff ratio moved between rounds."""
    lines = []
    for r in rows:
        if r["method"] != "rules":
            continue
        s = ratio_spread(r)
        verdict = (
            "within the target"
            if s <= SPREAD_TARGET
            else "wider than the target: the machine was busy or the rounds short (more --round-seconds)"
        )
        lines.append(
            f"{r['workload']}: rules/autodiff {r['ratio_to_autodiff_min']:.3f}–{r['ratio_to_autodiff_max']:.3f}× "
            f"over {r['rounds']} rounds of {r['steps_per_round']} step(s), ±{s:.1%} "
            f"(target ±{SPREAD_TARGET:.0%}): {verdict}"
        )
    return lines


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'workload':<14} {'method':<9} {'step ms':>10} {'min':>10} {'max':>10} {'x autodiff':>10} "
        f"{'min':>6} {'max':>6} {'compile s':>9} {'temp MiB':>9} {'examples/s':>11} {'params':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['workload']:<14} {r['method']:<9} {_ms(r['step_time_ms']):>10} {_ms(r['step_time_ms_min']):>10} "
            f"{_ms(r['step_time_ms_max']):>10} {r['ratio_to_autodiff']:>10.3f} {r['ratio_to_autodiff_min']:>6.3f} "
            f"{r['ratio_to_autodiff_max']:>6.3f} {r['compile_time_s']:>9.2f} {_mib(r['temp_memory_bytes']):>9} "
            f"{r['examples_per_second']:>11.0f} {r['num_params']:>11,}"
        )
    lines += ["", "spread of the per-round ratio:"] + [f"  {line}" for line in _spread_lines(rows)]
    lines.append("")
    lines.append("goals for grad='rules' (reported, not asserted; 'within noise': the range straddles the goal):")
    for g in goals(rows):
        lines.append(f"  {g['workload']:<14} {g['goal']:<34} {_verdict(g)}")
    if rows:
        lines.append("")
        lines.append("environment: " + _env_line(rows[0]["environment"]))
    return "\n".join(lines)


def format_markdown(rows: list[dict]) -> str:
    lines = [
        "### Benchmark: hand-derived rules vs JAX autodiff vs a Flax peer",
        "",
        "One training step (forward, backward, SGD-momentum update), jitted, parameters and "
        "optimizer state donated. The methods take turns in rounds; a step time is the median over rounds "
        "(min–max in brackets) of the mean step time within a round, and a ratio is taken within each round, "
        "then summarised the same way. `rules`: the library "
        "with hand-derived VJPs; `autodiff`: the library's reference ops differentiated by JAX; "
        "`flax`: the same network built from `flax.nnx` layers and trained with `nnx.Optimizer`. "
        "Memory is XLA's compiled temporary buffer size (`memory_analysis().temp_size_in_bytes`). "
        "Command: `jax-resnet bench --markdown FILE`.",
        "",
    ]
    if rows:
        lines += [f"Measured on {_env_line(rows[0]['environment'])}.", ""]
    lines += [
        "| workload | batch | method | step (ms) | × autodiff | compile (s) | temp memory (MiB) | examples/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        step = _range(r["step_time_ms_min"], r["step_time_ms"], r["step_time_ms_max"], _ms)
        ratio = _range(r["ratio_to_autodiff_min"], r["ratio_to_autodiff"], r["ratio_to_autodiff_max"], "{:.3f}".format)
        compile_s = _range(r["compile_time_s_min"], r["compile_time_s"], r["compile_time_s_max"], "{:.2f}".format)
        lines.append(
            f"| {r['workload']} | {r['batch_size']} | {r['method']} | {step} | {ratio} | "
            f"{compile_s} | {_mib(r['temp_memory_bytes'])} | {r['examples_per_second']:.0f} |"
        )
    lines += ["", "Spread of the per-round rules/autodiff ratio:", ""]
    lines += [f"- {line}" for line in _spread_lines(rows)]
    lines += [
        "",
        "#### Goals",
        "",
        'For `grad="rules"`, reported rather than asserted: the ratio rules / other per round (median, '
        "and range in brackets); **met** or **missed** only when the whole range lies on one side of the "
        "goal, **within noise** otherwise.",
        "",
    ]
    lines += ["| workload | " + " | ".join(label for label, *_ in GOALS) + " |", "|---|" + "---|" * len(GOALS)]
    table: dict[str, list[str]] = {}
    for g in goals(rows):
        table.setdefault(g["workload"], []).append(_verdict(g))
    for name, verdicts in table.items():
        lines.append(f"| {name} | " + " | ".join(verdicts) + " |")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------- the run
ROUNDS = 20  # per workload, in a full run; 3 with `quick`
ROUND_SECONDS = 1.0  # the least time each method runs per round; 0.01 with `quick`
COMPILE_REPEATS = 3  # compilations per method, in a full run; 1 with `quick`


def benchmark(
    names: Sequence[str] | None = None,
    *,
    dp: bool = False,
    curvature: bool = False,
    ablate: bool = False,
    quick: bool = False,
    rounds: int | None = None,
    round_seconds: float | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> list[dict]:
    """Rows of the named workloads (default: all of the kind), one per workload and method:
    `jax-resnet bench`, with `dp` the DP-SGD workloads (`jax-resnet bench --dp`), with
    `curvature` the curvature workloads (`jax-resnet bench --curvature`).

    `rounds` defaults to `ROUNDS` (3 when `quick`), `round_seconds` to
    `ROUND_SECONDS` (0.01 when `quick`); a workload stops timing after at
    least 5 rounds once it has timed for 150 s (5 s when `quick`). A DP or
    curvature workload compiles each method once. `ablate`: instead of the
    methods, the rules with one family at a time swapped for autodiff
    (`ablation_opsets`), on the named workloads (default: resnet20).
    """
    if dp and curvature:
        raise ValueError("--dp and --curvature select different workloads; choose one")
    if ablate:
        if dp or curvature:
            flag = "--dp" if dp else "--curvature"
            raise ValueError(f"--ablate swaps rule families in the training step; it does not combine with {flag}")
        names = names or ["resnet20"]
    kind = "dp" if dp else "curvature" if curvature else "step"
    selected = [get_workload(n) for n in names] if names else [w for w in WORKLOADS if w.kind == kind]
    wrong = next((w for w in selected if w.kind != kind), None)
    if wrong is not None:
        have, want = KINDS[wrong.kind].flag, KINDS[kind].flag
        fix = " and ".join([f"drop {want}"] * (want is not None) + [f"add {have}"] * (have is not None))
        raise ValueError(f"--workload {wrong.name}: a {KINDS[wrong.kind].noun} workload; {fix}, or choose another")
    rounds = rounds if rounds is not None else (3 if quick else ROUNDS)
    min_round_s = round_seconds if round_seconds is not None else (0.01 if quick else ROUND_SECONDS)
    # Bounds a workload's timing when steps are slow (a loaded machine), so the full run stays within minutes.
    budget_s = 5.0 if quick else 150.0
    env = environment(quick)
    rows = []
    for workload in selected:
        log(f"bench: {workload.name} — {workload.description}")
        rows += bench_workload(
            workload,
            quick=quick,
            rounds=rounds,
            min_round_s=min_round_s,
            budget_s=budget_s,
            env=env,
            compile_repeats=1 if quick or workload.kind != "step" or ablate else COMPILE_REPEATS,
            log=log,
            ablate=ablate,
        )
    return rows


# ------------------------------------------------------------ DP-SGD workloads
# `jax-resnet bench --dp`: one DP-SGD step against the non-private step, and
# against DP-SGD the way JAX code usually gets it (jax_privacy, optax): per-example
# gradients from `jax.vmap(jax.grad)` (here of the library's own rules, so the
# comparison is of the method, not of the rules), clipped and noised by
# `optax.contrib.differentially_private_aggregate`; and jax_privacy's `clipped_grad`
# (its per-example gradients by `jax.vmap` too; the optional extra `peers`, skipped
# with the reason logged where it is not installed), noised and averaged as the DP
# step does. Same optimizer, batch and clip. The DP step runs as `jax-resnet train`
# runs it under Poisson sampling: the expected batch of real rows, padded to
# `dp.physical_batch_size` rows labelled `dp.PAD_LABEL`; the others see the b rows alone.
DP_METHODS = ("non_private", "dp", "vmap_clip", "jax_privacy")
DP_CLIP, DP_NOISE = 1.0, 1.0


def dp_config(batch: int) -> dp_lib.DPConfig:
    """The benchmark's DP settings (C = 1, σ = 1) for an expected batch of `batch`."""
    return dp_lib.DPConfig(l2_norm_clip=DP_CLIP, noise_multiplier=DP_NOISE, expected_batch_size=batch)


def dp_method_step(
    method: str, model: models.Model, tx: optax.GradientTransformation, config: dp_lib.DPConfig
) -> Callable:
    """step(carry, x, y, key) -> (carry, loss) of one DP_METHODS entry; carry = (params, state, opt_state)."""
    if method == "non_private":
        plain = library_step(model, "rules", tx)
        return lambda carry, x, y, key: plain(carry, x, y)
    if method == "dp":
        update = dp_lib.update_fn(model, tx, config, chunk=None)

        def dp(carry, x, y, key):
            params, state, opt_state = carry
            params, opt_state, out = update(params, state, opt_state, x, y, key)
            return (params, state, opt_state), out.loss

        return dp
    loss = step_lib.loss_fn(model, "rules")
    if method == "jax_privacy":
        from jax_privacy import clipping

        clip, noise = config.l2_norm_clip, config.noise_multiplier
        # Each example is handed to the loss as a batch of one (keep_batch_dim), so
        # its mean loss is that example's loss.
        clipped_sum = clipping.clipped_grad(
            lambda p, s, x, y: loss(p, s, x, y)[0], l2_clip_norm=clip, batch_argnums=(2, 3)
        )

        def jax_privacy(carry, x, y, key):
            params, state, opt_state = carry
            noise_key = jax.random.fold_in(key, dp_lib.NOISE_STREAM)
            grads = dp_lib.noisy_mean(clipped_sum(params, state, x, y), noise_key, clip, noise, x.shape[0])
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), state, opt_state), jnp.zeros(())

        return jax_privacy

    def vmap_clip(carry, x, y, key):
        params, state, opt_state = carry
        one = lambda xi, yi: jax.grad(lambda p: loss(p, state, xi[None], yi[None])[0])(params)
        per_example_grads = jax.vmap(one)(x, y)
        updates, opt_state = tx.update(per_example_grads, opt_state, params)
        return (optax.apply_updates(params, updates), state, opt_state), jnp.zeros(())

    return vmap_clip


def _dp_tx(method: str, tx: optax.GradientTransformation, key) -> optax.GradientTransformation:
    if method != "vmap_clip":
        return tx
    return optax.chain(optax.contrib.differentially_private_aggregate(DP_CLIP, DP_NOISE, key=key), tx)


def dp_methods(log: Callable[[str], None] = lambda s: None) -> tuple[str, ...]:
    """The DP_METHODS that can run here: "jax_privacy" only where a 2.x release imports (the reason logged if not)."""
    try:
        import jax_privacy
    except ImportError as e:
        reason = str(e)
    else:
        if jax_privacy.__version__.split(".")[0] == "2":
            return DP_METHODS
        # jax_privacy 1.0 has no jax_privacy.clipping (bench imports it mid-run): say so up front instead.
        reason = f"jax-privacy {jax_privacy.__version__} is installed; the peer needs jax-privacy>=2.0,<3"
    log(f"bench --dp: skipping jax_privacy ({reason}; pip install 'jax-resnet[peers]')")
    return tuple(m for m in DP_METHODS if m != "jax_privacy")


def prepare_dp(
    workload: Workload, quick: bool, seed: int = 0, compile_repeats: int = 1, log: Callable[[str], None] = print
) -> list[Prepared]:
    """The DP workload's methods (`dp_methods`), compiled on one random batch of b real rows;
    the DP step's batch is padded to `dp.physical_batch_size` rows as a Poisson run pads it,
    so the padding's cost is in its time. Every method starts from the same weights."""
    batch_size, example_shape = workload.sizes(quick)
    config = dp_config(batch_size)
    k_x, k_y, k_init, k_noise = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k_x, (batch_size, *example_shape), jnp.float32)
    y = jax.random.randint(k_y, (batch_size,), 0, workload.num_classes, jnp.int32)
    padding = dp_lib.physical_batch_size(config) - batch_size
    x_padded = jnp.concatenate([x, jnp.zeros((padding, *example_shape), x.dtype)])
    y_padded = jnp.concatenate([y, jnp.full((padding,), dp_lib.PAD_LABEL, y.dtype)])
    model = workload.model()
    params, state = init_library(model, k_init)
    prepared = []
    for method in dp_methods(log):
        tx = _dp_tx(method, optimizer(), jax.random.key(1))  # its own key: the carry is donated
        carry = jax.device_put((params, state, tx.init(params)))
        batch = (x_padded, y_padded, k_noise) if method == "dp" else (x, y, k_noise)
        times = []
        for _ in range(compile_repeats):
            compiled, seconds = _compile(dp_method_step(method, model, tx, config), carry, batch)
            times.append(seconds)
        memory = compiled.memory_analysis()
        temp = None if memory is None else int(memory.temp_size_in_bytes)
        prepared.append(Prepared(method, compiled, carry, batch, times, temp, models.num_params(params)))
    return prepared


def format_ablation_table(rows: list[dict]) -> str:
    """A Markdown table of `bench --ablate` rows: each variant's step time and memory against autodiff's."""
    lines = []
    for name in dict.fromkeys(r["workload"] for r in rows):
        group = [r for r in rows if r["workload"] == name]
        base = next(r for r in group if r["method"] == "autodiff")["temp_memory_bytes"]
        lines += [
            f"{name}, batch {group[0]['batch_size']}: {_env_line(group[0]['environment'])}",
            "",
            "| OpSet | step (ms) | × autodiff (range) | temp memory (MiB) | × autodiff |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in group:
            ratio = _range(
                r["ratio_to_autodiff_min"], r["ratio_to_autodiff"], r["ratio_to_autodiff_max"], "{:.3f}".format
            )
            memory = "–" if not (base and r["temp_memory_bytes"]) else f"{r['temp_memory_bytes'] / base:.3f}"
            lines.append(
                f"| {r['method']} | {_ms(r['step_time_ms'])} | {ratio} | {_mib(r['temp_memory_bytes'])} | {memory} |"
            )
        lines.append("")
    return "\n".join(lines)


# (label, the largest ratio that meets it): the DP step against the non-private step.
DP_GOALS = (("time ≤ 1.3× non-private", "ratio_to_non_private", 1.3), ("memory ≤ 1.2× non-private", None, 1.2))


def dp_goals(rows: list[dict]) -> list[dict]:
    """Per DP workload: the DP step's time and memory against DP_GOALS, and against each vmap peer
    (faster when the DP step's slowest round ratio is below the peer's fastest); verdicts as `goals`."""
    out = []
    for name in dict.fromkeys(r["workload"] for r in rows):
        by_method = {r["method"]: r for r in rows if r["workload"] == name}
        dp = by_method["dp"]
        for label, field, limit in DP_GOALS:
            if field is None:
                low = high = dp["memory_ratio_to_non_private"]
            else:
                low, high = dp[f"{field}_min"], dp[f"{field}_max"]
            verdict = "n/a" if low is None else "met" if high <= limit else "missed" if low > limit else "within noise"
            out.append({"workload": name, "goal": label, "low": low, "high": high, "verdict": verdict})
        for peer in ("vmap_clip", "jax_privacy"):
            if peer not in by_method:
                continue
            p = by_method[peer]
            verdict = (
                "met"
                if dp["ratio_to_non_private_max"] < p["ratio_to_non_private_min"]
                else "missed"
                if dp["ratio_to_non_private_min"] > p["ratio_to_non_private_max"]
                else "within noise"
            )
            out.append(
                {
                    "workload": name,
                    "goal": f"faster than {peer} (whole range below)",
                    "low": dp["ratio_to_non_private_min"],
                    "high": dp["ratio_to_non_private_max"],
                    "verdict": verdict,
                }
            )
    return out


def format_dp_markdown(rows: list[dict]) -> str:
    """The DP table (`format_dp_table`) and its goals (`dp_goals`), for the README."""
    lines = ["### Benchmark: the DP-SGD step", ""]
    if rows:
        lines += [f"Measured on {_env_line(rows[0]['environment'])}. Command: `jax-resnet bench --dp`.", ""]
    lines.append(format_dp_table(rows))
    lines += ["| workload | goal | DP step (range) | verdict |", "|---|---|---|---|"]
    for g in dp_goals(rows):
        span = "n/a" if g["low"] is None else f"{g['low']:.2f}–{g['high']:.2f}×"
        lines.append(f"| {g['workload']} | {g['goal']} | {span} | {g['verdict']} |")
    return "\n".join(lines) + "\n"


def format_dp_table(rows: list[dict]) -> str:
    """A Markdown table of DP workload rows: time, its ratio (range) and memory against the non-private step."""
    lines = [
        "| workload | method | step time (ms) | × non-private (range) | compiled memory (MiB) | × non-private |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = _range(
            r["ratio_to_non_private_min"], r["ratio_to_non_private"], r["ratio_to_non_private_max"], "{:.2f}".format
        )
        mem = r["memory_ratio_to_non_private"]
        lines.append(
            f"| {r['workload']} | {r['method']} | {_ms(r['step_time_ms'])} | {ratio} | "
            f"{_mib(r['temp_memory_bytes'])} | {'–' if mem is None else f'{mem:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


# -------------------------------------------------------- curvature workloads
# `jax-resnet bench --curvature`: the library's curvature (`jax_resnet.curvature`) against
# what it should cost, a training step or a backward pass, and against what a JAX user
# has today, side by side in one process:
#
#   train_step       the library's training step (`grad="rules"`, BatchNorm in training
#                    mode): the baseline of every ratio;
#   backward         one backward pass of the batch, logits to parameters (`jax.vjp`'s
#                    pullback of the rules' network, its residuals saved beforehand and
#                    passed in, so no forward is timed), at the loss's cotangent;
#   diag_ggn_mc      `curvature.diag_ggn_mc`, one sample;
#   diag_ggn         `curvature.diag_ggn`, exact: one forward, C backward passes vmapped;
#   kfac             `curvature.kfac`, one sample (MC), where this version has it;
#   jacrev_diag_ggn  the exact diagonal the way JAX offers it: per-example Jacobians of
#                    the logits by `jax.vmap(jax.jacrev)` of the autodiff network, then
#                    diag(J_iᵀ H_i J_i) with H_i from `jax.hessian` of optax's cross-entropy;
#   kfac_jax         kfac-jax's curvature estimator (`BlockDiagonalCurvature`, Kronecker
#                    factors for dense and conv layers, its defaults elsewhere) on the same
#                    network through the autodiff path, labels sampled from the model
#                    ("fisher_gradients", one sample): the optional extra `peers`. Where it
#                    is absent or cannot run, its row gives the reason instead of a number.
#
# The curvature methods take BatchNorm as the workload says (`curvature_train`; the
# diagonals refuse training mode, whose examples couple); the training step trains.
CURVATURE_METHODS = ("train_step", "backward", "diag_ggn_mc", "diag_ggn", "kfac", "jacrev_diag_ggn", "kfac_jax")


def curvature_methods(log: Callable[[str], None] = lambda s: None) -> tuple[str, ...]:
    """The CURVATURE_METHODS this version has: "kfac" only where `curvature.kfac` exists (the reason logged if not).
    "kfac_jax" is always listed; where it cannot run, `prepare_curvature` says why in its row."""
    if hasattr(curvature, "kfac"):
        return CURVATURE_METHODS
    log("bench --curvature: skipping kfac (jax_resnet.curvature has no kfac in this version)")
    return tuple(m for m in CURVATURE_METHODS if m != "kfac")


def jacrev_diag_ggn(model: models.Model, params, state, x, y, *, train: bool = True) -> Any:
    """diag G of the mean cross-entropy as a JAX user computes it today, from per-example Jacobians.

    diag G = (1/B) Σ_i diag(J_iᵀ H_i J_i) = (1/B) Σ_i Σ_{c,d} (H_i)_{cd} J_{i,c} ⊙ J_{i,d}, with
    J_i = ∂z_i/∂θ from `jax.jacrev` of one example's logits through the autodiff network
    (`grad="autodiff"`), `jax.vmap`ped over the batch, and H_i = ∇²_z ℓ(z_i, y_i) from
    `jax.hessian` of optax's softmax cross-entropy. Nothing of `jax_resnet.curvature`.
    Each example runs alone, so BatchNorm must be on its running statistics (`train=False`).

    Returns:
      A tree like `params`.
    """

    def logits(p, xi):
        return model.apply(p, state, xi[None], train=train, grad="autodiff")[0][0]

    def one(xi, yi):
        jac = jax.jacrev(logits)(params, xi)  # leaves [C, *shape]
        hess = jax.hessian(lambda z: optax.softmax_cross_entropy_with_integer_labels(z, yi))(logits(params, xi))
        return jax.tree.map(lambda j: jnp.einsum("c...,cd,d...->...", j, hess, j), jac)

    return jax.tree.map(lambda d: jnp.mean(d, axis=0), jax.vmap(one)(x, y))


def kfac_jax_estimator(model: models.Model, *, train: bool = True):
    """kfac-jax's `BlockDiagonalCurvature` over the autodiff network's mean cross-entropy,
    func(params, state, x, y), labels sampled from the model ("fisher_gradients")."""
    import kfac_jax

    def loss(params, state, x, y):
        logits = model.apply(params, state, x, train=train, grad="autodiff")[0]
        kfac_jax.register_softmax_cross_entropy_loss(logits, y)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return kfac_jax.BlockDiagonalCurvature(func=loss, default_estimation_mode="fisher_gradients", params_index=0)


def kfac_jax_step(estimator, batch_size: int) -> Callable:
    """step((params, state, estimator_state), x, y, key): the estimator's curvature of this batch
    alone (`update_curvature_matrix_estimate` with ema_old = 0, ema_new = 1)."""

    def step(carry, x, y, key):
        params, state, est = carry
        est = estimator.update_curvature_matrix_estimate(
            est,
            ema_old=0.0,
            ema_new=1.0,
            identity_weight=0.0,
            batch_size=batch_size,
            rng=key,
            func_args=(params, state, x, y),
        )
        return (params, state, est), jnp.zeros(())

    return step


def curvature_method_step(method: str, model: models.Model, train: bool, tx=None) -> Callable:
    """`step(carry, *batch) -> (carry, what the method computes)` of one CURVATURE_METHODS entry but
    "backward" and "kfac_jax" (`prepare_curvature` builds those); carry = (params, state) or, for
    "train_step", (params, state, opt_state) and `tx`. Batches: (x, y), or (x, y, key) for the sampled ones."""
    if method == "train_step":
        return library_step(model, "rules", tx)
    quantities: dict[str, Callable[..., Any]] = {
        "diag_ggn_mc": lambda p, s, x, y, key: curvature.diag_ggn_mc(model, p, s, x, y, key, 1, train=train),
        "diag_ggn": lambda p, s, x, y: curvature.diag_ggn(model, p, s, x, y, train=train),
        "kfac": lambda p, s, x, y, key: curvature.kfac(model, p, s, x, y, key, 1, train=train),
        "jacrev_diag_ggn": lambda p, s, x, y: jacrev_diag_ggn(model, p, s, x, y, train=train),
    }
    quantity = quantities[method]
    return lambda carry, *batch: (carry, quantity(*carry, *batch))


def backward_pass(model: models.Model, params, state, x, y, *, train: bool = True):
    """(pullback, ct_logits): the rules' network's `jax.vjp` pullback at the logits, its residuals
    saved (a pytree that `jax.jit` takes), and the mean cross-entropy's cotangent at the logits."""
    forward = lambda p: model.apply(p, state, x, train=train, grad="rules")[0]
    logits, pullback = jax.jit(lambda p: jax.vjp(forward, p))(params)
    return pullback, per_example.loss_cotangent(logits, y)[1]


def _backward_step(pullback, ct_logits):
    return pullback, pullback(ct_logits)[0]


def _unavailable_reason(package: str, err: BaseException) -> str:
    """The exception a peer raised, with the innermost frame of its own package."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f"/{package}/" in f.filename.replace("\\", "/")]
    where = ""
    if frames:
        f = frames[-1]
        where = f" at {package}{f.filename.replace(chr(92), '/').split(f'/{package}', 1)[1]}:{f.lineno} `{f.line}`"
    return f"{type(err).__name__}: {' '.join(str(err).split())}{where}"


def kfac_jax_failure(err: BaseException) -> str:
    """What kfac-jax raised, with the versions and the innermost frame of kfac_jax's own code."""
    import kfac_jax

    return f"kfac-jax {kfac_jax.__version__}, jax {jax.__version__}: {_unavailable_reason('kfac_jax', err)}"


def kfac_jax_unavailable() -> str | None:
    """Why kfac-jax cannot be imported here (None when it can)."""
    try:
        import kfac_jax  # noqa: F401
    except ImportError as e:
        return f"kfac-jax is not installed ({e}); pip install 'jax-resnet[peers]'"
    except Exception as e:  # noqa: BLE001 -- e.g. kfac-jax 0.0.8's dependencies under jax 0.8.1 (AttributeError)
        return f"kfac-jax cannot be imported under jax {jax.__version__}: {type(e).__name__}: {e}"
    return None


def prepare_curvature(
    workload: Workload, quick: bool, seed: int = 0, compile_repeats: int = 1, log: Callable[[str], None] = print
) -> list[Prepared]:
    """The curvature workload's methods (`curvature_methods`), compiled on one random batch; every
    method starts from the same weights. A kfac_jax that cannot run here is `unavailable`, with the reason."""
    batch_size, example_shape = workload.sizes(quick)
    k_x, k_y, k_init, k_sample = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k_x, (batch_size, *example_shape), jnp.float32)
    y = jax.random.randint(k_y, (batch_size,), 0, workload.num_classes, jnp.int32)
    model, tx, train = workload.model(), optimizer(), workload.curvature_train
    params, state = init_library(model, k_init)  # on the host: each method donates its own device copy
    n = models.num_params(params)

    def build(method):
        """(step, carry, batch) of one method, the carry on the device."""
        step, carry, batch = _build(method)
        return step, jax.device_put(carry), batch

    def _build(method):
        if method == "train_step":
            return curvature_method_step(method, model, train, tx), (params, state, tx.init(params)), (x, y)
        if method == "backward":
            pullback, ct = backward_pass(model, params, state, x, y, train=train)
            return _backward_step, pullback, (ct,)
        if method == "kfac_jax":
            estimator = kfac_jax_estimator(model, train=train)
            est = estimator.init(k_init, (params, state, x, y), None, None)
            return kfac_jax_step(estimator, batch_size), (params, state, est), (x, y, k_sample)
        batch = (x, y, k_sample) if method in ("diag_ggn_mc", "kfac") else (x, y)
        return curvature_method_step(method, model, train), (params, state), batch

    def compiled(method):
        step, carry, batch = build(method)
        times = []
        for _ in range(compile_repeats):
            executable, seconds = _compile(step, carry, batch)
            times.append(seconds)
        memory = executable.memory_analysis()
        temp = None if memory is None else int(memory.temp_size_in_bytes)
        return Prepared(method, executable, carry, batch, times, temp, n)

    prepared = []
    for method in curvature_methods(log):
        if method != "kfac_jax":
            prepared.append(compiled(method))
            continue
        unavailable = kfac_jax_unavailable()
        if unavailable is None:
            try:
                prepared.append(compiled(method))
                continue
            except Exception as e:  # the peer's failure is its row's content, not the run's end
                unavailable = kfac_jax_failure(e)
        log(f"bench --curvature: kfac_jax cannot run here: {unavailable}")
        prepared.append(Prepared(method, None, None, (), [], None, n, unavailable))
    return prepared


# (label, method, the method it is compared with, field, the largest ratio that meets it,
# whether that ratio is per class, i.e. against C × the other).
CURVATURE_GOALS = (
    ("diag_ggn_mc(1) time ≤ 1.5× training step", "diag_ggn_mc", "train_step", "step_time_ms", 1.5, False),
    ("diag_ggn_mc(1) memory ≤ 1.3× training step", "diag_ggn_mc", "train_step", "temp_memory_bytes", 1.3, False),
    ("diag_ggn time ≤ 1.2 × C × backward", "diag_ggn", "backward", "step_time_ms", 1.2, True),
    ("kfac(1) time ≤ 1.5× training step", "kfac", "train_step", "step_time_ms", 1.5, False),
    ("diag_ggn time ≤ jacrev_diag_ggn", "diag_ggn", "jacrev_diag_ggn", "step_time_ms", 1.0, False),
    ("diag_ggn memory ≤ jacrev_diag_ggn", "diag_ggn", "jacrev_diag_ggn", "temp_memory_bytes", 1.0, False),
    ("kfac(1) time ≤ kfac_jax", "kfac", "kfac_jax", "step_time_ms", 1.0, False),
    ("kfac(1) memory ≤ kfac_jax", "kfac", "kfac_jax", "temp_memory_bytes", 1.0, False),
)


def curvature_goals(rows: list[dict]) -> list[dict]:
    """Per curvature workload and CURVATURE_GOALS entry: the ratio method / other (over C × other for a
    per-class goal), per round for time and exact for memory; verdicts as `goals`. "n/a" with the reason
    where either method has no row here (kfac before this version has it) or could not run (kfac_jax)."""
    out = []
    for name in dict.fromkeys(r["workload"] for r in rows):
        by_method = {r["method"]: r for r in rows if r["workload"] == name}
        for label, method, against, field, limit, per_class in CURVATURE_GOALS:
            goal = {"workload": name, "goal": label, "method": method, "against": against, "field": field}
            missing = [m for m in (method, against) if m not in by_method]
            gone = [by_method[m] for m in (method, against) if m in by_method and "unavailable" in by_method[m]]
            if missing or gone:
                reason = f"no {missing[0]} in this version" if missing else f"{gone[0]['method']} cannot run here"
                out.append(
                    {**goal, "ratio": None, "ratio_min": None, "ratio_max": None, "verdict": "n/a"} | {"reason": reason}
                )
                continue
            scale = by_method[method]["num_classes"] if per_class else 1
            a, b = _samples(by_method[method], field), _samples(by_method[against], field)
            low, ratio, high, verdict = judge(a, b, limit, scale)
            out.append({**goal, "ratio": ratio, "ratio_min": low, "ratio_max": high, "verdict": verdict})
    return out


def format_curvature_table(rows: list[dict]) -> str:
    """A Markdown table of curvature rows: time, its ratio (range) and memory against the training step."""
    lines = [
        "| workload | method | time (ms) | × training step (range) | compiled memory (MiB) | × training step |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "unavailable" in r:
            lines.append(f"| {r['workload']} | {r['method']} | cannot run here: {r['unavailable']} | | | |")
            continue
        ratio = _range(
            r["ratio_to_train_step_min"], r["ratio_to_train_step"], r["ratio_to_train_step_max"], "{:.2f}".format
        )
        mem = r["memory_ratio_to_train_step"]
        lines.append(
            f"| {r['workload']} | {r['method']} | {_ms(r['step_time_ms'])} | {ratio} | "
            f"{_mib(r['temp_memory_bytes'])} | {'–' if mem is None else f'{mem:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


def format_curvature_markdown(rows: list[dict]) -> str:
    """The curvature table (`format_curvature_table`) and its goals (`curvature_goals`), for the README."""
    lines = ["### Benchmark: curvature", ""]
    if rows:
        modes = {
            r["workload"]: "training mode" if r["curvature_train"] else "running statistics"
            for r in rows
            if "curvature_train" in r
        }
        lines += [
            f"Measured on {_env_line(rows[0]['environment'])}. Command: `jax-resnet bench --curvature`. "
            "Batch "
            + ", ".join(sorted({str(r["batch_size"]) for r in rows}))
            + "; BatchNorm in the curvature quantities: "
            + ", ".join(f"{w} {m}" for w, m in modes.items())
            + " (the training step trains). `backward`: one backward pass of the rules' network, "
            "logits to parameters. Memory: XLA's compiled temporary buffers (`memory_analysis()`). "
            "A goal's ratio is taken per round (memory: exact), its median and range given; against "
            "C × backward for the per-class goal (C classes); **met** or **missed** only when the whole "
            "range lies on one side of the goal, **within noise** otherwise.",
            "",
        ]
    lines.append(format_curvature_table(rows))
    lines += ["| workload | goal | ratio (range) | verdict |", "|---|---|---|---|"]
    for g in curvature_goals(rows):
        if g["ratio"] is None:
            span = "n/a"
        else:
            span = _range(g["ratio_min"], g["ratio"], g["ratio_max"], "{:.3f}×".format)
        verdict = g["verdict"] + (f" ({g['reason']})" if "reason" in g else "")
        lines.append(f"| {g['workload']} | {g['goal']} | {span} | {verdict} |")
    return "\n".join(lines) + "\n"
