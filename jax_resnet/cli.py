"""The `jax-resnet` command line: a thin layer over the library.

jax-resnet train  [--model resnet8] [--dataset digits] ...   (the main job; --help lists all flags)
jax-resnet verify [--dtype float64|float32] [--json FILE] [--rule NAME ...]
jax-resnet flow   [--out runs/flow] [--quick]
jax-resnet bench  [--quick] [--json FILE] [--markdown FILE]
jax-resnet info MODEL [--input-size H W C] [--num-classes K] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys


def _verify(args) -> int:
    from jax_resnet import verify

    rows = verify.verify(args.dtype, args.rule)
    print(verify.format_table(rows))
    if args.json:
        verify.write_json(rows, args.json)
    return 0 if all(r["ok"] for r in rows) else 1


def _si(n: float) -> str:
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g} {prefix}"
    return f"{n:.0f} "


def _info(args) -> int:
    import json

    from jax_resnet import models

    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    model = models.get(args.model, **kwargs)
    if args.input_size is not None:
        shape = tuple(args.input_size)
    elif isinstance(model.spec, models.MLPSpec):
        shape = (model.spec.in_features,)
    else:
        shape = (
            (224, 224, model.spec.in_channels) if model.spec.stem == "imagenet" else (32, 32, model.spec.in_channels)
        )
    info = models.summary(model, shape)
    print("\n".join(info["layers"]))
    print(
        f"input {'x'.join(map(str, shape))}: {info['params']:,} parameters, {_si(info['flops'])}FLOPs per forward pass (XLA count, multiply-add = 2)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jax-resnet", description="Residual networks with hand-derived gradients in JAX."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    from jax_resnet import bench, flow, train

    p = sub.add_parser("train", help="train a residual network with hand-derived gradients (the main job)")
    train.add_arguments(p)
    p.set_defaults(run=train.run)

    p = sub.add_parser("verify", help="check every registered rule against jax autodiff and finite differences")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--rule", action="append", metavar="NAME", help="check only this rule (repeatable)")
    p.set_defaults(run=_verify)

    p = sub.add_parser("info", help="layers, parameter count and FLOPs of a model preset")
    p.add_argument("model", help="preset name, e.g. resnet20, resnet50, residual_mlp")
    p.add_argument(
        "--input-size",
        type=int,
        nargs="+",
        metavar="N",
        help="one example's shape, e.g. 224 224 3 (default: the preset's usual input)",
    )
    p.add_argument("--num-classes", type=int)
    p.add_argument("--json", metavar="FILE", help="also write {model, params, flops, layers, input_shape} as JSON")
    p.set_defaults(run=_info)

    p = sub.add_parser(
        "flow", help="gradient norm per layer, plain vs residual networks, and a short training comparison"
    )
    flow.add_arguments(p)
    p.set_defaults(run=flow.run)

    p = sub.add_parser("bench", help="training-step time and compiled memory: rules vs autodiff vs a Flax peer")
    bench.add_arguments(p)
    p.set_defaults(run=bench.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
