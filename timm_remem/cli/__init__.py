"""The ``timm-remem`` command line: one module per sub-command, each with a ``register(subparsers)`` that sets ``func``.

Every command shares one error contract: bad input or usage (an argparse error, or a timm-remem error that is also a
``ValueError``, e.g. ``ConfigError``) exits 2, any other failure exits 1, each with one line on stderr; ``--debug``
(before or after the command) also prints the traceback; an interrupt exits 130.

Example:
    >>> build_parser().parse_args(["distill", "--model", "resnet18", "--epochs", "3"]).epochs
    3
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import NoReturn

from .._version import __version__
from ..errors import RememError
from . import analyze, demo, distill, finetune, inspect, push, select, study

__all__ = ["build_parser", "main", "exit_code"]

# Sub-command modules, in the order ``timm-remem --help`` lists them.
_COMMAND_MODULES = (finetune, distill, select, demo, study, inspect, analyze, push)

DEBUG_HELP = "on an error, also print the traceback (default: off)"


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (the usage of a training command is 40 lines long)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``timm-remem`` command with every sub-command registered."""
    parser = _Parser(
        prog="timm-remem",
        description="ReMem for timm: reweight and SAM-fine-tune a ViT teacher, then distill a small student.",
    )
    parser.add_argument("--version", action="version", version=f"timm-remem {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMAND_MODULES:
        module.register(subparsers)
    for sub in subparsers.choices.values():  # also after the command; absent there unless given
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def exit_code(error: BaseException) -> int:
    """The exit status for ``error``: 2 for bad input (an error that is also a ``ValueError``), else 1.

    Example:
        >>> from timm_remem.errors import ConfigError, TrainingError
        >>> exit_code(ConfigError("lr must be > 0")), exit_code(TrainingError("loss is nan")), exit_code(OSError())
        (2, 1, 1)
    """
    return 2 if isinstance(error, RememError) and isinstance(error, ValueError) else 1


def _one_line(error: BaseException) -> str:
    """The error as one line; an error we did not expect also names its type and asks for a report."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, (RememError, OSError, ImportError)):
        return text
    return f"{type(error).__name__}: {text} (unexpected: rerun with --debug and report the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code (2: bad usage or input, 1: a failure, 130: interrupted).

    Example:
        >>> main(["--version"])
        timm-remem ...
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed the help, the version or the problem
        return exit_.code if isinstance(exit_.code, int) else 2
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"timm-remem {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - every error becomes one line and an exit status
        if args.debug:
            traceback.print_exc()
        print(f"timm-remem {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return exit_code(error)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
