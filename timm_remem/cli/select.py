"""``timm-remem select``: ReMem's protocol, a short distillation from each teacher checkpoint, keep the best.

The flags are the :class:`~timm_remem.train.DistillConfig` fields the short distillations use, as in ``distill``,
less the teacher, checkpoint and resume flags (:func:`~timm_remem.train.select_teacher` sets those itself).

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="timm-remem")
    >>> register(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["select", "runs/t/checkpoints", "--model", "resnet18", "--epochs", "2"])
    >>> args.teachers, options(args)
    ('runs/t/checkpoints', {'model': 'resnet18', 'epochs': 2})
"""

from __future__ import annotations

import argparse
from typing import Any

from ..train import select_teacher
from ..train.config import DistillConfig
from ._config_flags import add_config_command, command_options
from ._runtime import run_on_ranks

__all__ = ["register", "options", "run", "EXCLUDED"]

# DistillConfig fields without a select flag: the teachers are the positional argument, and select_teacher exports
# no checkpoints, writes no training state, starts every distillation afresh and ranks plain (not EMA) students.
EXCLUDED = ("teacher", "save_at", "save_state", "checkpoint_every", "keep_last", "resume", "resume_mismatch", "ema",
            "ema_decay")
# select_teacher's own defaults where they differ from DistillConfig's (shown in --help; applied by select_teacher).
_DEFAULTS = {"epochs": 3, "output": "runs/select"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_config_command(
        subparsers, "select", DistillConfig, run, exclude=EXCLUDED, defaults=_DEFAULTS,
        help="ReMem's protocol: short distillation from each teacher checkpoint, keep the best",
        description="Distill the student briefly from every checkpoint in TEACHERS (e.g. runs/teacher/checkpoints) "
        "with cached teacher logits, print a table, save OUTPUT/select.png and name the best checkpoint.",
        model_help="student: a timm name",
    )
    p.add_argument("teachers", help="folder of teacher checkpoint folders (or a finetune run folder)")
    p.add_argument("--mi-score", dest="mi_score", action="store_true",
                   help="also rank checkpoints by an MI-based score and report its Spearman correlation "
                   "(default: off)")


def options(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given (``--config`` file, then flags), checked."""
    return command_options(args, DistillConfig, command="select", exclude=EXCLUDED, defaults=_DEFAULTS)


def run(args: argparse.Namespace) -> int:
    """Distill briefly from each checkpoint, print the table and the best checkpoint; returns the exit code."""
    given = options(args)
    printed = given.get("progress", True)  # select_teacher printed the table itself

    def report(result: Any) -> str:
        return ("" if printed else result.table + "\n") + f"best teacher checkpoint: {result.best}"

    return run_on_ranks(lambda: select_teacher(args.teachers, mi_score=args.mi_score, **given), report)
