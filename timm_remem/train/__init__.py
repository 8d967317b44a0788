"""Training: fine-tune a teacher, distill a student, pick the best teacher checkpoint, run the demo.

Four library calls, each the body of a ``timm-remem`` sub-command:

- :func:`finetune_teacher`: a teacher from any timm name (``hf-hub:`` and ``local-dir:`` included), optionally
  reweighted (``alpha``/``schedule``/``top_k``, see :func:`timm_remem.reweight`) and fine-tuned with SAM
  (``rho``/``adaptive``, see :class:`timm_remem.sam.SAM`); merged, plain-timm checkpoints are exported at the epochs
  in ``save_at``.
- :func:`distill_student`: a student from any timm name distilled from a teacher (a checkpoint folder, a timm or
  ``hf-hub:`` name, or a module); ``teacher=None`` trains the student alone (the no-teacher baseline).
- :func:`select_teacher`: ReMem's protocol: a short distillation from every checkpoint in a folder, a table and a
  plot of student accuracy per checkpoint, the best one named. Inputs are deterministic there, so the teacher runs
  once per training sample and its logits are cached for later epochs.
- :func:`run_demo`: the offline demo on scikit-learn's digits (plain vs ReMem teacher, a small CNN student from each,
  plus the student alone).

Where each part lives: ``config`` (the settings, with their command-line help), ``results``, ``builders`` (device,
DDP, model, data, optimizer, schedule, AMP, EMA, Mixup), ``loop`` (the training loop), ``resume`` (the run folder and
resuming), ``recipes`` (fine-tune and distill), ``select`` and ``demo``.

Every run writes into its ``output`` folder: ``config.json``; ``metrics.jsonl`` (one JSON object per epoch);
``train-state/step-*`` (resumable training checkpoints, safetensors + JSON, see :mod:`timm_remem.checkpoint`);
``checkpoints/epoch-NNN`` (exports written with :func:`timm_remem.hub.save_pretrained`, loadable by plain timm).
Training builds on timm: ``timm.data`` (datasets, transforms, ``Mixup``), ``timm.optim.create_optimizer_v2``,
``timm.scheduler.create_scheduler_v2``, ``timm.utils.ModelEmaV3`` and ``dispatch_clip_grad``.

Under ``torchrun --nproc_per_node N`` the same calls train with ``DistributedDataParallel`` (nccl on CUDA, gloo on
the CPU; see :mod:`timm_remem.distributed`): ``batch_size`` is per process, each rank takes a disjoint shard of every
epoch's permutation, metrics are reduced over ranks, rank 0 alone writes files, and SAM perturbs each replica by its
own gradient. See ``docs/distributed.md``.

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

# Public name -> the module of this package it is loaded from on first use (PEP 562). ``import
# timm_remem.train.config`` (the settings, which the ``timm-remem`` flags are generated from) thus imports neither
# torch nor timm; everything else loads when it is first used.
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

__all__ = [
    "TrainConfig",
    "FinetuneConfig",
    "DistillConfig",
    "TrainResult",
    "SelectResult",
    "DemoResult",
    "finetune_teacher",
    "distill_student",
    "select_teacher",
    "run_demo",
    "spearman",
    "METRICS_FILE",
    "STATE_DIR",
    "EXPORT_DIR",
    "DEMO_TEACHER",
    "DEMO_TEACHER_KWARGS",
    "DEMO_STUDENT",
    "DEMO_STUDENT_KWARGS",
    "DEMO_ALPHA",
    "DEMO_RHO",
]


def __getattr__(name: str):
    if name in _LAZY:
        where = _LAZY[name]
        value = getattr(importlib.import_module(where if "." in where else f"{__name__}.{where}"), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
