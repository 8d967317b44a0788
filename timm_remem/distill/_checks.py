"""Argument checks shared by the distillation losses (private to ``timm_remem.distill``)."""

from __future__ import annotations

import math

import torch

from .._validation import check_class_count, check_float
from ..errors import ConfigError

__all__ = ["CLASS_COUNT_TEMPLATE", "check_temperature", "check_weight", "check_label_smoothing", "check_logit_pair",
           "check_nchw"]

# Teacher's and RememDistillationTask's wording for timm_remem._validation.check_class_count(template=...).
CLASS_COUNT_TEMPLATE = "{teacher} num_classes={teacher_classes} differs from {other} num_classes={other_classes}; {fix}"

_LOGIT_CLASS_FIX = (
    "distillation needs the same label space. Create the student with num_classes equal to the teacher's (or "
    "fine-tune the teacher on the student's classes first)."
)


def check_temperature(temperature: float) -> float:
    """A softmax temperature: any positive finite number (``float()``-convertible), returned as ``float``."""
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(
            f"temperature must be a positive finite number, got {temperature!r}; use e.g. temperature=1.0 or 4.0."
        )
    return value


def check_weight(name: str, value: float) -> float:
    """A loss weight: a finite number >= 0 (0 switches its term off)."""
    return check_float(name, value, low=0, hint="use 0 to switch the term off.")


def check_label_smoothing(label_smoothing: float) -> float:
    """Label smoothing for integer targets, in ``[0, 1)``."""
    smoothing = float(label_smoothing)
    if not (0.0 <= smoothing < 1.0):
        raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}; 0.1 is a common choice.")
    return smoothing


def check_logit_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    """Student and teacher logits are both ``[B, C]`` with the same ``B`` and ``C``."""
    if student_logits.ndim != 2 or teacher_logits.ndim != 2:
        raise ConfigError(
            "distillation expects logits shaped [batch, num_classes], got student "
            f"{tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}; flatten extra dimensions or "
            "pass the classifier output (model(x)), not features."
        )
    check_class_count(teacher_logits.shape[1], student_logits.shape[1], fix=_LOGIT_CLASS_FIX)
    if student_logits.shape[0] != teacher_logits.shape[0]:
        raise ConfigError(
            f"batch sizes differ: student logits {tuple(student_logits.shape)} vs teacher logits "
            f"{tuple(teacher_logits.shape)}; compute teacher logits on the same batch as the student."
        )


def check_nchw(name: str, x: torch.Tensor) -> None:
    """A feature map is 4-D ``[B, C, H, W]``."""
    if x.ndim != 4:
        raise ConfigError(
            f"{name} feature must be NCHW [B, C, H, W], got shape {tuple(x.shape)}; take features from "
            "forward_intermediates(..., output_fmt='NCHW')."
        )
