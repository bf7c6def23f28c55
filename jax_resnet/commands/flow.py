"""`jax-resnet flow`: gradient flow in plain vs residual networks (`flow.study`), written to --out."""

from __future__ import annotations

import argparse
import functools
import os

from jax_resnet import flow, models, step
from jax_resnet.commands import add_json_flag, human, nonnegative_int, out_dir, positive_int, write_json
from jax_resnet.ops import GRAD_MODES


def cifar_depth(text: str) -> int:
    """A depth `models.cifar_resnet` accepts (6n+2); its own check words the error."""
    depth = positive_int(text)
    try:
        models.cifar_resnet(depth)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return depth


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--out",
        type=out_dir,
        default=os.path.join("runs", "flow"),
        metavar="DIR",
        help="folder for flow.json and flow.png (default runs/flow)",
    )
    add(
        "--depths",
        type=cifar_depth,
        nargs="+",
        metavar="D",
        help=f"CIFAR net depths, 6n+2 (default {' '.join(map(str, flow.CIFAR_DEPTHS))})",
    )
    add(
        "--mlp-depths",
        type=positive_int,
        nargs="+",
        metavar="D",
        help=f"MLP depths (default {' '.join(map(str, flow.MLP_DEPTHS))})",
    )
    add(
        "--train-depth",
        type=positive_int,
        metavar="D",
        help=f"MLP depth of the training comparison (default {flow.TRAIN_DEPTH})",
    )
    add("--steps", type=positive_int, metavar="N", help=f"training steps per model (default {flow.TRAIN_STEPS})")
    add(
        "--optimizer",
        choices=sorted(flow.LEARNING_RATES),
        default="momentum",
        help=f"momentum ({step.MOMENTUM}, lr {flow.LEARNING_RATES['momentum']}) or adam (lr {flow.LEARNING_RATES['adam']})",
    )
    add("--seed", type=nonnegative_int, default=0)
    add("--grad", choices=list(GRAD_MODES), default="rules", help="hand-derived VJPs or JAX autodiff")
    add("--quick", action="store_true", help="depth-8 CIFAR nets, small MLPs, 20 steps (under a minute; for tests)")
    add_json_flag(parser, "the result (also written to DIR/flow.json)")


def run(args: argparse.Namespace) -> int:
    out = human(args)
    result = flow.study(
        args.depths,
        args.mlp_depths,
        args.train_depth,
        args.steps,
        optimizer=args.optimizer,
        seed=args.seed,
        grad=args.grad,
        quick=args.quick,
        log=functools.partial(print, file=out),
    )
    json_path, png_path = flow.write(result, args.out)
    write_json(flow.to_json(result), args.json)
    print(
        f"\n{flow.format_table(result)}\n\nwrote {json_path} and {png_path} in {result['timing_s']['total']:.0f} s",
        file=out,
    )
    return 0
