"""Distillation losses, teacher handling and a timm-style distillation task (see ``docs/distill.md``).

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
    "kd_loss", "dist_loss", "spectral_loss", "task_loss", "DistillationLoss", "FeatureDistillation",
    "DistillationStudent", "Teacher", "TeacherLogitCache", "precompute_teacher_logits", "RememDistillationTask",
    "DISTILL_METHODS", "FEATURE_KINDS",
]
