"""The training loop apart from its reporting: `train` runs data, the gradient gate, epochs
of the step from `jax_resnet.step` and evaluation, and emits events (`Observer`); the run
directory (`RunDir`: config, metrics, orbax checkpoints via `jax_resnet.checkpoints`, resume,
plots) and the console (`Console`) subscribe to them, as the command line's progress bar
and JSON output do (`jax_resnet.commands.train`). Data parallelism over the local devices,
or over several processes' (`jax_resnet.distributed`).

The main job (no flags: ResNet-8 on scikit-learn's digits, hand-derived
gradients, checked against `jax.grad` before the first step):

    jax-resnet train
    python -m jax_resnet train --epochs 5 --out runs/try
    python -m jax_resnet train --out runs/try --resume      # continue after a crash
    python -m jax_resnet train --dataset mnist --data-dir ../shared/data/mnist --augment --epochs 12
    python -m jax_resnet train --model resnet20 --dataset cifar10 --data-dir ~/data/cifar10 --augment \\
        --optimizer momentum --lr 0.1 --schedule warmup-cosine --weight-decay 1e-4 --batch-size 128 --epochs 164

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
   reference ops (`grad="autodiff"`) in float32, array by array, each
   relative to its own scale, max|g_rules − g_jax| / max|g_jax|. Past
   `grad_check_tol` the batch is checked again in float64 (see
   `step.check_gradients`: ReLU kinks); past it there too, the run refuses to train
   (`GradCheckError`, exit status 1) unless `skip_grad_check` (`--no-grad-check`).
3. Epochs of optax updates. The batch order of epoch e is a permutation seeded
   by (seed, e) (`data.batches`), so it depends on nothing else: a resumed run
   sees exactly the batches an uninterrupted one would. With `augment`, the
   step augments its batch on the device (`step.augment_batch`, what the data
   set allows: `data.AUGMENTATIONS`) with the key
   `fold_in(key(seed), global_step)` (`step.step_key`), which likewise
   depends on nothing else. BatchNorm running statistics are `state`,
   updated once per step. A DP-SGD run (`dp_clip`) draws Poisson batches
   instead, and its step keys, from a secret root (`jax_resnet.dp`).
4. After each epoch: test loss and accuracy with the running statistics, one
   line in `metrics.jsonl`, and an orbax checkpoint. At the end:
   `metrics.json` (with the test set's confusion matrix and per-class
   errors), `confusion.png`, and `curves.png` (also when a run stops early).

Outputs under `out` (default `runs/<timestamp>`):

    metrics.jsonl   one JSON object per epoch
    metrics.json    the final summary (field names are a contract; see `train`)
    curves.png      loss and accuracy per epoch, train and test
    confusion.png   the test set's confusion matrix after the last epoch, with per-class errors
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

Several processes (one per host; tested on one machine, see below): every process calls
`jax.distributed.initialize` before anything touches a device (`jax_resnet.distributed`,
which `jax-resnet train --coordinator HOST:PORT --num-processes N --process-id I` or
`--cluster` calls), then `train(config)` with the same config, `out` one folder all of them
see. The mesh spans every process's devices (`devices` must be None); each process loads
the same data, computes the same permutation (or the same Poisson batches: a DP run's
secret root is process 0's, broadcast) and puts only its rows of each global batch on its
devices (`step.put_batch`, `jax.make_array_from_process_local_data`); BatchNorm statistics
and gradients are reduced over the global batch, so the run equals one process's on the
same batches. Every process takes part in orbax's checkpoints (process 0 writes the
metadata and renames each when complete), and process 0 alone writes metrics, plots and
the console log. On one machine:

    python -m jax_resnet.launch -n 2 -- train --model tiny --out runs/two

tests/test_multiprocess.py starts two real processes (one CPU device each, collectives over
gloo, as JAX's own multi-process tests do) and checks: the parameters after 10 steps equal
one process's on the same global batches to float32 rounding; a run stopped after a
checkpoint and resumed on two processes ends bit for bit where an uninterrupted one does;
the DP step and `per_example.quantities(mesh=)` across two processes equal one process's;
a process that never joins, or dies mid-run, stops the other with a line naming it. Not
tested here: a real network between hosts, GPUs or TPUs, more than two processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from jax_resnet import checkpoints, data, distributed, environment, models, per_example
from jax_resnet import dp as dp_lib
from jax_resnet import step as step_lib
from jax_resnet.step import OPTIMIZERS, SCHEDULES

__all__ = [
    "GRADS",
    "DTYPES",
    "OPTIMIZERS",
    "SCHEDULES",
    "RESUME_MUST_MATCH",
    "TrainingError",
    "GradCheckError",
    "OutputError",
    "TrainConfig",
    "Setup",
    "setup",
    "Observer",
    "train",
    "RunDir",
    "Console",
    "per_class_errors",
]

GRADS = ("rules", "autodiff")
DTYPES = ("float32", "bfloat16")
# Settings a resumed run must share with its checkpoint: otherwise the result
# is not the continuation of that run. `epochs` may grow (train longer).
RESUME_MUST_MATCH = (
    "model",
    "dataset",
    "batch_size",
    "optimizer",
    "lr",
    "schedule",
    "weight_decay",
    "augment",
    "dtype",
    "seed",
    "dp_clip",
    "dp_noise",
    "dp_sampler",
    "dp_max_batch",
    "dp_accountant",
    "dp_insecure_seed",
)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss or parameters, failed gradient check)."""


class GradCheckError(TrainingError):
    """The hand-derived gradients disagree with `jax.grad` beyond the tolerance."""


class OutputError(TrainingError):
    """Writing under --out failed during the run (a full disk, a folder gone read-only); what was written
    before stays whole, and the message names the checkpoint --resume would continue from."""


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
      augment: random shifts (padding and crop) and, where the data set
        allows (CIFAR-10, never digits or MNIST), horizontal flips of every
        training batch, on the device; `data.AUGMENTATIONS` says what each
        data set gets [--augment].
      grad: "rules" (hand-derived VJPs) or "autodiff" (jax.grad of the reference ops) [--grad].
      dtype: compute dtype, "float32" or "bfloat16"; parameters stay float32 [--dtype].
      seed: parameter init, digits split, synthetic draw and batch order [--seed].
      out: output folder; None means runs/<timestamp> [--out].
      resume: continue from the newest checkpoint under `out` (or, with no
        `out`, the newest run under runs/) [--resume].
      data_dir, download: where MNIST/CIFAR-10 files are, and whether to fetch them [--data-dir, --download].
      devices: how many local devices to shard the batch over; None = all [--devices].
      grad_check_tol: largest accepted relative error of the gradient check [--grad-check-tol].
      skip_grad_check: train even without (or despite) the gradient check [--no-grad-check].
      max_to_keep: how many checkpoints to keep.
      dp_clip, dp_noise, dp_delta: DP-SGD (`jax_resnet.dp`) when dp_clip is
        set: each example's gradient clipped to norm C = dp_clip, Gaussian
        noise of std σ·C (σ = dp_noise) on the sum; the ε reached at
        δ = dp_delta is printed and recorded per epoch (metrics.jsonl
        "epsilon") and at the end (metrics.json "dp"). Needs a model without
        BatchNorm (resnet20_gn, resnet18_gn, the MLPs), grad "rules" and
        float32 [--dp-clip, --dp-noise, --dp-delta].
      dp_sampler: "poisson" (each example joins each step with probability
        batch_size / n; what ε accounts for) or "shuffle" (fixed-size batches
        of a shuffled epoch: no ε is computed) [--dp-sampler].
      dp_max_batch: cap on a Poisson batch (truncated Poisson sampling,
        accounted with PLD); None: no cap [--dp-max-batch].
      dp_accountant: "rdp" or "pld"; None: "pld" with a cap, "rdp" without [--dp-accountant].
      dp_insecure_seed: derive the DP noise and sampling from `seed`, so the
        run is reproducible and NOT private (metrics.json "private": false);
        by default they come from the operating system's entropy and are
        written nowhere [--dp-insecure-seed].
    """

    model: str = "resnet8"
    dataset: str = "digits"
    epochs: int = 15
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-2
    schedule: str = "cosine"
    weight_decay: float = 0.0
    augment: bool = False
    grad: str = "rules"
    dtype: str = "float32"
    seed: int = 0
    out: str | None = None
    resume: bool = False
    data_dir: str | None = None
    download: bool = False
    devices: int | None = None
    grad_check_tol: float = 1e-4
    skip_grad_check: bool = False
    max_to_keep: int = 2
    dp_clip: float | None = None
    dp_noise: float | None = None
    dp_delta: float = 1e-5
    dp_sampler: str = "poisson"
    dp_max_batch: int | None = None
    dp_accountant: str | None = None
    dp_insecure_seed: bool = False

    @property
    def dp(self) -> dp_lib.DPConfig | None:
        if self.dp_clip is None or self.dp_noise is None:  # __post_init__ refuses a clip without noise
            return None
        return dp_lib.DPConfig(
            l2_norm_clip=self.dp_clip,
            noise_multiplier=self.dp_noise,
            expected_batch_size=self.batch_size,
            delta=self.dp_delta,
            sampler=self.dp_sampler,
            truncated_batch_size=self.dp_max_batch,
            accountant=self.dp_accountant,
        )

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
        self._check_dp()

    def _check_dp(self):
        if self.dp_clip is None:
            defaults = TrainConfig.__dataclass_fields__
            stray = [
                "--" + name.replace("_", "-")
                for name in ("dp_noise", "dp_max_batch", "dp_accountant", "dp_insecure_seed", "dp_sampler")
                if getattr(self, name) != defaults[name].default
            ]
            if stray:
                raise ValueError(f"{', '.join(stray)} needs --dp-clip C (the clipping norm) to train with DP-SGD")
            return
        if self.dp_noise is None:
            raise ValueError("--dp-clip needs --dp-noise σ (the noise multiplier; 0 clips without noise)")
        dp_lib.check(self.dp)  # every DP setting, each error naming its flag
        if self.grad != "rules" or self.dtype != "float32":
            raise ValueError(
                f"DP-SGD runs the hand-derived rules in float32; got --grad {self.grad} --dtype {self.dtype}"
            )


# ------------------------------------------------------------------ the run's fixed parts
@functools.lru_cache(maxsize=8)
def _optimizer(model, name, schedule, lr, total_steps, weight_decay):
    """(learning-rate schedule, optimizer): the schedule built once, and the optimizer over it.

    Cached, so that a run with the same settings gets the same (hashable) optimizer and
    `step.compiled_train_step` need not compile again (tests, notebooks)."""
    lr_schedule = step_lib.make_schedule(schedule, lr, total_steps)
    return lr_schedule, step_lib.make_optimizer(name, lr_schedule, weight_decay, mask=model.kernel_mask)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a run fixes before its first step: data, mesh, model, schedule and optimizer,
    steps per epoch, and a DP run's randomness. Built once by `setup`; everything else reads it."""

    config: TrainConfig
    ds: data.Dataset
    mesh: jax.sharding.Mesh
    model: models.Model
    steps_per_epoch: int
    schedule: float | optax.Schedule
    optimizer: optax.GradientTransformation
    randomness: dp_lib.DPRandomness | None  # a DP run's: secret unless --dp-insecure-seed

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.config.epochs

    def lr(self, step: int) -> float:
        """The learning rate of (1-based) step `step`."""
        return float(self.schedule(step - 1)) if callable(self.schedule) else self.schedule

    @property
    def augmentation(self) -> data.Augmentation | None:
        return self.ds.augmentation if self.config.augment else None

    @property
    def rows(self) -> int:
        """The rows of every training batch (the batch size, or a DP run's padded physical batch)."""
        c = self.config
        return c.batch_size if c.dp is None else dp_lib.physical_batch_size(c.dp, self.mesh.size)

    def step_for(self, x_shape: tuple[int, ...]):
        """The compiled step for batches of `x_shape` (cached: a DP run's rare batch of two chunks compiles once)."""
        c = self.config
        return step_lib.compiled_train_step(
            self.model, self.optimizer, c.grad, c.dtype, self.mesh, x_shape, self.augmentation, c.dp
        )

    def dp_summary(self, steps: int) -> dict | None:
        """`dp.summary` of `steps` DP-SGD steps of this run, or None without DP."""
        c = self.config
        return None if c.dp is None else dp_lib.summary(c.dp, len(self.ds.x_train), steps, self.randomness)

    def evaluate(self, tree: dict) -> dict:
        """The test set under `tree` (running statistics): {"test_loss", "test_accuracy", "confusion"}."""
        test = step_lib.evaluate(
            self.model,
            tree["params"],
            tree["state"],
            self.ds.x_test,
            self.ds.y_test,
            dtype=self.config.dtype,
            mesh=self.mesh,
        )
        return {"test_loss": test["loss"], "test_accuracy": test["accuracy"], "confusion": test["confusion"]}


def setup(config: TrainConfig) -> Setup:
    """Load the data, build the mesh, the model for the data, the schedule and the optimizer."""
    ds = data.load(config.dataset, config.data_dir, download=config.download, seed=config.seed)
    mesh = step_lib.make_mesh(config.devices)
    _check_sizes(config, len(ds.x_train), mesh)
    model = models.get(config.model).for_data(ds.image_shape, ds.num_classes)
    randomness = None
    if config.dp is not None:
        per_example.check_model(model)
        randomness = dp_lib.DPRandomness.insecure(config.seed) if config.dp_insecure_seed else dp_lib.DPRandomness.new()
    steps_per_epoch = data.num_batches(len(ds.x_train), config.batch_size)
    schedule, optimizer = _optimizer(
        model, config.optimizer, config.schedule, config.lr, steps_per_epoch * config.epochs, config.weight_decay
    )
    return Setup(config, ds, mesh, model, steps_per_epoch, schedule, optimizer, randomness)


def _check_sizes(config: TrainConfig, n_train: int, mesh) -> None:
    if config.batch_size > n_train:
        raise ValueError(
            f"batch_size {config.batch_size} exceeds the {n_train} training examples of {config.dataset}; "
            f"use --batch-size {n_train} or less"
        )
    if config.batch_size % mesh.size:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by the {mesh.size} devices; use a multiple of "
            f"{mesh.size} (e.g. {max(1, config.batch_size // mesh.size) * mesh.size}) or set --devices"
        )


# ----------------------------------------------------------------------- events
class Observer:
    """What the loop tells the outside, one method per event; each does nothing unless overridden.

    `train` calls them in this order: `note` (any time), `start`, `gradient_check`, then per epoch
    `epoch_start`, `step` (each step), `epoch_end`; `stop` when the epochs end or an error stops
    them; `end` with the final metrics. The run directory (`RunDir`), the console (`Console`) and
    the command line's progress bar (`jax_resnet.commands.train`) are observers."""

    def note(self, text: str) -> None:
        """A remark for a reader (resuming, a skipped check, a damaged checkpoint set aside)."""

    def start(self, run: Setup, out: Path, num_params: int, start_epoch: int) -> None:
        """Training (or reporting, when nothing is left to train) begins at epoch `start_epoch`."""

    def gradient_check(self, check: step_lib.GradCheck, tol: float, seconds: float) -> None:
        """The gradient gate's verdict (before `train` raises GradCheckError on a failure)."""

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        """Epoch `epoch` (0-based) of `epochs` begins; it has `steps` steps."""

    def step(self, step: int, loss: float, accuracy: float, mean_loss: float, mean_accuracy: float, rate: float):
        """Global step `step` (1-based) is done: its loss and accuracy, the epoch's means so far and examples/s."""

    def epoch_end(self, row: dict, tree: dict) -> None:
        """An epoch ended: its row of metrics (test set included) and the trained state."""

    def stop(self, history: list[dict]) -> None:
        """The epochs ended, normally or not: every row so far (resumed ones included)."""

    def end(self, metrics: dict) -> None:
        """The run's final metrics (what `train` returns and metrics.json holds)."""


class _Emit:
    """Calls each observer's method of an event in turn."""

    def __init__(self, observers):
        self.observers = tuple(observers)

    def __getattr__(self, event: str):
        if not callable(getattr(Observer, event, None)):
            raise AttributeError(f"Observer has no event {event!r}")

        def emit(*args):
            for observer in self.observers:
                getattr(observer, event)(*args)

        return emit


# ----------------------------------------------------------------------- train
def train(config: TrainConfig = TrainConfig(), observers=None) -> dict[str, Any]:
    """Run the training job `config` describes; return the final metrics.

    The loop: `setup`, the run directory (`RunDir`: resume, then config.json), the gradient gate,
    epochs of steps each followed by the test set and a checkpoint, then the summary. What it
    does it tells `observers` (`Observer`'s events) and the run directory; None means a
    `Console` on stdout. In a run of several processes (`jax.distributed`) only process 0
    writes files and logs; every process takes part in the checkpoints.

    The returned dict is what `metrics.json` holds. Stable fields:
    test_accuracy, test_loss, train_loss, train_accuracy, epochs (completed,
    in total), steps, examples_per_second (training steps only: compiled
    ahead, evaluation and checkpoints not counted), grad_check_max_rel_err
    and grad_check_dtype (None when skipped), grad_check_tol, wall_time_s, compile_time_s, model,
    dataset, device, num_devices, num_processes, jax_version, environment (`environment.record`),
    num_params, out, resumed_from_epoch, config; and, from the test set after the last epoch,
    test_per_class (one row per class: class, examples, errors, error_rate,
    most_confused_with; see `per_class_errors`) and test_confusion
    (rows: true class, columns: predicted class; counts).

    Raises:
      ValueError: bad settings or data (the message says which and how to fix it).
      GradCheckError: the gradient check failed and was not skipped.
      TrainingError: the loss or the parameters became non-finite.
    """
    start = time.perf_counter()
    lead = jax.process_index() == 0
    if observers is None:
        observers = [Console()] if lead else []
    out = _output_dir(config)
    run = setup(config)
    run_dir = RunDir(out, writes=lead)
    emit = _Emit([run_dir, *observers])
    tree = step_lib.init_train_state(run.model, run.optimizer, config.seed, run.mesh)
    try:
        with run_dir.checkpoints(config.max_to_keep):
            tree, resumed_from, history = run_dir.restore(config, tree, emit.note)
            start_epoch = resumed_from or 0
            num_params = models.num_params(tree["params"])
            emit.start(run, out, num_params, start_epoch)
            check, compile_time, test = None, 0.0, None
            if start_epoch >= config.epochs:
                emit.note(
                    f"{out} has already trained {start_epoch} of {config.epochs} epochs; raise --epochs to train longer"
                )
            else:
                check = _gradient_gate(run, tree, start_epoch, emit)
                t = time.perf_counter()  # compiled ahead of the loop, so that throughput excludes compilation
                run.step_for((run.rows, *run.ds.image_shape))
                compile_time = time.perf_counter() - t
            epoch = start_epoch
            try:
                for epoch in range(start_epoch, config.epochs):
                    tree, row = _train_epoch(run, epoch, tree, emit)
                    test = run.evaluate(tree)
                    row.update(test_loss=test["test_loss"], test_accuracy=test["test_accuracy"], lr=run.lr(row["step"]))
                    if config.dp is not None:
                        row["epsilon"] = dp_lib.epsilon(config.dp, len(run.ds.x_train), row["step"])
                    history.append(row)
                    emit.epoch_end(row, tree)
            except Exception as e:  # in a run of several processes: one of them gone?
                gone = distributed.lost(e, f"in epoch {epoch + 1}", start)
                if gone is None:
                    raise
                raise gone from e
            finally:
                emit.stop(history)
        test = test or run.evaluate(tree)
        wall_time = time.perf_counter() - start
        metrics = _summary(run, out, history, start_epoch, resumed_from, check, compile_time, wall_time, num_params)
        metrics.update(test_per_class=per_class_errors(test["confusion"]), test_confusion=test["confusion"].tolist())
        emit.end(metrics)
    except OSError as e:
        if not lead:
            raise
        raise run_dir.output_error(e, emit.note) from e
    return metrics


def _output_dir(config: TrainConfig) -> Path:
    if config.out is not None:
        return Path(config.out)
    if jax.process_count() > 1:
        raise ValueError("out: a run of several processes needs --out, the same folder in every process")
    if config.resume:
        runs = sorted(p for p in Path("runs").glob("*") if (p / "checkpoints").is_dir())
        if not runs:
            raise ValueError("resume: no run with checkpoints under runs/; pass --out DIR of the run to continue")
        return runs[-1]
    base = Path("runs") / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out, i = base, 1
    while out.exists():
        out, i = base.with_name(f"{base.name}-{i}"), i + 1
    return out


def _gradient_gate(run: Setup, tree: dict, epoch: int, emit) -> step_lib.GradCheck | None:
    """On the first batch this run trains on: the gradient check unless skipped; GradCheckError past the tolerance.

    Every process checks its own copy of the replicated parameters on the whole batch: the same numbers
    everywhere, and no program that spans processes."""
    c = run.config
    if c.skip_grad_check:
        emit.note("gradient check skipped (--no-grad-check)")
        return None
    x, y = next(data.batches(run.ds.x_train, run.ds.y_train, c.batch_size, key_or_seed=(c.seed, epoch)))
    params, state = (jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree[k]) for k in ("params", "state"))
    t = time.perf_counter()
    check = step_lib.check_gradients(run.model, params, state, x, y, tol=c.grad_check_tol)
    emit.gradient_check(check, c.grad_check_tol, time.perf_counter() - t)
    if not check.ok(c.grad_check_tol):
        raise GradCheckError(
            f"gradient check failed: the hand-derived gradient of {check.where} differs from jax.grad by "
            f"{check.max_rel_err:.3e} in {check.dtype} (relative to that array's scale) > tolerance "
            f"{c.grad_check_tol:.0e}. Refusing to train. Run `jax-resnet verify` to find the faulty rule; "
            "--no-grad-check trains anyway."
        )
    return check


def _epoch_batches(run: Setup, epoch: int):
    """Epoch `epoch`'s host batches, the same in every process: a DP run's Poisson batches
    (`dp.poisson_batch`, padded to whole chunks), or else fixed-size batches of a permutation
    seeded by (seed, epoch)."""
    c, ds = run.config, run.ds
    if c.dp is not None and run.randomness is not None and c.dp_sampler == "poisson":
        for i in range(run.steps_per_epoch):
            step = epoch * run.steps_per_epoch + i
            yield dp_lib.poisson_batch(ds.x_train, ds.y_train, c.dp, run.randomness, step, run.mesh.size)
        return
    yield from data.batches(ds.x_train, ds.y_train, c.batch_size, key_or_seed=(c.seed, epoch))


def _train_epoch(run: Setup, epoch: int, tree: dict, emit) -> tuple[dict, dict]:
    """One epoch of steps; returns (tree, row of metrics).

    Metrics are read one step late, so the host queues step t while step t−1
    runs; a non-finite loss or parameter stops the run and names its step.
    Each step gets its key (`step.step_key`: from the seed, or from a DP run's
    secret root) and the compiled step for its batch's shape (`Setup.step_for`);
    each process puts only its slice of the batch on its devices (`step.put_batch`).
    """
    c, steps = run.config, run.steps_per_epoch
    batch_sharding = step_lib.shardings(run.mesh)[1]
    emit.epoch_start(epoch, c.epochs, steps)
    losses, accuracies, clipped = [], [], []
    t0 = time.perf_counter()

    def read(step: int, m: dict) -> None:
        loss, accuracy = step_lib.host(m["loss"]), step_lib.host(m["accuracy"])
        if not (math.isfinite(loss) and step_lib.host(m["params_finite"])):
            what = f"loss became {loss}" if not math.isfinite(loss) else f"parameters became NaN/inf (loss {loss:.4g})"
            raise TrainingError(
                f"{what} at step {step} (epoch {epoch + 1}, batch {step - epoch * steps} of "
                f"{steps}); stopped without saving these parameters. Lower --lr (now {c.lr:g}), "
                f"or check the data for NaN/inf."
            )
        losses.append(loss)
        accuracies.append(accuracy)
        if "clipped" in m:
            clipped.append(step_lib.host(m["clipped"]))
        rate = len(losses) * c.batch_size / (time.perf_counter() - t0)
        emit.step(step, loss, accuracy, float(np.mean(losses)), float(np.mean(accuracies)), rate)

    params, state, opt_state = tree["params"], tree["state"], tree["opt_state"]
    root = c.seed if run.randomness is None else run.randomness.root_key()
    pending = None
    for i, (xb, yb) in enumerate(_epoch_batches(run, epoch)):
        global_step = epoch * steps + i
        key = step_lib.step_key(root, global_step, run.mesh)
        xs, ys = step_lib.put_batch(xb, batch_sharding), step_lib.put_batch(yb, batch_sharding)
        params, state, opt_state, m = run.step_for(xb.shape)(params, state, opt_state, xs, ys, key)
        if pending is not None:
            read(*pending)
        pending = (global_step + 1, m)
    if pending is not None:  # always: an epoch has at least one batch (batch_size ≤ examples)
        read(*pending)
    seconds = time.perf_counter() - t0
    row = {
        "epoch": epoch + 1,
        "step": (epoch + 1) * steps,
        "train_loss": float(np.mean(losses)),
        "train_accuracy": float(np.mean(accuracies)),
        "epoch_time_s": seconds,
        "examples_per_second": steps * c.batch_size / seconds,
    }
    if clipped:
        row["clipped"] = float(np.mean(clipped))
    return {"params": params, "state": state, "opt_state": opt_state}, row


def _summary(run: Setup, out, history, start_epoch, resumed_from, check, compile_time, wall_time, num_params) -> dict:
    c = run.config
    if not history:
        raise ValueError(f"{out} has no metrics.jsonl to report from; train it again with a new --out")
    last = history[-1]
    trained = (last["epoch"] - start_epoch) * run.steps_per_epoch * c.batch_size
    train_time = sum(h["epoch_time_s"] for h in history if h["epoch"] > start_epoch)
    env = environment.record()
    return {
        "test_accuracy": last["test_accuracy"],
        "test_loss": last["test_loss"],
        "train_loss": last["train_loss"],
        "train_accuracy": last["train_accuracy"],
        "epochs": last["epoch"],
        "steps": last["step"],
        "examples_per_second": trained / train_time if train_time else None,
        "grad_check_max_rel_err": None if check is None else check.max_rel_err,
        "grad_check_dtype": None if check is None else check.dtype,
        "grad_check_tol": None if c.skip_grad_check else c.grad_check_tol,
        "wall_time_s": wall_time,
        "compile_time_s": compile_time,
        "model": c.model,
        "dataset": c.dataset,
        "device": _device_name(run.mesh),
        "num_devices": run.mesh.size,
        "num_processes": jax.process_count(),
        "jax_version": env["jax"],
        "environment": env,
        "num_params": num_params,
        "out": str(out),
        "resumed_from_epoch": resumed_from,
        "config": dataclasses.asdict(c),
        "dp": run.dp_summary(last["step"]),
    }


# ---------------------------------------------------------------- the run directory
class RunDir(Observer):
    """A run's folder: config.json, metrics.jsonl, metrics.json, curves.png, confusion.png and
    checkpoints/; every file replaced whole or appended whole (`_replacing`, `_append_line`).

    It resumes a run (`restore`) and, as an observer, writes what the loop reports. With
    `writes` False (every process but process 0 of a multi-process run) it writes no file of
    its own and only takes its part in orbax's checkpoints, which every process must call."""

    mngr: checkpoints.ocp.CheckpointManager  # open inside `checkpoints()`

    def __init__(self, out: Path, writes: bool = True):
        self.out, self.writes = Path(out), writes
        if writes:
            _make_writable(self.out)

    @contextlib.contextmanager
    def checkpoints(self, max_to_keep: int):
        with checkpoints.manager(self.out / "checkpoints", max_to_keep) as self.mngr:
            yield self.mngr

    def restore(self, config: TrainConfig, tree: dict, note) -> tuple[dict, int | None, list[dict]]:
        """(tree, epoch resumed from or None, metrics rows up to it): the newest intact checkpoint
        under `out`, if `config` allows it (`--resume`, the same `RESUME_MUST_MATCH` settings)."""
        latest = self.mngr.latest_step()
        if latest is None:
            if config.resume:
                note(f"resume: no checkpoint under {self.out / 'checkpoints'} yet; starting from scratch")
            return tree, None, []
        if not config.resume:
            raise ValueError(
                f"{self.out} already holds checkpoints; pass --resume to continue that run, or choose another --out"
            )
        # Settings first: a checkpoint of other settings (another optimizer's state) would not
        # read back into this run's tree, and must not be taken for a damaged one.
        saved = self._saved_config()
        if saved is not None:
            # A setting newer than the checkpoint (absent from its config) had its default then.
            saved = {**dataclasses.asdict(TrainConfig()), **saved}
            differ = [
                f"{k}={saved[k]!r} (now {getattr(config, k)!r})"
                for k in RESUME_MUST_MATCH
                if saved[k] != getattr(config, k)
            ]
            if differ:
                raise ValueError(
                    f"resume: {self.out} was trained with {', '.join(differ)}; pass the same settings, or a new --out"
                )
        found = checkpoints.restore_newest_intact(self.mngr, tree, note)
        if found is None:  # latest_step() saw one; it raises when all are damaged
            raise ValueError(f"resume: the checkpoints under {self.out / 'checkpoints'} vanished while reading")
        step, restored, meta = found
        note(f"resuming {self.out} from epoch {meta['epoch']} (step {step})")
        was = meta["config"]["epochs"]
        if was != config.epochs and config.schedule != "constant":
            note(f"note: --epochs is now {config.epochs} (was {was}); the {config.schedule} schedule stretches")
        return restored, meta["epoch"], _read_history(self.out / "metrics.jsonl", meta["epoch"])

    def _saved_config(self) -> dict | None:
        """The config of the newest checkpoint whose metadata reads, or None."""
        for step in sorted(self.mngr.all_steps(), reverse=True):
            try:
                return checkpoints.restore_meta(self.mngr, step)["config"]
            except Exception:  # a damaged checkpoint: restore_newest_intact names it
                continue
        return None

    def start(self, run: Setup, out: Path, num_params: int, start_epoch: int) -> None:
        self.run = run
        if self.writes:
            _write_json(self.out / "config.json", dataclasses.asdict(run.config))
            history = _read_history(self.out / "metrics.jsonl", start_epoch)
            with _replacing(self.out / "metrics.jsonl") as tmp:
                tmp.write_text("".join(json.dumps(h) + "\n" for h in history))

    def epoch_end(self, row: dict, tree: dict) -> None:
        if self.writes:
            _append_line(self.out / "metrics.jsonl", json.dumps(row))
        checkpoints.save(self.mngr, row["step"], tree, self._meta(row))

    def _meta(self, row: dict) -> dict:
        c, randomness = self.run.config, self.run.randomness
        return {
            "epoch": row["epoch"],
            "step": row["step"],
            "seed": c.seed,
            "data_order": "epoch e: numpy permutation seeded by (seed, e); see jax_resnet.data.batches",
            "step_keys": (
                "step t (0-based): key fold_in(key(seed), t); see jax_resnet.step.step_key"
                if randomness is None
                else "DP run: step t's key fold_in(root, t) and its Poisson batch from a secret root "
                "(operating-system entropy), not recorded"
                if randomness.private
                else "DP run, --dp-insecure-seed: step t's key fold_in(DPRandomness.insecure(seed).root_key(), t)"
            ),
            "config": dataclasses.asdict(c),
        }

    def stop(self, history: list[dict]) -> None:
        if self.writes and history:
            try:
                _plot(history, self.out / "curves.png")
            except OSError as e:  # a full disk: the error that stopped the loop, if any, says more
                print(f"could not write {self.out / 'curves.png'} ({e.strerror or e})", file=sys.stderr)

    def end(self, metrics: dict) -> None:
        if self.writes:
            _plot_confusion(np.array(metrics["test_confusion"]), self.out / "confusion.png", metrics["dataset"])
            _write_json(self.out / "metrics.json", metrics)

    def output_error(self, e: OSError, note) -> OutputError:
        """The one-line error for a write under `out` that failed mid-run, after removing an unfinished checkpoint."""
        folder = self.out / "checkpoints"
        removed = checkpoints.remove_unfinished(folder)
        if removed:
            note(f"removed the unfinished checkpoint {', '.join(removed)}")
        steps = checkpoints.finished_steps(folder)
        what = f" {e.filename}" if e.filename else ""
        kept = (
            f"checkpoint step {steps[-1]} is intact: free some space and pass --resume to continue from it"
            if steps
            else "no checkpoint was written"
        )
        return OutputError(f"--out {self.out}: writing{what} failed ({e.strerror or e}); the run stopped; {kept}")


def _make_writable(out: Path) -> None:
    """Create `out` and prove a file can be written there, before any training."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e}); choose another folder") from None


# ----------------------------------------------------------------------- console
class Console(Observer):
    """Human-readable lines on `stream` (default stdout), through tqdm so that they do not break a progress bar."""

    def __init__(self, stream=None):
        self.stream = stream

    def note(self, text: str) -> None:
        tqdm.write(text, file=self.stream or sys.stdout)

    def start(self, run: Setup, out: Path, num_params: int, start_epoch: int) -> None:
        c, ds, a = run.config, run.ds, run.augmentation
        self.epochs = c.epochs
        augment = "" if a is None else f", augment: shift ±{a.pad}" + (" and flips" if a.flip else "")
        processes = "" if jax.process_count() == 1 else f" in {jax.process_count()} processes"
        self.note(
            f"{c.model} ({num_params:,} parameters) on {c.dataset} ({len(ds.x_train)} train / {len(ds.x_test)} test), "
            f"{_device_name(run.mesh)}{processes}, {c.optimizer} lr {c.lr:g} {c.schedule}, "
            f"batch {c.batch_size}, {c.dtype}, grad={c.grad}{augment} -> {out}"
        )
        dp = run.dp_summary(run.total_steps)
        if c.dp is not None and dp is not None:
            self.note(_dp_line(c.dp, dp, run.mesh.size))

    def gradient_check(self, check: step_lib.GradCheck, tol: float, seconds: float) -> None:
        recheck = ""
        if check.dtype != "float32":
            recheck = (
                f"float32 gave {check.float32_rel_err:.2e} (a ReLU kink flipped by rounding?), "
                f"rechecked in {check.dtype}: "
            )
        self.note(
            f"gradient check (hand-derived vs jax.grad, one batch): {recheck}max relative error "
            f"{check.max_rel_err:.2e} at {check.where}, tolerance {tol:.0e}: "
            f"{'ok' if check.ok(tol) else 'FAILED'} ({seconds:.1f} s)"
        )

    def epoch_end(self, row: dict, tree: dict) -> None:
        self.note(
            f"epoch {row['epoch']:3d}/{self.epochs}  train loss {row['train_loss']:.4f} "
            f"acc {row['train_accuracy']:.4f}  test loss {row['test_loss']:.4f} acc {row['test_accuracy']:.4f}  "
            f"{row['examples_per_second']:,.0f} ex/s  {row['epoch_time_s']:.2f} s"
        )

    def end(self, metrics: dict) -> None:
        worst = sorted(metrics["test_per_class"], key=lambda r: -r["error_rate"])
        self.note(
            "test errors per class (worst first): "
            + ", ".join(f"{r['class']}: {r['errors']}/{r['examples']}" for r in worst)
        )
        dp = metrics["dp"]
        if dp is not None and dp["epsilon"] is not None:
            private = "" if dp["private"] else " (NOT private: --dp-insecure-seed)"
            self.note(f"DP-SGD: ε = {dp['epsilon']:.3g} at δ = {dp['delta']:g} after {dp['steps']} steps{private}")
        rate = metrics["examples_per_second"]
        throughput = "" if rate is None else f", {rate:,.0f} examples/s"
        self.note(
            f"done: test accuracy {metrics['test_accuracy']:.4f}, {metrics['wall_time_s']:.1f} s wall "
            f"({metrics['compile_time_s']:.1f} s compiling){throughput} -> {metrics['out']}"
        )


# --------------------------------------------------------------------- outputs
def per_class_errors(confusion: np.ndarray) -> list[dict[str, Any]]:
    """One row per class from a confusion matrix (rows: true class, columns: predicted):
    {"class", "examples", "errors", "error_rate", "most_confused_with"} (the wrong class
    predicted most often for it, None when there are no errors).

        >>> per_class_errors(np.array([[5, 1], [0, 4]]))[0]
        {'class': 0, 'examples': 6, 'errors': 1, 'error_rate': 0.16666666666666666, 'most_confused_with': 1}
    """
    rows = []
    for k, counts in enumerate(np.asarray(confusion)):
        examples = int(counts.sum())
        errors = examples - int(counts[k])
        wrong = np.where(np.arange(len(counts)) == k, -1, counts)
        rows.append(
            {
                "class": k,
                "examples": examples,
                "errors": errors,
                "error_rate": errors / examples if examples else 0.0,
                "most_confused_with": int(wrong.argmax()) if errors else None,
            }
        )
    return rows


def _plot_confusion(confusion: np.ndarray, path: Path, dataset: str) -> None:
    from matplotlib.figure import Figure

    k = len(confusion)
    per_class = per_class_errors(confusion)
    errors = sum(r["errors"] for r in per_class)
    total = int(confusion.sum())
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    # The colours show the errors alone: on the diagonal's scale they would all look blank.
    off = np.where(np.eye(k, dtype=bool), 0, confusion)
    image = ax.imshow(off, cmap="Reds", vmin=0, vmax=max(1, int(off.max())))
    fig.colorbar(image, ax=ax, label="test examples (off the diagonal: errors)")
    if k <= 20:  # counts in the cells while they stay legible
        dark = 0.6 * max(1, int(off.max()))
        for i, j in zip(*np.nonzero(confusion)):
            color = "tab:green" if i == j else "white" if off[i, j] > dark else "black"
            ax.text(j, i, str(int(confusion[i, j])), ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k), [f"{r['class']} ({r['error_rate']:.1%})" for r in per_class])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (error rate)")
    ax.set_title(f"{dataset} test set: {errors} errors of {total} ({errors / max(total, 1):.2%})")
    fig.tight_layout()
    with _replacing(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


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
    with _replacing(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


@contextlib.contextmanager
def _replacing(path: Path):
    """Yield a temporary name beside `path` to write to; it replaces `path` only once written whole, and is
    removed if writing fails (a full disk): `path` is either the old file or the new one, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, obj) -> None:
    with _replacing(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def _append_line(path: Path, line: str) -> None:
    """Append one line; if the write fails part-way (a full disk), cut the file back to its old end."""
    end = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except BaseException:
        if path.exists():
            os.truncate(path, end)
        raise


def _read_history(path: Path, up_to_epoch: int) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["epoch"] <= up_to_epoch]


def _device_name(mesh) -> str:
    d = mesh.devices.flat[0]
    return f"{mesh.size} x {d.device_kind} ({d.platform})"


def _dp_line(config: dp_lib.DPConfig, dp: dict, devices: int) -> str:
    """The console's account of a DP run (`dp`: `dp.summary`): settings, sampler, ε, and what is not protected."""
    line = f"DP-SGD: clip C = {dp['clip']:g}, noise σ = {dp['noise']:g}, "
    if dp["sampler"] == "shuffle":
        return line + (
            f"fixed batches of {dp['expected_batch_size']} from a shuffled epoch: NO DP GUARANTEE is computed "
            "for this sampler (--dp-sampler poisson gives one)"
        )
    cap = "" if dp["truncated_batch_size"] is None else f", capped at {dp['truncated_batch_size']}"
    line += (
        f"Poisson sampling q = {dp['sampling_rate']:.4g} (expected batch {dp['expected_batch_size']}{cap}, "
        f"padded to {dp_lib.physical_batch_size(config, devices)} rows); after {dp['steps']} steps "
        f"ε = {dp['epsilon']:.3g} at δ = {dp['delta']:g} ({dp['accountant'].upper()}, {dp['neighbouring_relation']})"
    )
    if not dp["private"]:
        line += "; --dp-insecure-seed: noise and batches follow from --seed, so this run is NOT private"
    return line + "; released without noise: training loss, accuracy and clipped fraction per epoch"
