"""The ``timm-remem`` command line: one module of this package per sub-command.

Each command module defines ``register(subparsers)``, which adds its parser and sets ``func`` (called with the
parsed arguments, returns an exit code). :data:`_COMMAND_MODULES` lists them in the order ``timm-remem --help``
shows them.

Start-up: ``--help``, ``--version``, ``COMMAND --help`` and argument errors answer without importing torch or timm.
A command module therefore imports only light modules at its top (argparse, the config dataclasses, the errors);
the library it calls is imported inside its ``run()`` (``tests/cli/test_cli_startup.py`` checks every module).

The error contract, the same for every command:

- bad input or usage (an argparse error, a :class:`~timm_remem.errors.ConfigError` or any other timm-remem error
  that is also a ``ValueError``, such as the missing-extra errors ``PeftMissingError`` and ``YamlMissingError``):
  exit status 2 and one line ``timm-remem COMMAND: error: ...`` on stderr;
- a failure while running (:class:`~timm_remem.errors.TrainingError`, ``CheckpointError``, ``HubError``, an
  ``OSError``, any other exception): exit status 1 and one line;
- ``--debug`` (before or after the command) also prints the traceback; an interrupt exits with 130.

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
