"""``timm-remem finetune``: fine-tune a ViT teacher, with ReMem reweighting (``--alpha``) and SAM (``--rho``).

The flags are :class:`~timm_remem.train.FinetuneConfig`'s fields (see :mod:`timm_remem.cli._config_flags`). Runs
unchanged under ``torchrun --nproc_per_node N``; only rank 0 prints and writes files.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="timm-remem")
    >>> register(parser.add_subparsers(dest="command"))
    >>> options(parser.parse_args(["finetune", "--model", "test_vit", "--alpha", "0.85", "--rho", "0.05"]))
    {'model': 'test_vit', 'rho': 0.05, 'alpha': 0.85}
"""

from __future__ import annotations

import argparse
from typing import Any

from ..train import finetune_teacher
from ..train.config import FinetuneConfig
from ._config_flags import add_config_command, command_options
from ._runtime import run_on_ranks

__all__ = ["register", "options", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    add_config_command(
        subparsers, "finetune", FinetuneConfig, run,
        help="fine-tune a ViT teacher, with ReMem reweighting (--alpha) and SAM (--rho)",
        description="Fine-tune a teacher from any timm name (hf-hub: and local-dir: included). --alpha reweights "
        "its MLP residual branches, --rho trains it with SAM; merged checkpoints are exported at --save-at epochs "
        "to OUTPUT/checkpoints/epoch-NNN (plain timm format).",
        model_help="teacher: a timm name, hf-hub:org/name or local-dir:/path",
    )


def options(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given (``--config`` file, then flags), checked."""
    return command_options(args, FinetuneConfig, command="finetune")


def run(args: argparse.Namespace) -> int:
    """Fine-tune the teacher and print its accuracy and checkpoints; returns the exit code."""
    given = options(args)
    return run_on_ranks(
        lambda: finetune_teacher(**given),
        lambda r: f"teacher val acc {r.val_acc:.4f}; checkpoints: {', '.join(str(p) for p in r.checkpoints)}",
    )
