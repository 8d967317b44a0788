"""The distillation training task (:class:`RememDistillationTask`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from timm.task import TrainingTask
from timm.utils import unwrap_model
from torch.nn.parallel import DistributedDataParallel as DDP

from .._validation import check_class_count
from ..errors import ConfigError
from ._checks import CLASS_COUNT_TEMPLATE
from .features import DistillationStudent, FeatureDistillation
from .losses import DistillationLoss
from .teacher import Teacher

__all__ = ["RememDistillationTask"]

_logger = logging.getLogger("timm_remem.distill")


class RememDistillationTask(TrainingTask):
    """A ``timm.task.TrainingTask`` for logit (and optionally feature) distillation with a frozen :class:`Teacher`.

    Used like ``timm.task.LogitDistillationTask``. The teacher runs at most once per call, and not at all when
    ``teacher_logits`` (and, with features, ``teacher_features``) are passed or its cache holds the batch's
    ``indices``.

    Args:
        student: The student model (trained).
        teacher: The teacher: a :class:`Teacher`, or a module wrapped into one with ``student``'s normalisation.
        loss: The logit loss; default ``DistillationLoss()`` (kd, both weights 1, T=1).
        features: Optional :class:`FeatureDistillation`; its projectors become part of the trainable module.
        consistent: ``True``: the teacher sees exactly the student's (augmented) input (Beyer et al. 2022) and a
            separate ``teacher_input`` is refused. ``False``: every call must pass ``teacher_input`` (or
            ``teacher_logits``).
        device, dtype, verbose: As for ``timm.task.TrainingTask`` (``verbose`` logs the configuration).

    Example:
        >>> import timm, torch
        >>> student = timm.create_model("resnet18", pretrained=False, num_classes=10)
        >>> teacher = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=10)
        >>> task = RememDistillationTask(student, teacher, DistillationLoss("dist", temperature=4.0), verbose=False)
        >>> out = task(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
        >>> out["loss"].backward()
        >>> sorted(out)
        ['kd_loss', 'loss', 'output', 'task_loss', 'teacher_logits']
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        loss: DistillationLoss | None = None,
        *,
        features: FeatureDistillation | None = None,
        consistent: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        verbose: bool = True,
    ):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        self.teacher = teacher if isinstance(teacher, Teacher) else Teacher(teacher, student)
        check_class_count(
            self.teacher.num_classes, getattr(unwrap_model(student), "num_classes", None),
            template=CLASS_COUNT_TEMPLATE,
            fix="distillation needs one label space. Create the student with the teacher's num_classes.",
        )
        self.loss = loss if loss is not None else DistillationLoss()
        if not isinstance(self.loss, DistillationLoss):
            raise ConfigError(f"loss must be a DistillationLoss, got {type(self.loss).__name__}.")
        self.features = features
        self.consistent = bool(consistent)
        self.trainable_module = student if features is None else DistillationStudent(student, features)
        if verbose:
            _logger.info(
                "RememDistillationTask: %s, features=%s, consistent=%s",
                self.loss.extra_repr(),
                None if features is None else f"{features.kind} pairs={features.pairs} weight={features.weight}",
                self.consistent,
            )

    def train(self, mode: bool = True) -> RememDistillationTask:
        super().train(mode)
        self.teacher.eval()
        return self

    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs) -> RememDistillationTask:
        """Wrap the trainable module (student + projectors) in DDP; the frozen teacher stays unwrapped."""
        self.teacher.requires_grad_(False)
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def compile(self, backend: str = "inductor", mode: str | None = None, **compile_kwargs) -> nn.Module:
        """Compile the student (train and eval paths) and the teacher model."""
        student = self._student_of(self.trainable_module)
        self.eval_model = torch.compile(student, backend=backend, mode=mode, **compile_kwargs)
        self.trainable_module = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        self.teacher.compile(backend=backend, mode=mode, **compile_kwargs)  # DistillationTeacher: the inner model
        return self.eval_model

    @staticmethod
    def _wrapper_of(module: nn.Module | None) -> DistillationStudent | None:
        """The DistillationStudent inside ``module``'s wrappers (DDP, compile, EMA), or None."""
        inner = unwrap_model(module)
        return inner if isinstance(inner, DistillationStudent) else None

    @classmethod
    def _student_of(cls, module: nn.Module | None) -> nn.Module | None:
        wrapper = cls._wrapper_of(module)
        return module if wrapper is None else wrapper.student

    def get_eval_model(self, module: nn.Module | None = None, ema: bool = False) -> nn.Module | None:
        resolved = super().get_eval_model(module=module, ema=ema)
        return self._student_of(resolved)

    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict[str, Any]:
        """Projector weights (feature distillation) kept beside the student's state_dict in checkpoints."""
        module = module if module is not None else self.get_trainable_module(ema=ema)
        features = self._features_of(module)
        if features is None or not len(features.state_dict()):
            return {}
        return {"features": features.state_dict()}

    def load_task_state(
        self,
        state: dict[str, Any] | None,
        strict: bool = True,
        module: nn.Module | None = None,
        ema: bool = False,
    ) -> None:
        if not state or "features" not in state:
            return
        module = module if module is not None else self.get_trainable_module(ema=ema)
        features = self._features_of(module)
        if features is None:
            if strict:
                raise ConfigError("checkpoint has feature-distillation state but this task has no features=...")
            return
        features.load_state_dict(state["features"], strict=strict)

    @classmethod
    def _features_of(cls, module: nn.Module | None) -> FeatureDistillation | None:
        wrapper = cls._wrapper_of(module)
        return None if wrapper is None else wrapper.features

    def get_clip_parameters(self, exclude_head: bool = False):
        module = unwrap_model(self.trainable_module)
        if not exclude_head:
            return module.parameters()
        student = self._student_of(module)
        params = list(student.parameters())[:-2]
        if isinstance(module, DistillationStudent):
            params.extend(module.features.parameters())
        return params

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor | None,
        *,
        teacher_input: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        teacher_features: Sequence[torch.Tensor] | None = None,
        indices: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """One distillation step's forward.

        Args:
            input: Student input ``[B, C, H, W]`` (student-normalised, possibly augmented / mixed).
            target: Labels ``[B]``, soft targets ``[B, C]``, or ``None`` when the loss has ``task_weight == 0``.
            teacher_input: The teacher's view when ``consistent=False``.
            teacher_logits: Precomputed teacher logits (e.g. from the first SAM pass).
            teacher_features: Precomputed teacher block outputs (feature distillation), in pair order.
            indices: Dataset indices of the batch, for the teacher's logit cache.

        Returns:
            ``{"loss", "output", "task_loss", "kd_loss", "teacher_logits"}``, plus ``"feature_loss"`` and
            ``"teacher_features"`` with feature distillation.
        """
        if self.consistent and teacher_input is not None:
            raise ConfigError(
                "consistent=True: the teacher sees the student's own input, so teacher_input must not be passed. "
                "Create the task with consistent=False to give the teacher a different view."
            )
        need_teacher = teacher_logits is None or (self.features is not None and teacher_features is None)
        if not self.consistent and teacher_input is None and need_teacher:
            raise ConfigError(
                "consistent=False needs teacher_input=<the teacher's view of the batch> (or precomputed "
                "teacher_logits); use consistent=True to show the teacher the student's input."
            )
        t_in = input if teacher_input is None else teacher_input
        out: dict[str, Any] = {}
        if self.features is None:
            student_logits = self.trainable_module(input)
            if teacher_logits is None:
                teacher_logits = self.teacher(t_in, indices=indices)
        else:
            student_logits, projected = self.trainable_module(input)
            if teacher_features is None:
                fresh_logits, teacher_features = self.teacher.forward_intermediates(t_in, self.features.teacher_indices)
                if teacher_logits is None:
                    teacher_logits = fresh_logits
            feature_loss = self.features.compare(projected, teacher_features)
            out["feature_loss"] = feature_loss.detach()
            out["teacher_features"] = list(teacher_features)
        total, parts = self.loss(student_logits, teacher_logits, target, return_parts=True)
        if self.features is not None:
            total = total + self.features.weight * feature_loss
        out.update(
            loss=total,
            output=student_logits,
            task_loss=parts["task_loss"],
            kd_loss=parts["kd_loss"],
            teacher_logits=teacher_logits.detach(),
        )
        return out
