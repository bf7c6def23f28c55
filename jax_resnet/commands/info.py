"""`jax-resnet info MODEL`: layers, parameter count and FLOPs of a preset."""

from __future__ import annotations

import argparse

from jax_resnet import models
from jax_resnet.commands import add_json_flag, human, positive_int, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        choices=list(models.PRESETS),
        metavar="MODEL",
        help="preset name, e.g. resnet20, resnet50, residual_mlp",
    )
    parser.add_argument(
        "--input-size",
        type=positive_int,
        nargs="+",
        metavar="N",
        help="one example's shape, e.g. 224 224 3 (default: the preset's usual input)",
    )
    parser.add_argument("--num-classes", type=positive_int, metavar="K")
    add_json_flag(parser, "{model, params, flops, layers, input_shape}")


def _si(n: float) -> str:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g} {prefix}"
    return f"{n:.0f} "


def run(args: argparse.Namespace) -> int:
    model = models.get(args.model)
    shape = model.spec.input_shape() if args.input_size is None else tuple(args.input_size)
    try:
        if args.input_size is not None or args.num_classes is not None:
            model = model.for_data(shape, args.num_classes)
        info = models.summary(model, shape)
    except ValueError as e:
        if args.input_size is None:
            raise
        raise ValueError(f"--input-size {' '.join(map(str, shape))} does not fit {args.model}: {e}") from e
    out = human(args)
    print("\n".join(info["layers"]), file=out)
    print(
        f"input {'x'.join(map(str, shape))}: {info['params']:,} parameters, "
        f"{_si(info['flops'])}FLOPs per forward pass (XLA count, multiply-add = 2)",
        file=out,
    )
    write_json(info, args.json)
    return 0
