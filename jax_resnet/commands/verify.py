"""`jax-resnet verify`: every registered rule against jax autodiff and finite differences."""

from __future__ import annotations

import argparse

from jax_resnet import rules, verify
from jax_resnet.commands import add_json_flag, human, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype", choices=["float64", "float32"], default="float64", help="dtype of the comparison (default float64)"
    )
    parser.add_argument(
        "--rule",
        action="append",
        choices=sorted(rules.REGISTRY),
        metavar="NAME",
        help="check only this rule (repeatable; default: all)",
    )
    add_json_flag(parser, "the rows")


def run(args: argparse.Namespace) -> int:
    rows = verify.verify(args.dtype, args.rule)
    print(verify.format_table(rows), file=human(args))
    write_json(rows, args.json)
    return 0 if all(r["ok"] for r in rows) else 1
