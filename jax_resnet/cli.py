"""The `jax-resnet` command line: a thin layer over the library.

    jax-resnet verify [--dtype float64|float32] [--json FILE] [--rule NAME ...]
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jax-resnet", description="Residual networks with hand-derived gradients in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("verify", help="check every registered rule against jax autodiff and finite differences")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--rule", action="append", metavar="NAME", help="check only this rule (repeatable)")
    p.set_defaults(run=_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
