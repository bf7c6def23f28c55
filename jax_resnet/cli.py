"""The `jax-resnet` command line: parses flags and calls the library.

    jax-resnet train  [--model resnet8] [--dataset digits] ...   (the main job; --help lists all flags)
    jax-resnet verify [--dtype float64|float32] [--rule NAME ...] [--json [FILE]]
    jax-resnet info MODEL [--input-size N ...] [--num-classes K] [--json [FILE]]
    jax-resnet flow   [--out runs/flow] [--quick] [--json [FILE]]
    jax-resnet bench  [--quick] [--workload NAME ...] [--json [FILE]] [--markdown FILE]

`python -m jax_resnet ...` is the same command. Each command's flags and run
live in `jax_resnet/commands/<command>.py`; its module is imported only when
that command runs (`jax-resnet verify` loads neither flax nor orbax nor optax).

Exit status, mapped here once for every command:

    0    done
    1    the job ran and failed: a rule failed `verify`, or training stopped
         (`train.TrainingError`: a failed gradient check, a NaN)
    2    a user error: a bad flag, a missing or unreadable file, an output path
         that cannot be written (`ValueError` and its subclasses such as
         `data.DataError`, `FileNotFoundError`, `NotADirectoryError`, ...),
         reported as one line `jax-resnet <command>: error: <message>`
    130  interrupted (Ctrl-C)

Any other exception is a bug in the library and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> one line of help; the module is jax_resnet.commands.<name>.
COMMANDS = {
    "train": "train a residual network with hand-derived gradients (the main job)",
    "verify": "check every registered rule against jax autodiff and finite differences",
    "info": "layers, parameter count and FLOPs of a model preset",
    "flow": "gradient norm per layer, plain vs residual networks, and a short training comparison",
    "bench": "training-step time and compiled memory: rules vs autodiff vs a Flax peer",
}
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)


class UsageError(ValueError):
    """A flag argparse rejected; `prog` is the (sub)command that rejected it."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    # argparse would print the whole usage and exit; one line and a status of 2 from `main` instead.
    def error(self, message: str):
        raise UsageError(self.prog, message)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of `command` (its flags, and the others' names only), so that
    parsing one command imports no other command's library."""
    parser = _Parser(prog="jax-resnet", description="Residual networks with hand-derived gradients in JAX.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        if name == command:
            _module(name).add_arguments(p)
    return parser


def _module(name: str):
    return importlib.import_module(f"jax_resnet.commands.{name}")


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.strerror}: {e.filename}"
    return " ".join(str(e).split())


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    prog = "jax-resnet" if command is None else f"jax-resnet {command}"
    try:
        args = build_parser(command).parse_args(argv)
    except UsageError as e:
        print(f"{e.prog}: error: {e} (see {e.prog} --help)", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    assert command is not None, "the parser accepts no arguments without a command"
    module = _module(command)
    try:
        return module.run(args)
    except KeyboardInterrupt:
        note = getattr(module, "INTERRUPTED", "")
        print(f"{prog}: interrupted" + (f"; {note}" if note else ""), file=sys.stderr)
        return 130
    except getattr(module, "FAILURES", ()) as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except USER_ERRORS as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
