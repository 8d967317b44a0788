"""Training: fine-tune a teacher, distill a student, pick the best teacher checkpoint, run the demo.

- :func:`finetune_teacher`: a teacher from any timm name, optionally reweighted (``alpha``), with SAM (``rho``) or
  LoRA (``lora_rank``); merged, plain-timm checkpoints are exported at the ``save_at`` epochs.
- :func:`distill_student`: a student distilled from a teacher (a checkpoint folder, a timm name or a module), or
  trained alone with ``teacher=None``.
- :func:`select_teacher`: ReMem's protocol: a short distillation from every checkpoint of a folder, the best named.
- :func:`run_demo`: the offline demo on scikit-learn's digits.

A run writes ``config.json``, ``metrics.jsonl``, resumable ``train-state/step-*`` and ``checkpoints/epoch-NNN``
exports into its ``output`` folder. Under ``torchrun`` the same calls train with ``DistributedDataParallel``
(``batch_size`` per process; see ``docs/distributed.md``).

Example:
    >>> import tempfile
    >>> from timm_remem.train import distill_student
    >>> result = distill_student(model="test_resnet", img_size=16, epochs=1, limit_train_batches=1,
    ...                          save_at=[1], output=tempfile.mkdtemp(), progress=False)
    >>> [p.name for p in result.checkpoints], result.teacher_acc
    (['epoch-001'], None)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Public name -> the module it is loaded from on first use (PEP 562), so that ``import timm_remem.train.config``
# (which the ``timm-remem`` flags are generated from) imports neither torch nor timm.
_LAZY = {
    **dict.fromkeys(("TrainConfig", "FinetuneConfig", "DistillConfig"), "config"),
    **dict.fromkeys(("DEMO_ALPHA", "DEMO_RHO", "DEMO_STUDENT", "DEMO_STUDENT_KWARGS", "DEMO_TEACHER",
                     "DEMO_TEACHER_KWARGS"), "demo"),
    "run_demo": "timm_remem.study.demo",  # the demo is a small study; the study room sits above this one
    **dict.fromkeys(("distill_student", "finetune_teacher"), "recipes"),
    **dict.fromkeys(("DemoResult", "SelectResult", "TrainResult"), "results"),
    **dict.fromkeys(("EXPORT_DIR", "METRICS_FILE", "STATE_DIR"), "resume"),
    **dict.fromkeys(("select_teacher", "spearman"), "select"),
}

if TYPE_CHECKING:
    from ..study.demo import run_demo
    from .config import DistillConfig, FinetuneConfig, TrainConfig
    from .demo import DEMO_ALPHA, DEMO_RHO, DEMO_STUDENT, DEMO_STUDENT_KWARGS, DEMO_TEACHER, DEMO_TEACHER_KWARGS
    from .recipes import distill_student, finetune_teacher
    from .results import DemoResult, SelectResult, TrainResult
    from .resume import EXPORT_DIR, METRICS_FILE, STATE_DIR
    from .select import select_teacher, spearman

__all__ = ["TrainConfig", "FinetuneConfig", "DistillConfig", "TrainResult", "SelectResult", "DemoResult",
           "finetune_teacher", "distill_student", "select_teacher", "run_demo", "spearman", "METRICS_FILE",
           "STATE_DIR", "EXPORT_DIR", "DEMO_TEACHER", "DEMO_TEACHER_KWARGS", "DEMO_STUDENT", "DEMO_STUDENT_KWARGS",
           "DEMO_ALPHA", "DEMO_RHO"]


def __getattr__(name: str):
    if name in _LAZY:
        where = _LAZY[name]
        value = getattr(importlib.import_module(where if "." in where else f"{__name__}.{where}"), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
