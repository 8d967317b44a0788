"""What the commands call when they run: the library (torch, timm and the training stack) and the rank-aware runner.

Imported only inside a command's ``run()`` (one import there), never at start-up, so that ``timm-remem --help``
and argument errors answer without importing torch or timm (see :mod:`timm_remem.cli`).

Example:
    >>> run_on_ranks(lambda: 41 + 1, lambda answer: f"answer: {answer}")
    answer: 42
    0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from timm import is_model

from .. import distributed
from .._models import create_timm_model
from ..reweighting import find_branches, get_scales, reweight
from ..train import distill_student, finetune_teacher, run_demo, select_teacher

__all__ = ["create_timm_model", "distill_student", "finetune_teacher", "find_branches", "get_scales", "is_model",
           "reweight", "run_demo", "run_on_ranks", "select_teacher"]


def run_on_ranks(call: Callable[[], Any], report: Callable[[Any], str]) -> int:
    """Run a library call of a training command; rank 0 prints ``report(result)``; the process group is always
    torn down (also under torchrun and after an error). Returns the exit code 0."""
    try:
        result = call()
        if distributed.is_main_process():
            print(report(result))
    finally:
        distributed.cleanup()
    return 0
