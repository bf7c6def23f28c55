"""Training: optax optimizers and schedules, evaluation, orbax checkpoints and
data parallelism over the local devices, around the hand-derived gradients.

The main job (no flags: ResNet-8 on scikit-learn's digits, hand-derived
gradients, checked against `jax.grad` before the first step):

    jax-resnet train
    python -m jax_resnet train --epochs 5 --out runs/try
    python -m jax_resnet train --out runs/try --resume      # continue after a crash
    python -m jax_resnet train --model resnet20 --dataset cifar10 --data-dir ~/data/cifar10 \\
        --optimizer momentum --lr 0.1 --schedule warmup-cosine --weight-decay 5e-4 --epochs 90

From Python (a notebook):

    >>> from jax_resnet import train
    >>> metrics = train.train(train.TrainConfig(epochs=2, out="runs/notebook"))  # doctest: +SKIP
    >>> metrics["test_accuracy"]  # doctest: +SKIP

What a run does, in order:

1. Loads the data set (`jax_resnet.data.load`; digits is split 75/25 by
   `seed`) and builds the model with the data's channels and classes (MLPs
   get H·W·C input features). Parameters are float32.
2. Gradient check: on the first batch, the full-model gradient with the
   hand-derived rules (`grad="rules"`) is compared with `jax.grad` of the
   reference ops (`grad="autodiff"`) in float32, array by array, as the
   norm-wise relative error max|g_rules − g_jax| / max|g_jax|. Past
   `grad_check_tol` the batch is checked again in float64 (see
   `check_gradients`: ReLU kinks); past it there too, the run refuses to train
   (`GradCheckError`, exit status 1) unless `skip_grad_check` (`--no-grad-check`).
3. Epochs of optax updates. The batch order of epoch e is a permutation seeded
   by (seed, e) (`data.batches`), so it depends on nothing else: a resumed run
   sees exactly the batches an uninterrupted one would. BatchNorm running
   statistics are `state`, updated once per step.
4. After each epoch: test loss and accuracy with the running statistics, one
   line in `metrics.jsonl`, and an orbax checkpoint. At the end:
   `metrics.json`, and `curves.png` (also when a run stops early).

Outputs under `out` (default `runs/<timestamp>`):

    metrics.jsonl   one JSON object per epoch
    metrics.json    the final summary (field names are a contract; see `train`)
    curves.png      loss and accuracy per epoch, train and test
    checkpoints/<step>/   params, BatchNorm state, optimizer state (orbax
                    StandardSave) and meta (epoch, step, seed, config; JSON)

Checkpoints are atomic: orbax writes each into `<step>.orbax-checkpoint-tmp-*`
and renames it only once complete, so a kill while saving leaves the previous
checkpoint intact; leftovers are removed when the next run opens the folder.
Only the newest `max_to_keep` (2) are kept. The loss and the parameters are
checked to be finite after every step: a run where either turns NaN/inf stops
with a `TrainingError` that names the step, and writes no checkpoint of them.

Mixed precision: with `dtype="bfloat16"` the parameters, optimizer state and
BatchNorm statistics stay float32; the loss function casts parameters and
inputs to bfloat16, runs the network in bfloat16, and computes the
cross-entropy on float32 logits, so gradients and updates are float32.

Many devices: the step is one `jax.jit` program over a `jax.sharding.Mesh` of
the devices (axis "data"). Each batch is split along its leading axis
(`NamedSharding(mesh, PartitionSpec("data"))`), parameters, BatchNorm state
and optimizer state are replicated, and XLA's SPMD partitioner inserts the
all-reduces. Because BatchNorm's mean and variance reduce over the sharded
batch axis, they are the statistics of the global batch, as on one device
(tests/test_train.py checks one sharded step against the single-device step
on 8 simulated CPU devices: equal to float32 rounding). The batch size must be divisible by the
number of devices. Try it on a CPU:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m jax_resnet train --devices 8

Several hosts (untested here; one process per host, as JAX's multi-process
guide describes): call `jax.distributed.initialize()` before anything else
touches JAX, then call `train(config)` in every process with the same config.
The mesh then spans every process's devices (`devices` must be None), each
process loads the same data, computes the same permutation and feeds its slice
of each global batch (`jax.make_array_from_process_local_data`); orbax
coordinates the checkpoint, and process 0 alone writes metrics and plots.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jax_resnet import data, models
from jax_resnet.gradcheck import relative_error
from jax_resnet.ops import opset

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup-cosine")
GRADS = ("rules", "autodiff")
DTYPES = ("float32", "bfloat16")
MOMENTUM = 0.9  # of --optimizer momentum (heavy ball, optax.sgd(momentum=0.9))
WARMUP_FRACTION = 0.05  # of the total steps, for --schedule warmup-cosine
EVAL_BATCH = 1024  # examples per evaluation batch, at most
# Settings a resumed run must share with its checkpoint: otherwise the result
# is not the continuation of that run. `epochs` may grow (train longer).
RESUME_MUST_MATCH = ("model", "dataset", "batch_size", "optimizer", "lr", "schedule", "weight_decay", "dtype", "seed")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss or parameters, failed gradient check)."""


class GradCheckError(TrainingError):
    """The hand-derived gradients disagree with `jax.grad` beyond the tolerance."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; the defaults are the main job.

    `jax-resnet train` with no flags: ResNet-8 (He et al.'s CIFAR ResNet with
    n = 1, widths 16/32/64) on digits, 15 epochs of Adam at lr 1e-2 with
    cosine decay, batch 64, hand-derived gradients, float32. Chosen by a
    sweep on digits: over seeds 0-4 (split, init and order) it ends at
    98.7-99.3% test accuracy, where `tiny` (widths 8/16/32) ends at 97.8-99.3%
    with the same settings.

    Fields (CLI flag in brackets):
      model: a preset of `jax_resnet.models` [--model].
      dataset: "digits", "mnist", "cifar10" or "synthetic" [--dataset].
      epochs: total epochs; a resumed run trains up to this many [--epochs].
      batch_size: examples per step, over all devices [--batch-size].
      optimizer: "sgd", "momentum" (0.9), "adam" or "adamw" [--optimizer].
      lr: peak learning rate [--lr].
      schedule: "constant", "cosine" (decay to 0 over the run) or
        "warmup-cosine" (linear warm-up over 5% of the steps, then cosine) [--schedule].
      weight_decay: on kernels only (arrays of rank ≥ 2), not on biases or
        BatchNorm scales; decoupled for adamw, added to the gradient (L2)
        otherwise [--weight-decay].
      grad: "rules" (hand-derived VJPs) or "autodiff" (jax.grad of the reference ops) [--grad].
      dtype: compute dtype, "float32" or "bfloat16"; parameters stay float32 [--dtype].
      seed: parameter init, digits split, synthetic draw and batch order [--seed].
      out: output folder; None means runs/<timestamp> [--out].
      resume: continue from the newest checkpoint under `out` (or, with no
        `out`, the newest run under runs/) [--resume].
      json: print the final metrics as JSON on stdout ("-"), or write them to this file [--json].
      data_dir, download: where MNIST/CIFAR-10 files are, and whether to fetch them [--data-dir, --download].
      devices: how many local devices to shard the batch over; None = all [--devices].
      grad_check_tol: largest accepted relative error of the gradient check [--grad-check-tol].
      skip_grad_check: train even without (or despite) the gradient check [--no-grad-check].
      progress: show a tqdm progress bar [--no-progress turns it off].
      max_to_keep: how many checkpoints to keep.
    """

    model: str = "resnet8"
    dataset: str = "digits"
    epochs: int = 15
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-2
    schedule: str = "cosine"
    weight_decay: float = 0.0
    grad: str = "rules"
    dtype: str = "float32"
    seed: int = 0
    out: str | None = None
    resume: bool = False
    json: str | None = None
    data_dir: str | None = None
    download: bool = False
    devices: int | None = None
    grad_check_tol: float = 1e-4
    skip_grad_check: bool = False
    progress: bool = True
    max_to_keep: int = 2

    def __post_init__(self):
        choices = {
            "model": tuple(models.PRESETS),
            "dataset": data.DATASETS,
            "optimizer": OPTIMIZERS,
            "schedule": SCHEDULES,
            "grad": GRADS,
            "dtype": DTYPES,
        }
        for field, valid in choices.items():
            if getattr(self, field) not in valid:
                raise ValueError(f"unknown {field} {getattr(self, field)!r}; choose one of: {', '.join(valid)}")
        positive_ints = ("epochs", "batch_size", "max_to_keep") + (() if self.devices is None else ("devices",))
        for field in positive_ints:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number ≥ 0, got {self.weight_decay!r}")
        if not self.grad_check_tol >= 0:
            raise ValueError(f"grad_check_tol must be ≥ 0, got {self.grad_check_tol!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")


# ------------------------------------------------------------------ optimizers
def make_schedule(name: str, lr: float, total_steps: int) -> float | optax.Schedule:
    """The learning rate: a constant, or an optax schedule over `total_steps`."""
    if name == "constant":
        return lr
    if name == "cosine":
        return optax.cosine_decay_schedule(lr, decay_steps=total_steps)
    if name == "warmup-cosine":
        warmup = max(1, int(WARMUP_FRACTION * total_steps))
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=warmup, decay_steps=total_steps)
    raise ValueError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")


def _kernels(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
    name: str, learning_rate: float | optax.Schedule, weight_decay: float = 0.0
) -> optax.GradientTransformation:
    """An optax optimizer by name; weight decay applies to kernels (rank ≥ 2) only.

    sgd: θ ← θ − η·g;  momentum: v ← 0.9·v + g, θ ← θ − η·v;  adam / adamw:
    optax.adam / optax.adamw. For sgd, momentum and adam, weight decay λ is
    L2 regularisation (g ← g + λθ before the update); adamw decouples it.
    """
    if name == "adamw":
        return optax.adamw(learning_rate, weight_decay=weight_decay, mask=_kernels)
    if name == "adam":
        base = optax.adam(learning_rate)
    elif name == "sgd":
        base = optax.sgd(learning_rate)
    elif name == "momentum":
        base = optax.sgd(learning_rate, momentum=MOMENTUM)
    else:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if weight_decay:
        return optax.chain(optax.add_decayed_weights(weight_decay, mask=_kernels), base)
    return base


# ------------------------------------------------------------ loss and steps
def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _loss_fn(model: models.Model, grad: str, dtype) -> Callable:
    """loss(params, state, x, y) -> (loss, (new_state, logits)), computing in `dtype`."""
    ops = opset(grad)
    compute = jnp.dtype(dtype)

    def loss(params, state, x, y):
        logits, new_state = model.apply(_cast(params, compute), state, x.astype(compute), train=True, grad=grad)
        # BatchNorm statistics keep the dtype they are stored in (float32).
        new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, state)
        # The cross-entropy in float32 at least, also when the network runs in bfloat16.
        logits = logits.astype(jnp.promote_types(compute, jnp.float32))
        return ops.softmax_cross_entropy(logits, y), (new_state, logits)

    return loss


def make_mesh(devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh (axis "data") over the first `devices` local devices, or over
    all devices (every process's, under `jax.distributed`) when None."""
    if devices is None:
        return jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    if jax.process_count() > 1:
        raise ValueError("devices: with several processes the mesh spans all devices; leave --devices unset")
    local = jax.local_devices()
    if devices > len(local):
        raise ValueError(
            f"devices: asked for {devices} but only {len(local)} local device(s) exist ({local[0].platform})"
        )
    return jax.sharding.Mesh(np.array(local[:devices]), ("data",))


def _shardings(mesh):
    P = jax.sharding.PartitionSpec
    return jax.sharding.NamedSharding(mesh, P()), jax.sharding.NamedSharding(mesh, P("data"))


def make_train_step(
    model: models.Model,
    optimizer: optax.GradientTransformation,
    grad: str = "rules",
    *,
    dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
) -> Callable:
    """One jitted optimizer step.

    step(params, state, opt_state, x, y) -> (params, state, opt_state, metrics),
    metrics = {"loss", "accuracy"} of the batch (before the update) and
    "params_finite" (no NaN/inf in the updated parameters). With a
    mesh, x and y are split over its "data" axis and everything else is
    replicated; the result equals the single-device step (global-batch
    BatchNorm statistics, all-reduced gradients).

    Example:
      >>> import jax, optax
      >>> from jax_resnet import data, models, train
      >>> ds = data.load("synthetic")
      >>> model = models.tiny(num_classes=ds.num_classes, in_channels=1)
      >>> params, state = model.init(jax.random.key(0))
      >>> opt = optax.adam(1e-2)
      >>> step = train.make_train_step(model, opt)
      >>> params, state, opt_state, m = step(params, state, opt.init(params), ds.x_train[:32], ds.y_train[:32])
      >>> float(m["loss"]) > 0
      True
    """
    loss_fn = _loss_fn(model, grad, dtype)

    def step(params, state, opt_state, x, y):
        (loss, (new_state, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))
        # A NaN need not show in the loss (this library's ReLU maps NaN to 0), so the parameters are checked too.
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
        return params, new_state, opt_state, {"loss": loss, "accuracy": accuracy, "params_finite": finite}

    if mesh is None:
        return jax.jit(step)
    replicated, batch = _shardings(mesh)
    return jax.jit(step, in_shardings=(replicated,) * 3 + (batch,) * 2, out_shardings=replicated)


@functools.lru_cache(maxsize=8)
def _optimizer(name, schedule, lr, total_steps, weight_decay) -> optax.GradientTransformation:
    # Cached, so that a run with the same settings gets the same (hashable)
    # object and `_compiled_step` need not compile again (tests, notebooks).
    return make_optimizer(name, make_schedule(schedule, lr, total_steps), weight_decay)


@functools.lru_cache(maxsize=8)
def _compiled_step(model, optimizer, grad, dtype, mesh, x_shape):
    replicated, batch = _shardings(mesh)
    params, state = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.float32))
    opt_state = jax.eval_shape(optimizer.init, params)
    place = lambda t, s: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), t)
    args = (place(params, replicated), place(state, replicated), place(opt_state, replicated))
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32, sharding=batch)
    y = jax.ShapeDtypeStruct(x_shape[:1], jnp.int32, sharding=batch)
    return make_train_step(model, optimizer, grad, dtype=dtype, mesh=mesh).lower(*args, x, y).compile()


@functools.lru_cache(maxsize=8)
def _eval_step(model: models.Model, dtype: str, mesh):
    compute = jnp.dtype(dtype)

    def step(params, state, x, y, weight):
        logits, _ = model.apply(_cast(params, compute), _cast(state, compute), x.astype(compute), train=False)
        logits = logits.astype(jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=-1)[:, 0]
        correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
        return jnp.sum(weight * nll), jnp.sum(weight * correct)

    if mesh is None:
        return jax.jit(step)
    replicated, batch = _shardings(mesh)
    return jax.jit(step, in_shardings=(replicated,) * 2 + (batch,) * 3, out_shardings=replicated)


def evaluate(
    model: models.Model,
    params,
    state,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = EVAL_BATCH,
    dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, float]:
    """Mean cross-entropy and accuracy over every example of (x, y), in
    inference mode (BatchNorm with its running statistics).

    The last batch is zero-padded to full size and the padding masked out, so
    one compiled program serves every batch; with a mesh, the batch size is
    rounded up to a multiple of the device count.

    Returns:
      {"loss": float, "accuracy": float}
    """
    n = len(x)
    if n == 0:
        raise ValueError("evaluate: no examples")
    ndev = 1 if mesh is None else mesh.size
    size = min(batch_size, n)
    size = -(-size // ndev) * ndev
    fn = _eval_step(model, dtype, mesh)
    total_loss = total_correct = 0.0
    for xb, yb in data.batches(x, y, size, key_or_seed=None, shuffle=False, drop_last=False):
        m = len(xb)
        weight = np.zeros(size, np.float32)
        weight[:m] = 1.0
        if m < size:
            xb = np.concatenate([xb, np.zeros((size - m, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros(size - m, yb.dtype)])
        batch = (
            (xb, yb, weight) if mesh is None else tuple(_put_batch(a, _shardings(mesh)[1]) for a in (xb, yb, weight))
        )
        loss_sum, correct = fn(params, state, *batch)
        total_loss += _host(loss_sum)
        total_correct += _host(correct)
    return {"loss": total_loss / n, "accuracy": total_correct / n}


def _put_batch(a: np.ndarray, sharding):
    if jax.process_count() == 1:
        return jax.device_put(a, sharding)
    per = len(a) // jax.process_count()
    i = jax.process_index()
    return jax.make_array_from_process_local_data(sharding, a[i * per : (i + 1) * per], a.shape)


def _host(x) -> float:
    """A replicated scalar as a Python float (reads the local copy, so it also works across processes)."""
    return float(np.asarray(x.addressable_data(0)))


def _run_once(jitted, *args):
    """Compile and run a program that runs once per run (initialisation, the
    gradient check). On the CPU, XLA's backend optimisations of these cost
    seconds (the threefry random bits most of all) and buy nothing."""
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    return jitted.lower(*args).compile(compiler_options=options)(*args)


def init_train_state(model: models.Model, optimizer: optax.GradientTransformation, seed: int = 0, mesh=None) -> dict:
    """{"params", "state", "opt_state"} from `model.init(jax.random.key(seed))`,
    float32, replicated over `mesh` when given.

    One program, compiled without XLA's backend optimisations on the CPU: the
    same values as calling `model.init` op by op (up to the last bit of a few
    entries) in a fraction of the time.
    """

    def init(key):
        params, state = model.init(key, jnp.float32)
        return {"params": params, "state": state, "opt_state": optimizer.init(params)}

    jitted = jax.jit(init) if mesh is None else jax.jit(init, out_shardings=_shardings(mesh)[0])
    return _run_once(jitted, jax.random.key(seed))


# -------------------------------------------------------------- grad check
@dataclasses.dataclass(frozen=True)
class GradCheck:
    """Result of `check_gradients`: the largest error, where, and in which dtype it was decided."""

    max_rel_err: float
    where: str  # path of the parameter array with the largest error
    dtype: str  # "float32", or "float64" when float32 disagreed and float64 was asked
    float32_rel_err: float

    def ok(self, tol: float) -> bool:
        return self.max_rel_err <= tol


def _grad_error(model: models.Model, params, state, x, y, dtype: str) -> tuple[float, str]:
    """(largest per-array error, its path) of rules vs autodiff gradients computed in `dtype`."""
    rules, autodiff = _loss_fn(model, "rules", dtype), _loss_fn(model, "autodiff", dtype)

    def both(params, state, x, y):
        params, state, x = _cast(params, dtype), _cast(state, dtype), x.astype(dtype)
        g_rules = jax.grad(lambda p: rules(p, state, x, y)[0])(params)
        g_autodiff = jax.grad(lambda p: autodiff(p, state, x, y)[0])(params)
        return g_rules, g_autodiff

    g_rules, g_autodiff = _run_once(jax.jit(both), params, state, x, y)
    worst, where = 0.0, ""
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(g_rules), jax.tree.leaves(g_autodiff)):
        err = relative_error(a, e)
        if not err <= worst:  # also catches NaN
            worst, where = err, jax.tree_util.keystr(path)
    return worst, where


def _x64():
    """A context in which float64 is on (JAX before `jax.enable_x64` had it in jax.experimental)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64

    return enable_x64()


def check_gradients(model: models.Model, params, state, x, y, *, tol: float = 1e-4) -> GradCheck:
    """Compare the hand-derived full-model gradient with `jax.grad` on one batch.

    Both are gradients of the training loss (BatchNorm with batch statistics)
    on (x, y), computed in float32. Each parameter array's error is
    norm-wise, max|g_rules − g_jax| / max|g_jax| (`gradcheck.relative_error`);
    the check reports the largest.

    Above `tol` in float32 the batch is checked again in float64 (except on
    TPUs), which then decides. Why: the rules' forward pass and the
    reference's round differently, so a ReLU input within float32 rounding
    of 0 can fall on different sides of the kink in the two passes, and that
    one unit moves whole gradient arrays (seen here on about 1 batch in 60
    for ResNet-8 on digits, at errors near 1e-2). In float64 such a flip is
    practically impossible, while a wrong rule stays wrong.

    Returns:
      A `GradCheck`.
    """
    err32, where = _grad_error(model, params, state, x, y, "float32")
    if err32 <= tol or jax.default_backend() == "tpu":
        return GradCheck(err32, where, "float32", err32)
    with _x64():
        err64, where = _grad_error(model, params, state, x, y, "float64")
    return GradCheck(err64, where, "float64", err32)


# ---------------------------------------------------------------- checkpoints
def _checkpoint_manager(directory: Path, max_to_keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        cleanup_tmp_directories=True,  # leftovers of a save that was killed
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(directory.absolute(), options=options)


def _save_checkpoint(manager, step: int, tree: dict, meta: dict) -> None:
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))


def _restore_meta(manager, step: int) -> dict:
    import orbax.checkpoint as ocp

    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def _restore_tree(manager, step: int, target: dict) -> dict:
    """The checkpointed arrays, in `target`'s structure, dtypes and shardings."""
    import orbax.checkpoint as ocp

    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))).state


def load_checkpoint(out: str | os.PathLike, step: int | None = None) -> tuple[dict, dict]:
    """Read a run's checkpoint (default: the newest) without training.

    Returns:
      (tree, meta): tree has "params", "state" and "opt_state" (optax states
      as nested containers, since no target structure is given); meta has
      "epoch", "step", "seed" and "config".
    """
    import orbax.checkpoint as ocp

    directory = Path(out) / "checkpoints"
    with ocp.CheckpointManager(directory.absolute(), options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {directory}")
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
        )
    return restored.state, restored.meta


# --------------------------------------------------------------------- outputs
def _plot(history: list[dict], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend, safe in notebooks

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4))
    for ax, key in zip(fig.subplots(1, 2), ("loss", "accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], marker="o", label="train")
        ax.plot(epochs, [h[f"test_{key}"] for h in history], marker="o", label="test")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _read_history(path: Path, up_to_epoch: int) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= up_to_epoch]


def _default_out() -> Path:
    base = Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out, i = base, 1
    while out.exists():
        out, i = base.with_name(f"{base.name}-{i}"), i + 1
    return out


def _find_resume_dir() -> Path:
    runs = sorted(p for p in Path("runs").glob("*") if (p / "checkpoints").is_dir()) if Path("runs").is_dir() else []
    if not runs:
        raise ValueError("resume: no run with checkpoints under runs/; pass --out DIR of the run to continue")
    return runs[-1]


def _build_model(name: str, ds: data.Dataset) -> models.Model:
    import inspect

    h, w, c = ds.image_shape
    accepts = inspect.signature(models.PRESETS[name]).parameters
    if "in_features" in accepts:
        return models.get(name, in_features=h * w * c, out_features=ds.num_classes)
    return models.get(name, num_classes=ds.num_classes, in_channels=c)


def _device_name(mesh) -> str:
    d = mesh.devices.flat[0]
    return f"{mesh.size} x {d.device_kind} ({d.platform})"


# ----------------------------------------------------------------------- train
class _Log:
    """Human-readable lines, through tqdm so they do not break a progress bar;
    on stderr when stdout carries the JSON, and from process 0 only."""

    def __init__(self, config: TrainConfig):
        self.stream = sys.stderr if config.json == "-" else sys.stdout
        self.on = jax.process_index() == 0

    def __call__(self, msg: str) -> None:
        if self.on:
            tqdm.write(msg, file=self.stream)


def train(config: TrainConfig = TrainConfig()) -> dict[str, Any]:
    """Run the training job `config` describes; return the final metrics.

    The returned dict is what `metrics.json` holds. Stable fields:
    test_accuracy, test_loss, train_loss, train_accuracy, epochs (completed,
    in total), steps, examples_per_second (training steps only: compiled
    ahead, evaluation and checkpoints not counted), grad_check_max_rel_err
    and grad_check_dtype (None when skipped), grad_check_tol, wall_time_s, compile_time_s, model,
    dataset, device, num_devices, jax_version, num_params, out,
    resumed_from_epoch, config.

    Raises:
      ValueError: bad settings or data (the message says which and how to fix it).
      GradCheckError: the gradient check failed and was not skipped.
      TrainingError: the loss or the parameters became non-finite.
    """
    start = time.perf_counter()
    log = _Log(config)
    if config.out is not None:
        out = Path(config.out)
    elif config.resume:
        out = _find_resume_dir()
    else:
        out = _default_out()

    ds = data.load(config.dataset, config.data_dir, download=config.download, seed=config.seed)
    n_train = len(ds.x_train)
    if config.batch_size > n_train:
        raise ValueError(
            f"batch_size {config.batch_size} exceeds the {n_train} training examples of {config.dataset}; "
            f"use --batch-size {n_train} or less"
        )
    mesh = make_mesh(config.devices)
    if config.batch_size % mesh.size:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by the {mesh.size} devices; use a multiple of "
            f"{mesh.size} (e.g. {max(1, config.batch_size // mesh.size) * mesh.size}) or set --devices"
        )
    batch_sharding = _shardings(mesh)[1]
    model = _build_model(config.model, ds)
    steps_per_epoch = data.num_batches(n_train, config.batch_size)
    learning_rate = make_schedule(config.schedule, config.lr, steps_per_epoch * config.epochs)
    optimizer = _optimizer(
        config.optimizer, config.schedule, config.lr, steps_per_epoch * config.epochs, config.weight_decay
    )
    tree = init_train_state(model, optimizer, config.seed, mesh)
    n_params = models.num_params(tree["params"])

    manager = _checkpoint_manager(out / "checkpoints", config.max_to_keep)
    try:
        start_epoch, resumed_from = 0, None
        latest = manager.latest_step()
        if latest is not None:
            if not config.resume:
                raise ValueError(
                    f"{out} already holds checkpoints; pass --resume to continue that run, or choose another --out"
                )
            meta = _restore_meta(manager, latest)
            saved = meta["config"]
            differ = [
                f"{k}={saved.get(k)!r} (now {getattr(config, k)!r})"
                for k in RESUME_MUST_MATCH
                if saved.get(k) != getattr(config, k)
            ]
            if differ:
                raise ValueError(
                    f"resume: {out} was trained with {', '.join(differ)}; pass the same settings, or a new --out"
                )
            tree = _restore_tree(manager, latest, tree)
            start_epoch = resumed_from = meta["epoch"]
            log(f"resuming {out} from epoch {start_epoch} (step {latest})")
            if saved["epochs"] != config.epochs and config.schedule != "constant":
                log(
                    f"note: --epochs is now {config.epochs} (was {saved['epochs']}); the {config.schedule} schedule stretches"
                )
        elif config.resume:
            log(f"resume: no checkpoint under {out / 'checkpoints'} yet; starting from scratch")
        if log.on:
            _write_json(out / "config.json", dataclasses.asdict(config))
        log(
            f"{config.model} ({n_params:,} parameters) on {config.dataset} ({n_train} train / {len(ds.x_test)} test), "
            f"{_device_name(mesh)}, {config.optimizer} lr {config.lr:g} {config.schedule}, "
            f"batch {config.batch_size}, {config.dtype}, grad={config.grad} -> {out}"
        )

        check, step_fn, compile_time = None, None, 0.0
        if start_epoch < config.epochs:
            # On the first batch this run trains on.
            x0, y0 = next(
                data.batches(ds.x_train, ds.y_train, config.batch_size, key_or_seed=(config.seed, start_epoch))
            )
            check = _gradient_gate(config, model, tree, x0, y0, log)
            # Compiled ahead of the loop, so that throughput excludes compilation.
            t = time.perf_counter()
            step_fn = _compiled_step(
                model, optimizer, config.grad, config.dtype, mesh, (config.batch_size, *ds.image_shape)
            )
            compile_time = time.perf_counter() - t
        else:
            log(f"{out} has already trained {start_epoch} of {config.epochs} epochs; raise --epochs to train longer")

        history = _read_history(out / "metrics.jsonl", start_epoch)
        if log.on:
            (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        train_time = 0.0
        try:
            for epoch in range(start_epoch, config.epochs):
                tree, row = _train_epoch(config, ds, epoch, step_fn, tree, batch_sharding)
                train_time += row["epoch_time_s"]
                test = evaluate(
                    model, tree["params"], tree["state"], ds.x_test, ds.y_test, dtype=config.dtype, mesh=mesh
                )
                row.update(
                    test_loss=test["loss"],
                    test_accuracy=test["accuracy"],
                    lr=float(learning_rate(row["step"] - 1)) if callable(learning_rate) else learning_rate,
                )
                history.append(row)
                log(
                    f"epoch {epoch + 1:3d}/{config.epochs}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f}  "
                    f"test loss {row['test_loss']:.4f} acc {row['test_accuracy']:.4f}  "
                    f"{row['examples_per_second']:,.0f} ex/s  {row['epoch_time_s']:.2f} s"
                )
                if log.on:
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                meta = {
                    "epoch": epoch + 1,
                    "step": row["step"],
                    "seed": config.seed,
                    "data_order": "epoch e: numpy permutation seeded by (seed, e); see jax_resnet.data.batches",
                    "config": dataclasses.asdict(config),
                }
                _save_checkpoint(manager, row["step"], tree, meta)
        finally:
            if log.on and history:
                _plot(history, out / "curves.png")
    finally:
        manager.close()

    if not history:
        raise ValueError(f"{out} has no metrics.jsonl to report from; train it again with a new --out")
    last = history[-1]
    trained = (last["epoch"] - start_epoch) * steps_per_epoch * config.batch_size
    metrics = {
        "test_accuracy": last["test_accuracy"],
        "test_loss": last["test_loss"],
        "train_loss": last["train_loss"],
        "train_accuracy": last["train_accuracy"],
        "epochs": last["epoch"],
        "steps": last["step"],
        "examples_per_second": trained / train_time if train_time else None,
        "grad_check_max_rel_err": None if check is None else check.max_rel_err,
        "grad_check_dtype": None if check is None else check.dtype,
        "grad_check_tol": None if config.skip_grad_check else config.grad_check_tol,
        "wall_time_s": time.perf_counter() - start,
        "compile_time_s": compile_time,
        "model": config.model,
        "dataset": config.dataset,
        "device": _device_name(mesh),
        "num_devices": mesh.size,
        "jax_version": jax.__version__,
        "num_params": n_params,
        "out": str(out),
        "resumed_from_epoch": resumed_from,
        "config": dataclasses.asdict(config),
    }
    if log.on:
        _write_json(out / "metrics.json", metrics)
        if config.json == "-":
            print(json.dumps(metrics, indent=2))
        elif config.json:
            _write_json(Path(config.json), metrics)
    throughput = "" if metrics["examples_per_second"] is None else f", {metrics['examples_per_second']:,.0f} examples/s"
    log(
        f"done: test accuracy {metrics['test_accuracy']:.4f}, {metrics['wall_time_s']:.1f} s wall "
        f"({compile_time:.1f} s compiling){throughput} -> {out}"
    )
    return metrics


def _gradient_gate(config: TrainConfig, model, tree, x, y, log) -> GradCheck | None:
    """Run the gradient check unless skipped; raise GradCheckError past the tolerance."""
    if config.skip_grad_check:
        log("gradient check skipped (--no-grad-check)")
        return None
    t = time.perf_counter()
    check = check_gradients(model, tree["params"], tree["state"], x, y, tol=config.grad_check_tol)
    ok = check.ok(config.grad_check_tol)
    recheck = ""
    if check.dtype != "float32":
        recheck = (
            f"float32 gave {check.float32_rel_err:.2e} (a ReLU kink flipped by rounding?), rechecked in {check.dtype}: "
        )
    log(
        f"gradient check (hand-derived vs jax.grad, one batch): {recheck}max relative error {check.max_rel_err:.2e} "
        f"at {check.where}, tolerance {config.grad_check_tol:.0e}: {'ok' if ok else 'FAILED'} ({time.perf_counter() - t:.1f} s)"
    )
    if not ok:
        raise GradCheckError(
            f"gradient check failed: the hand-derived gradient of {check.where} differs from jax.grad by "
            f"{check.max_rel_err:.3e} in {check.dtype} (norm-wise relative) > tolerance {config.grad_check_tol:.0e}. "
            f"Refusing to train. Run `jax-resnet verify` to find the faulty rule; --no-grad-check trains anyway."
        )
    return check


def _train_epoch(config: TrainConfig, ds, epoch: int, step_fn, tree: dict, batch_sharding) -> tuple[dict, dict]:
    """One epoch of steps; returns (tree, row of metrics).

    Metrics are read one step late, so the host queues step t while step t−1
    runs; a non-finite loss or parameter stops the run and names its step.
    """
    steps_per_epoch = data.num_batches(len(ds.x_train), config.batch_size)
    bar = tqdm(
        total=steps_per_epoch,
        desc=f"epoch {epoch + 1}/{config.epochs}",
        leave=False,
        file=sys.stderr,
        disable=not (config.progress and jax.process_index() == 0),
        dynamic_ncols=True,
    )
    losses, accuracies = [], []
    t0 = time.perf_counter()

    def read(step: int, m: dict) -> None:
        loss, accuracy = _host(m["loss"]), _host(m["accuracy"])
        if not (math.isfinite(loss) and _host(m["params_finite"])):
            what = f"loss became {loss}" if not math.isfinite(loss) else f"parameters became NaN/inf (loss {loss:.4g})"
            raise TrainingError(
                f"{what} at step {step} (epoch {epoch + 1}, batch {step - epoch * steps_per_epoch} of "
                f"{steps_per_epoch}); stopped without saving these parameters. Lower --lr (now {config.lr:g}), "
                f"or check the data for NaN/inf."
            )
        losses.append(loss)
        accuracies.append(accuracy)
        rate = len(losses) * config.batch_size / (time.perf_counter() - t0)
        bar.set_postfix(
            loss=f"{np.mean(losses):.4f}", acc=f"{np.mean(accuracies):.4f}", ex_s=f"{rate:,.0f}", refresh=False
        )
        bar.update(1)

    params, state, opt_state = tree["params"], tree["state"], tree["opt_state"]
    pending = None
    with bar:
        batches = data.batches(ds.x_train, ds.y_train, config.batch_size, key_or_seed=(config.seed, epoch))
        for i, (xb, yb) in enumerate(batches):
            x, y = _put_batch(xb, batch_sharding), _put_batch(yb, batch_sharding)
            params, state, opt_state, m = step_fn(params, state, opt_state, x, y)
            if pending is not None:
                read(*pending)
            pending = (epoch * steps_per_epoch + i + 1, m)
        read(*pending)
    seconds = time.perf_counter() - t0
    row = {
        "epoch": epoch + 1,
        "step": (epoch + 1) * steps_per_epoch,
        "train_loss": float(np.mean(losses)),
        "train_accuracy": float(np.mean(accuracies)),
        "epoch_time_s": seconds,
        "examples_per_second": steps_per_epoch * config.batch_size / seconds,
    }
    return {"params": params, "state": state, "opt_state": opt_state}, row
