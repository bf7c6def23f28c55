"""`jax-resnet train`: the main job; one flag per `TrainConfig` field (its docstring says which),
and the command's own: --json and --no-progress (what the command prints: `run` subscribes a
`train.Console`, a `ProgressBar` and writes the JSON) and the multi-process flags
(`jax_resnet.distributed.initialize`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
from tqdm.auto import tqdm

from jax_resnet import data, distributed, dp, models, train
from jax_resnet.commands import (
    human,
    nonnegative_float,
    nonnegative_int,
    out_dir,
    out_file,
    positive_float,
    positive_int,
    write_json,
)

FAILURES = (train.TrainingError,)
INTERRUPTED = "every finished epoch is checkpointed (continue with --resume --out DIR)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = train.TrainConfig()
    add = parser.add_argument
    add(
        "--model",
        default=d.model,
        choices=list(models.PRESETS),
        metavar="NAME",
        help=f"model preset (default {d.model}); one of: {', '.join(models.PRESETS)}",
    )
    add("--dataset", default=d.dataset, choices=data.DATASETS, help=f"default {d.dataset}")
    add("--data-dir", default=d.data_dir, metavar="DIR", help="folder with the MNIST / CIFAR-10 files")
    add("--download", action="store_true", help="download missing MNIST / CIFAR-10 files (SHA-256 checked)")
    add("--epochs", type=positive_int, default=d.epochs, metavar="N", help=f"total epochs (default {d.epochs})")
    add(
        "--batch-size",
        type=positive_int,
        default=d.batch_size,
        metavar="N",
        help=f"examples per step, all devices together (default {d.batch_size})",
    )
    add("--optimizer", default=d.optimizer, choices=train.OPTIMIZERS, help=f"default {d.optimizer}")
    add("--lr", type=positive_float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    add("--schedule", default=d.schedule, choices=train.SCHEDULES, help=f"default {d.schedule}")
    add(
        "--weight-decay",
        type=nonnegative_float,
        default=d.weight_decay,
        help="on kernels only; decoupled for adamw (default 0)",
    )
    add(
        "--augment",
        action="store_true",
        help="random shifts of every training batch, and flips where the data set allows them (CIFAR-10; "
        "never digits or MNIST), on the device",
    )
    add(
        "--grad",
        default=d.grad,
        choices=train.GRADS,
        help="rules (hand-derived, default) or autodiff (jax.grad of the reference ops)",
    )
    add(
        "--dtype",
        default=d.dtype,
        choices=train.DTYPES,
        help="compute dtype (default float32; parameters stay float32)",
    )
    add("--seed", type=nonnegative_int, default=d.seed, help=f"init, data split and batch order (default {d.seed})")
    add("--out", type=out_dir, default=d.out, metavar="DIR", help="output folder (default runs/<timestamp>)")
    add(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint under --out (default: newest run in runs/)",
    )
    add(
        "--json",
        nargs="?",
        const="-",
        type=out_file,
        default=None,
        metavar="FILE",
        help="print the final metrics as JSON on stdout (the log then goes to stderr), or write them to FILE",
    )
    add(
        "--devices",
        type=positive_int,
        default=d.devices,
        metavar="N",
        help="shard each batch over this many local devices (default: all)",
    )
    add(
        "--grad-check-tol",
        type=nonnegative_float,
        default=d.grad_check_tol,
        help=f"largest accepted relative error of the step-0 gradient check (default {d.grad_check_tol:g})",
    )
    add(
        "--no-grad-check",
        dest="skip_grad_check",
        action="store_true",
        help="train without the gradient check, or despite its failure",
    )
    add("--no-progress", dest="progress", action="store_false", help="no progress bar (one per epoch, on stderr)")
    add(
        "--dp-clip",
        type=float,
        default=d.dp_clip,
        metavar="C",
        help="train with DP-SGD: clip each example's gradient to norm C (needs --dp-noise; no BatchNorm models)",
    )
    add("--dp-noise", type=float, default=d.dp_noise, metavar="SIGMA", help="DP-SGD noise multiplier: std σ·C")
    add(
        "--dp-delta",
        type=float,
        default=d.dp_delta,
        metavar="DELTA",
        help=f"δ of the reported ε (default {d.dp_delta:g})",
    )
    add(
        "--dp-sampler",
        choices=dp.SAMPLERS,
        default=d.dp_sampler,
        help="DP-SGD batches: poisson (each example joins each step with probability batch/n; what ε accounts "
        "for; the default) or shuffle (fixed batches of a shuffled epoch: no ε is computed)",
    )
    add(
        "--dp-max-batch",
        type=positive_int,
        default=d.dp_max_batch,
        metavar="M",
        help="cap a Poisson batch at M examples (truncated Poisson sampling, accounted with PLD)",
    )
    add(
        "--dp-accountant",
        choices=dp.ACCOUNTANTS,
        default=d.dp_accountant,
        help="privacy accountant for ε (default: rdp; pld with --dp-max-batch)",
    )
    add(
        "--coordinator",
        metavar="HOST:PORT",
        help="several processes: process 0's address and a free port (default $JAX_COORDINATOR_ADDRESS); "
        "with --num-processes and --process-id",
    )
    add(
        "--num-processes",
        type=positive_int,
        metavar="N",
        help="several processes: how many (default $JAX_NUM_PROCESSES)",
    )
    add(
        "--process-id",
        type=nonnegative_int,
        metavar="I",
        help="several processes: this one's, 0..N-1 (default $JAX_PROCESS_ID)",
    )
    add(
        "--cluster",
        action="store_true",
        help="several processes under SLURM, Open MPI or on a TPU pod: jax.distributed.initialize() finds the rest",
    )
    add(
        "--join-timeout",
        type=positive_float,
        default=distributed.JOIN_TIMEOUT,
        metavar="S",
        help=f"seconds to wait for every process to join before stopping (default {distributed.JOIN_TIMEOUT})",
    )
    add(
        "--heartbeat-timeout",
        type=positive_int,
        default=distributed.HEARTBEAT_TIMEOUT,
        metavar="S",
        help=f"seconds without a heartbeat before a process counts as dead (default {distributed.HEARTBEAT_TIMEOUT})",
    )
    add(
        "--dp-insecure-seed",
        action="store_true",
        help="derive DP noise and batches from --seed: reproducible, NOT private (for tests and debugging)",
    )


def config(args: argparse.Namespace) -> train.TrainConfig:
    """The TrainConfig the parsed flags describe."""
    names = {f.name for f in dataclasses.fields(train.TrainConfig)}
    return train.TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


class ProgressBar(train.Observer):
    """A tqdm bar per epoch on stderr: steps done, the epoch's mean loss and accuracy, examples/s."""

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self.bar = tqdm(
            total=steps, desc=f"epoch {epoch + 1}/{epochs}", leave=False, file=sys.stderr, dynamic_ncols=True
        )

    def step(self, step, loss, accuracy, mean_loss, mean_accuracy, rate) -> None:
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{mean_accuracy:.4f}", ex_s=f"{rate:,.0f}", refresh=False)
        self.bar.update(1)

    def epoch_end(self, row: dict, tree: dict) -> None:
        self.bar.close()

    def stop(self, history: list[dict]) -> None:
        if getattr(self, "bar", None) is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    distributed.initialize(
        args.coordinator,
        args.num_processes,
        args.process_id,
        cluster=args.cluster,
        join_timeout=args.join_timeout,
        heartbeat_timeout=args.heartbeat_timeout,
    )
    # Process 0 alone speaks for a run of several processes: the log, the bar, the JSON.
    lead = jax.process_index() == 0
    observers = [train.Console(human(args))] + ([ProgressBar()] if args.progress else []) if lead else []
    try:
        metrics = train.train(config(args), observers)
    except distributed.ProcessLost as e:
        print(f"jax-resnet train: error: {e}", file=sys.stderr)
        distributed.leave(1)
    if lead:
        write_json(metrics, args.json)
    return 0
