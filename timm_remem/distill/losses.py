"""The task loss (the trainer's too, so both report the same number) and :class:`DistillationLoss`."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ._checks import check_label_smoothing, check_logit_pair, check_temperature, check_weight
from .functional import check_temperature_range, dist_loss, kd_loss

__all__ = ["task_loss", "DistillationLoss", "DISTILL_METHODS"]

DISTILL_METHODS = ("kd", "hard", "dist")


def task_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Classification loss in float32: cross-entropy with ``label_smoothing`` for integer labels ``[B]`` (timm's
    ``LabelSmoothingCrossEntropy``), soft-target cross-entropy for float targets ``[B, C]`` (Mixup/CutMix output,
    not smoothed again).

    Raises:
        ConfigError: ``label_smoothing`` outside ``[0, 1)``, or a target whose shape does not fit the logits.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> hard = task_loss(logits, torch.tensor([0, 1]))
        >>> soft = task_loss(logits, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # one-hot soft targets: same value
        >>> bool(torch.allclose(hard, soft))
        True
    """
    smoothing = check_label_smoothing(label_smoothing)
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ConfigError(
                f"soft targets must have the logits' shape {tuple(logits.shape)}, got "
                f"{tuple(target.shape)}; pass integer class labels [B] or Mixup/CutMix targets [B, num_classes]."
            )
        log_p = F.log_softmax(logits.float(), dim=-1)
        return torch.sum(-target.float() * log_p, dim=-1).mean()
    if target.ndim != 1 or target.shape[0] != logits.shape[0]:
        raise ConfigError(
            f"integer targets must be class labels shaped [{logits.shape[0]}], got {tuple(target.shape)} "
            f"({target.dtype}); pass labels [B] or float soft targets [B, num_classes]."
        )
    return F.cross_entropy(logits.float(), target.long(), label_smoothing=smoothing)


class DistillationLoss(nn.Module):
    """``task_weight * task_loss + distill_weight * distill_term``, with independent weights.

    ``distill_term``: ``"kd"`` is :func:`~timm_remem.distill.kd_loss`, ``"hard"`` the cross-entropy against the
    teacher's argmax (DeiT; no temperature), ``"dist"`` :func:`~timm_remem.distill.dist_loss`; ``T^2`` always stays
    in it. The task term is :func:`task_loss` of ``target`` (``None`` only with ``task_weight == 0``). Every call
    stores the detached parts (``"loss"``, ``"task_loss"``, ``"kd_loss"``, the last two unweighted) in
    ``self.last_parts``.

    Args:
        method: ``"kd"``, ``"hard"`` or ``"dist"``.
        task_weight: Weight of the task loss (>= 0).
        distill_weight: Weight of the distillation term (>= 0).
        temperature: Softmax temperature for ``"kd"`` and ``"dist"``, in ``[1e-4, 1e8]``.
        label_smoothing: Label smoothing for integer targets, in ``[0, 1)``.
        dist_beta, dist_gamma: DIST's inter- and intra-class weights.

    Raises:
        ConfigError: Unknown method, bad temperature (outside ``[1e-4, 1e8]`` for kd and dist) / weights /
            smoothing, both weights zero, or bad targets.

    Example:
        >>> import torch
        >>> loss_fn = DistillationLoss("kd", task_weight=0.5, distill_weight=0.5, temperature=4.0)
        >>> s, t, y = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10), torch.randint(0, 10, (8,))
        >>> total, parts = loss_fn(s, t, y, return_parts=True)
        >>> sorted(parts)
        ['kd_loss', 'loss', 'task_loss']
    """

    def __init__(
        self,
        method: str = "kd",
        *,
        task_weight: float = 1.0,
        distill_weight: float = 1.0,
        temperature: float = 1.0,
        label_smoothing: float = 0.0,
        dist_beta: float = 1.0,
        dist_gamma: float = 1.0,
    ):
        super().__init__()
        if method not in DISTILL_METHODS:
            raise ConfigError(f"method must be one of {DISTILL_METHODS}, got {method!r}.")
        self.method = method
        self.task_weight = check_weight("task_weight", task_weight)
        self.distill_weight = check_weight("distill_weight", distill_weight)
        if self.task_weight == 0 and self.distill_weight == 0:
            raise ConfigError("task_weight and distill_weight are both 0, so the loss is constant; make one positive.")
        # kd and dist refuse temperatures they cannot compute accurately (functional.MIN/MAX_TEMPERATURE) here, at
        # construction rather than at the first batch; hard distillation has no temperature to compute with
        self.temperature = check_temperature(temperature) if method == "hard" else check_temperature_range(temperature)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.dist_beta = check_weight("dist_beta", dist_beta)
        self.dist_gamma = check_weight("dist_gamma", dist_gamma)
        self.last_parts: dict[str, torch.Tensor] = {}

    @classmethod
    def function_matching(cls, temperature: float = 1.0) -> DistillationLoss:
        """The loss of Beyer et al. 2022 ("patient and consistent"): pure ``KL`` to the teacher, no label term.

        Example:
            >>> DistillationLoss.function_matching().task_weight
            0.0
        """
        return cls("kd", task_weight=0.0, distill_weight=1.0, temperature=temperature)

    def extra_repr(self) -> str:
        return (
            f"method={self.method!r}, task_weight={self.task_weight}, distill_weight={self.distill_weight}, "
            f"temperature={self.temperature}, label_smoothing={self.label_smoothing}"
        )

    def task_loss(self, student_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The task term alone: :func:`task_loss` with this loss's ``label_smoothing``."""
        return task_loss(student_logits, target, self.label_smoothing)

    def distill_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The distillation term alone (unweighted, ``T^2`` included where it applies)."""
        if self.method == "kd":
            return kd_loss(student_logits, teacher_logits, self.temperature)
        if self.method == "dist":
            return dist_loss(student_logits, teacher_logits, self.temperature, self.dist_beta, self.dist_gamma)
        check_logit_pair(student_logits, teacher_logits)
        return F.cross_entropy(student_logits.float(), teacher_logits.detach().argmax(dim=-1))

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        target: torch.Tensor | None = None,
        *,
        return_parts: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss, or ``(total, parts)`` with ``return_parts=True`` (``parts``: see ``last_parts``)."""
        kd = self.distill_loss(student_logits, teacher_logits)
        if self.task_weight > 0:
            if target is None:
                raise ConfigError(
                    f"target is None but task_weight={self.task_weight}; pass labels, or set task_weight=0 for pure "
                    "distillation (function matching)."
                )
            task = self.task_loss(student_logits, target)
            total = self.task_weight * task + self.distill_weight * kd
        else:
            task = kd.new_zeros(())
            total = self.distill_weight * kd
        parts = {"loss": total.detach(), "task_loss": task.detach(), "kd_loss": kd.detach()}
        self.last_parts = parts
        if return_parts:
            return total, parts
        return total
