"""The ``timm-remem`` command line: one module of this package per sub-command.

Each command module defines ``register(subparsers)``, which adds its parser and sets ``func`` (called with the
parsed arguments, returns an exit code). :data:`_COMMAND_MODULES` lists them in the order ``timm-remem --help``
shows them.

Example:
    >>> build_parser().parse_args(["distill", "--model", "resnet18", "--epochs", "3"]).epochs
    3
"""

from __future__ import annotations

import argparse
import sys

from .._version import __version__
from ..errors import RememError
from . import analyze, demo, distill, finetune, inspect, push, select

__all__ = ["build_parser", "main"]

# Sub-command modules, in the order ``timm-remem --help`` lists them.
_COMMAND_MODULES = (finetune, distill, select, demo, inspect, analyze, push)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``timm-remem`` command with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="timm-remem",
        description="ReMem for timm: reweight and SAM-fine-tune a ViT teacher, then distill a small student.",
    )
    parser.add_argument("--version", action="version", version=f"timm-remem {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code (2: bad usage or a refused input, 130: interrupted).

    Example:
        >>> main(["--version"])
        timm-remem ...
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse already printed the usage and the problem
        return int(exit_.code or 0)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except RememError as error:  # our errors already say what went wrong and how to fix it
        print(f"timm-remem {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"timm-remem {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
