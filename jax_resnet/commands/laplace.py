"""`jax-resnet laplace RUN_DIR`: a Laplace approximation of a trained run against its MAP network
(`laplace.study`), in distribution and on rotated test images; written to RUN_DIR/laplace_<structure>_<subset>.json."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from jax_resnet import laplace
from jax_resnet.commands import add_json_flag, human, nonnegative_int, positive_float, positive_int, write_json


def run_dir(text: str) -> str:
    """A `jax-resnet train` run's folder: one with a checkpoints/ folder inside."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder; expected a `jax-resnet train` run's --out folder")
    if not (path / "checkpoints").is_dir():
        raise argparse.ArgumentTypeError(f"{text} has no checkpoints/ folder; expected a `jax-resnet train` run's")
    return text


def rotations(text: str) -> list[float]:
    """Comma-separated angles in degrees, e.g. 0,15,30."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated angles in degrees, e.g. 0,30,90, got {text!r}"
        ) from None
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("run_dir", type=run_dir, metavar="RUN_DIR", help="a `jax-resnet train` run's output folder")
    add("--structure", choices=laplace.STRUCTURES, default="diag", help="the GGN's structure (default diag)")
    add(
        "--subset",
        choices=laplace.SUBSETS,
        default="last_layer",
        help="the parameters with a posterior: last_layer (default: the head; the rest stay at the MAP) or all",
    )
    add(
        "--rotations",
        type=rotations,
        default=list(laplace.ROTATIONS),
        metavar="DEG,DEG,...",
        help=f"test-set rotations in degrees (default {','.join(map(str, laplace.ROTATIONS))})",
    )
    add(
        "--samples",
        type=positive_int,
        default=100,
        metavar="S",
        help="parameter draws of the predictive (default 100)",
    )
    add(
        "--predictive",
        choices=laplace.PREDICTIVES,
        default="glm",
        help="glm: the linearised network (default); nn: the network at sampled parameters",
    )
    add(
        "--curvature-samples",
        type=positive_int,
        metavar="M",
        help="Monte Carlo GGN from M sampled labels per example (default: exact, one backward per class)",
    )
    add(
        "--prior-precision",
        type=positive_float,
        metavar="LAMBDA",
        help="fix the prior precision (default: maximise the marginal likelihood)",
    )
    add("--batch-size", type=positive_int, default=500, metavar="N", help="examples per batch (default 500)")
    add("--test-examples", type=positive_int, metavar="N", help="only the first N test examples (default: all)")
    add("--seed", type=nonnegative_int, default=0, help="of the sampled labels and parameter draws (default 0)")
    add_json_flag(parser, "the result (also written to RUN_DIR/laplace_<structure>_<subset>.json)")


def run(args: argparse.Namespace) -> int:
    out = human(args)
    result = laplace.study(
        args.run_dir,
        structure=args.structure,
        subset=args.subset,
        rotations=args.rotations,
        samples=args.samples,
        method=args.predictive,
        curvature_samples=args.curvature_samples,
        prior_precision=args.prior_precision,
        batch_size=args.batch_size,
        test_examples=args.test_examples,
        seed=args.seed,
        log=functools.partial(print, file=out),
    )
    path = laplace.write(result, Path(args.run_dir) / f"laplace_{args.structure}_{args.subset}.json")
    write_json(result, args.json)
    print(f"\n{laplace.format_table(result)}\n\nwrote {path} in {result['timing_s']['total']:.0f} s", file=out)
    return 0
