"""The rank-aware runner of the training commands (finetune, distill, select).

Example:
    >>> run_on_ranks(lambda: 41 + 1, lambda answer: f"answer: {answer}")
    answer: 42
    0
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import distributed

__all__ = ["run_on_ranks"]


def run_on_ranks(call: Callable[[], Any], report: Callable[[Any], str]) -> int:
    """Run ``call``; rank 0 prints ``report(result)``; the process group is always torn down. Returns 0."""
    try:
        result = call()
        if distributed.is_main_process():
            print(report(result))
    finally:
        distributed.cleanup()
    return 0
