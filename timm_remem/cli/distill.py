"""``timm-remem distill``: distill a student from a teacher checkpoint (or train it alone, the baseline).

The flags are :class:`~timm_remem.train.DistillConfig`'s fields (see :mod:`timm_remem.cli._config_flags`). Runs
unchanged under ``torchrun --nproc_per_node N``; only rank 0 prints and writes files.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="timm-remem")
    >>> register(parser.add_subparsers(dest="command"))
    >>> options(parser.parse_args(["distill", "--model", "resnet18", "--teacher", "runs/t/checkpoints/epoch-003",
    ...                            "--cache-teacher", "off"]))
    {'model': 'resnet18', 'teacher': 'runs/t/checkpoints/epoch-003', 'cache_teacher': False}
"""

from __future__ import annotations

import argparse
from typing import Any

from ..train import distill_student
from ..train.config import DistillConfig
from ._config_flags import add_config_command, command_options
from ._runtime import run_on_ranks

__all__ = ["register", "options", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    add_config_command(
        subparsers, "distill", DistillConfig, run,
        help="distill a student from a teacher checkpoint (or train it alone)",
        description="Distill a student (any timm name: resnet18, mobilenetv2_100, ...) from a teacher: a checkpoint "
        "folder written by finetune, hf-hub:org/name, local-dir:/path or a timm name. Without --teacher the "
        "student is trained alone (the baseline).",
        model_help="student: a timm name",
    )


def options(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given (``--config`` file, then flags), checked."""
    return command_options(args, DistillConfig, command="distill")


def run(args: argparse.Namespace) -> int:
    """Distill (or train) the student and print its accuracy; returns the exit code."""
    given = options(args)
    return run_on_ranks(lambda: distill_student(**given), _report)


def _report(result: Any) -> str:
    teacher = "" if result.teacher_acc is None else f" (teacher {result.teacher_acc:.4f})"
    return f"student val acc {result.val_acc:.4f}{teacher}; output: {result.output}"
