"""Distillation losses, teacher handling and a timm-style distillation task.

One concern per module (see ``docs/distill.md`` for the full story and where each piece extends timm):

- ``functional``: ``kd_loss`` (Hinton logit KD, ``T^2 * KL``), ``dist_loss`` (DIST, Huang et al. 2022) and
  ``spectral_loss`` (Distillation Dynamics' spectral feature loss) as pure functions.
- ``losses``: ``task_loss`` (hard labels, label smoothing or soft mixup/cutmix targets; the trainer's task loss too)
  and ``DistillationLoss``: the task loss plus one distillation term (``"kd"``, ``"hard"`` or ``"dist"``) with
  explicit weights.
- ``features``: ``FeatureDistillation``, spectral or trainable-projector feature losses over (student, teacher) block
  pairs taken from ``forward_intermediates`` (early pairs by default, a logged warning for late pairs), and
  ``DistillationStudent``, the student plus its projectors as one trainable module.
- ``teacher``: ``Teacher``, a frozen, always-eval ``timm.task.DistillationTeacher`` that re-normalises and resizes
  the student's input, refuses a class count that differs from the student's, and can serve logits from a cache.
- ``cache``: ``TeacherLogitCache`` (teacher logits by dataset index) and ``precompute_teacher_logits``.
- ``task``: ``RememDistillationTask``, a ``timm.task.TrainingTask`` that ties them together (``forward(input,
  target)`` returns a dict with ``loss`` and ``output``) and accepts precomputed teacher logits so SAM's second pass
  reuses them.

Example:
    >>> import torch
    >>> from timm_remem.distill import DistillationLoss
    >>> loss = DistillationLoss("kd", temperature=4.0)
    >>> float(loss(torch.zeros(2, 5), torch.zeros(2, 5), torch.tensor([0, 1]))) > 0  # the task term of uniform logits
    True
"""

from __future__ import annotations

from .cache import TeacherLogitCache, precompute_teacher_logits
from .features import FEATURE_KINDS, DistillationStudent, FeatureDistillation
from .functional import dist_loss, kd_loss, spectral_loss
from .losses import DISTILL_METHODS, DistillationLoss, task_loss
from .task import RememDistillationTask
from .teacher import Teacher

__all__ = [
    "kd_loss",
    "dist_loss",
    "spectral_loss",
    "task_loss",
    "DistillationLoss",
    "FeatureDistillation",
    "DistillationStudent",
    "Teacher",
    "TeacherLogitCache",
    "precompute_teacher_logits",
    "RememDistillationTask",
    "DISTILL_METHODS",
    "FEATURE_KINDS",
]
