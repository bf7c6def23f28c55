"""The commands of `jax-resnet`, one module each, and what they share.

A command module has `add_arguments(parser)` and `run(args) -> int` (the exit
status), and may name `FAILURES` (exception types that mean "the job failed",
exit status 1) and `INTERRUPTED` (what to tell a user after Ctrl-C). It
imports its library module at the top: `jax_resnet.cli` imports a command
module only when that command runs, so `jax-resnet verify` never loads flax,
orbax or optax.

Flags are checked where they are parsed: the types below raise
`argparse.ArgumentTypeError`, which argparse reports as
`argument --flag: <what was expected>`, before any work starts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


# ------------------------------------------------------------- argument types
def _number(kind, text: str, expected: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(int, text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(int, text, "an integer ≥ 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer ≥ 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text, "a positive finite number")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(float, text, "a finite number ≥ 0")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number ≥ 0, got {text}")
    return value


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def out_dir(text: str) -> str:
    """A folder to write into: an existing folder, or one that can be created."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; expected a folder")
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise argparse.ArgumentTypeError(f"cannot create the folder {text}: {ancestor} is a file")
    return text


def out_file(text: str) -> str:
    """A file to write: "-" (stdout), or a path whose folder exists."""
    if text == "-":
        return text
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; expected a file name")
    folder = path.parent
    if not folder.is_dir():
        what = "is a file" if folder.exists() else "does not exist"
        raise argparse.ArgumentTypeError(f"cannot write {text}: the folder {folder} {what}")
    return text


# ------------------------------------------------------------------ JSON output
def add_json_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """`--json [FILE]`, the same in every command: bare, JSON on stdout (and the
    human-readable output on stderr); with FILE, written there."""
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        type=out_file,
        metavar="FILE",
        help=f"print {what} as JSON on stdout (the table then goes to stderr), or write them to FILE",
    )


def human(args: argparse.Namespace):
    """Where the human-readable output goes: stderr when stdout carries the JSON."""
    return sys.stderr if getattr(args, "json", None) == "-" else sys.stdout


def write_json(obj, dest: str | None) -> None:
    """Print `obj` (or JSON text) on stdout when `dest` is "-", write it to `dest`, or nothing when None."""
    if dest is None:
        return
    text = obj if isinstance(obj, str) else json.dumps(obj, indent=2)
    if dest == "-":
        print(text)
    else:
        Path(dest).write_text(text + "\n")
