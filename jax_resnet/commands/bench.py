"""`jax-resnet bench`: one training step, rules vs autodiff vs a Flax peer (`bench.benchmark`); with --dp the
DP-SGD step, with --curvature the curvature quantities, with --ablate one rule family at a time."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from jax_resnet import bench
from jax_resnet.commands import add_json_flag, human, out_file, positive_float, positive_int, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = [w.name for w in bench.WORKLOADS]
    add = parser.add_argument
    add(
        "--workload",
        action="append",
        choices=names,
        metavar="NAME",
        help=f"run only this workload (repeatable): {', '.join(names)} (the dp_ ones with --dp, the curvature_ ones "
        "with --curvature, the others with neither)",
    )
    add("--quick", action="store_true", help="tiny sizes and few rounds (a smoke test; the numbers mean nothing)")
    add(
        "--rounds",
        type=positive_int,
        metavar="N",
        help=f"timed rounds per workload (default {bench.ROUNDS}, quick 3; fewer, but at least 5, "
        "when a workload has timed for 150 s)",
    )
    add(
        "--round-seconds",
        type=positive_float,
        metavar="S",
        help=f"the least time each method runs per round (default {bench.ROUND_SECONDS:g}, quick 0.01); "
        "longer rounds narrow the spread of the ratios",
    )
    add(
        "--dp",
        action="store_true",
        help="instead: the DP-SGD step vs the non-private step, jax.vmap(jax.grad) + optax clipping, and jax_privacy "
        "where installed (the dp_ workloads)",
    )
    add(
        "--curvature",
        action="store_true",
        help="instead: diag_ggn_mc, diag_ggn and kfac (where this version has it) vs a training step and a backward "
        "pass, and vs jax.vmap(jax.jacrev) and kfac-jax where installed (the curvature_ workloads)",
    )
    add(
        "--ablate",
        action="store_true",
        help="instead: the training step with one rule family at a time swapped for autodiff (default workload "
        "resnet20): which rule makes the step faster or slower than jax.grad's",
    )
    add_json_flag(parser, "the rows")
    add("--markdown", type=out_file, metavar="FILE", help="also write a Markdown table with the goals, for the README")


def run(args: argparse.Namespace) -> int:
    log = functools.partial(print, file=sys.stderr, flush=True)
    rows = bench.benchmark(
        args.workload,
        dp=args.dp,
        curvature=args.curvature,
        ablate=args.ablate,
        quick=args.quick,
        rounds=args.rounds,
        round_seconds=args.round_seconds,
        log=log,
    )
    if args.ablate:
        table = markdown = bench.format_ablation_table
    elif args.dp:
        table, markdown = bench.format_dp_table, bench.format_dp_markdown
    elif args.curvature:
        table, markdown = bench.format_curvature_table, bench.format_curvature_markdown
    else:
        table, markdown = bench.format_table, bench.format_markdown
    print(table(rows), file=human(args))
    write_json(rows, args.json)
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows))
    return 0
