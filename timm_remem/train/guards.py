"""What stops a training run, with one clear error each: a non-finite loss (SAM's perturbed pass included), a
non-finite gradient that no GradScaler is there to skip, non-finite weights or teacher logits, a batch with no sample
or with labels outside the model's classes.

Each check is cheap and, under torchrun, decided for every rank at once, so no rank is left waiting. Nothing is saved
after the failing step; the message names the last good checkpoint. Without a GradScaler a non-finite gradient means
the run diverged: the plain optimizers would apply it (NaN weights) and the exact SAM would skip every later step, so
every optimizer path stops at that step instead (:class:`StepGuard`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .. import distributed
from ..checkpoint import latest_checkpoint
from ..errors import ConfigError, TrainingError

__all__ = ["check_labels", "label_fix", "last_good", "check_finite", "checked_loss", "stop_on_bad_batch",
           "TeacherWatch", "StepGuard", "all_finite"]

Compute = Callable[..., tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]]


def check_labels(y: torch.Tensor, num_classes: int | None) -> str | None:
    """What is wrong with a batch's labels (None: nothing): empty, or a label outside ``0..num_classes-1``.

    Example:
        >>> check_labels(torch.tensor([0, 12]), 10), check_labels(torch.zeros(0, dtype=torch.long), 10)
        ('holds label 12, outside 0..9', 'is empty (0 samples)')
    """
    if y.numel() == 0:
        return "is empty (0 samples)"
    if not num_classes or y.is_floating_point() or y.ndim != 1:
        return None  # soft or multi-label targets: nothing to compare
    low, high = (int(v) for v in torch.aminmax(y))
    if low < 0 or high >= num_classes:
        return f"holds label {low if low < 0 else high}, outside 0..{num_classes - 1}"
    return None


def label_fix(problem: str, num_classes: int | None) -> str:
    """What a :func:`check_labels` problem means, and how to fix it."""
    if problem.startswith("is empty"):
        return ("the dataset or its collate function dropped every sample of the batch (a filter or a transform that "
                "returns nothing); fix the dataset so that every batch holds samples")
    return (f"the model has {num_classes} classes, so labels must be in 0..{(num_classes or 1) - 1}: the dataset's "
            "labels do not fit its class count (a split labelled -1 for 'no label', or num_classes smaller than the "
            "dataset's). Fix the labels or num_classes (--num-classes)")


def last_good(state_dir: Path | None) -> str:
    """``the last good checkpoint is '...'``, or that none was written yet."""
    last = latest_checkpoint(state_dir) if state_dir is not None else None
    return f"the last good checkpoint is {str(last)!r}" if last else "no checkpoint was written yet"


def _diverged(what: str, *, epoch: int, step: int, state_dir: Path | None, detail: str = "") -> TrainingError:
    return TrainingError(
        f"{what} at epoch {epoch + 1}, step {step + 1}{detail}; training stopped and nothing was saved after it "
        f"({last_good(state_dir)}). Resume with gradient clipping (--resume --clip-grad 1.0), or start a new run with "
        "a lower learning rate or without amp"
    )


def check_finite(loss: torch.Tensor, *, epoch: int, step: int, state_dir: Path | None) -> float:
    """The loss as a float; a NaN/inf loss stops training with a :class:`TrainingError` naming the last checkpoint."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise _diverged(f"the training loss became {value}", epoch=epoch, step=step, state_dir=state_dir)
    return value


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every element is finite: one fused max-abs reduction (not a norm, which huge values overflow) and one
    host sync per device."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel() and not t.is_sparse:
            by_device.setdefault(t.device, []).append(t.detach())
    return all(bool(torch.isfinite(torch.stack(torch._foreach_norm(group, math.inf))).all())
               for group in by_device.values())


class StepGuard:
    """The checks of one training step (epoch and step 0-based), which :func:`~timm_remem.train.loop.train_step`
    runs when its ``check`` is one: ``guard(loss)`` (:func:`checked_loss`), ``guard.gradient(optimizer)`` before a
    plain optimizer's update, and ``guard.after_step(optimizer, ...)`` after it.
    """

    def __init__(self, *, epoch: int, step: int, state_dir: Path | None,
                 teacher_finite: Callable[[], bool] = lambda: True) -> None:
        self.epoch, self.step, self.state_dir, self.teacher_finite = epoch, step, state_dir, teacher_finite

    def __call__(self, loss: torch.Tensor) -> float:
        return checked_loss(loss, epoch=self.epoch, step=self.step, state_dir=self.state_dir,
                            teacher_finite=self.teacher_finite())

    @staticmethod
    def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
        return [p for group in optimizer.param_groups for p in group["params"]]

    def gradient(self, optimizer: torch.optim.Optimizer) -> bool:
        return all_finite(p.grad for p in self._params(optimizer) if p.grad is not None)

    def after_step(self, optimizer: torch.optim.Optimizer, *, loss_value: float, gradient_finite: bool = True,
                   perturbed_loss: torch.Tensor | None = None) -> None:
        """Stop the run (a :class:`TrainingError`, the same on every rank) when SAM's perturbed loss
        (``perturbed_loss``), the gradient (``gradient_finite=False``: no GradScaler skipped it) or the weights are
        not finite."""
        perturbed_value = None if perturbed_loss is None else float(perturbed_loss.detach())
        flags = [float(perturbed_value is not None and not math.isfinite(perturbed_value)),
                 float(not gradient_finite), float(not all_finite(self._params(optimizer)))]
        local = list(flags)
        if distributed.is_distributed():
            flags = distributed.all_reduce_sum(flags)
        where = dict(epoch=self.epoch, step=self.step, state_dir=self.state_dir)
        if flags[0]:
            shown = perturbed_value if local[0] else "non-finite on another rank"
            raise _diverged(f"the training loss became {shown} in SAM's perturbed pass", **where)
        if flags[1]:
            raise _diverged(
                f"the gradient of the training loss became non-finite{'' if local[1] else ' on another rank'}",
                detail=f" while the loss was finite ({loss_value:.6g}): the run has diverged (only a GradScaler, "
                       "under float16 amp, skips such a step)", **where)
        if flags[2]:
            raise _diverged("the weights became non-finite in the optimizer step",
                            detail=f" (the loss was {loss_value:.6g} and its gradient finite: the update overflowed)",
                            **where)


def checked_loss(loss: torch.Tensor, *, epoch: int, step: int, state_dir: Path | None,
                 teacher_finite: bool = True) -> float:
    """The step's loss, averaged over ranks, checked finite (and ``teacher_finite``) on every rank at once."""
    if distributed.is_distributed():
        total, bad = distributed.all_reduce_sum([float(loss.detach()), 0.0 if teacher_finite else 1.0])
        loss = torch.tensor(total / distributed.get_world_size(), dtype=torch.float64)
        teacher_finite = bad == 0
    if not teacher_finite:
        raise TrainingError(
            f"the teacher's logits hold NaN or inf at epoch {epoch + 1}, step {step + 1}: the teacher is broken "
            "(weights from a diverged run, or float16 overflow under amp). Training stopped and nothing was saved "
            f"after it ({last_good(state_dir)}); check the teacher (timm-remem inspect TEACHER) or distill without amp"
        )
    return check_finite(loss, epoch=epoch, step=step, state_dir=state_dir)


def stop_on_bad_batch(problem: str | None, *, epoch: int, batch: int, num_classes: int | None,
                      state_dir: Path | None) -> None:
    """Raise a :class:`ConfigError` on every rank when a rank's batch has a :func:`check_labels` ``problem``."""
    bad = problem is not None
    if distributed.is_distributed():
        bad = distributed.all_reduce_sum([1.0 if bad else 0.0])[0] > 0
    if not bad:
        return
    what = (f"training batch {batch + 1} of epoch {epoch + 1} {problem}" if problem is not None
            else f"another rank's training batch {batch + 1} of epoch {epoch + 1} is empty or has "
                 "labels outside the model's classes")
    fix = label_fix(problem, num_classes) if problem is not None else "see rank 0's message"
    raise ConfigError(f"{what}: {fix}. Training stopped; nothing was saved after it "
                      f"({last_good(state_dir)})")


class TeacherWatch:
    """``compute`` that notes whether the teacher logits of a step's first pass are finite (:meth:`take` reads
    and resets the note)."""

    def __init__(self, compute: Compute) -> None:
        self.compute, self.finite = compute, True

    def __call__(self, x, target, idx, teacher_logits):
        loss, logits, teacher_out = self.compute(x, target, idx, teacher_logits)
        if teacher_logits is None and teacher_out is not None:  # computed now (SAM's second pass reuses them)
            self.finite = bool(torch.isfinite(teacher_out).all())
        return loss, logits, teacher_out

    def take(self) -> bool:
        finite, self.finite = self.finite, True
        return finite
