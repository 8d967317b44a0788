"""What stops a training run, with one clear error each: a non-finite loss (SAM's perturbed pass included), a
non-finite gradient that no GradScaler is there to skip, weights that became non-finite, non-finite teacher logits, a
batch with no sample or with labels outside the model's classes.

Every check is cheap (one ``aminmax`` of the labels on the CPU, the loss value the step reads anyway, one
``isfinite`` of the teacher logits, one fused max-abs reduction over the gradients and one over the weights) and,
under torchrun, decided for every rank at once (folded into the loss's collective, or one more small all-reduce), so
no rank is left waiting. Nothing is saved after the failing step; the message names the last good checkpoint, which
stays on disk.

Every optimizer path stops the same way (:class:`StepGuard`): the plain base optimizer, the one-pass SAM and the
exact SAM. A step whose gradient is not finite is a legitimate skip only under a ``GradScaler`` (float16 amp, where
an overflow lowers the scale and the next step goes on); without one it means the run diverged. The plain optimizers
would apply it and turn the weights into NaN; the exact SAM would skip every step from then on and finish "normally"
with a diverged model; both stop instead, at that step, before anything is saved or exported.

Example:
    >>> import torch
    >>> from timm_remem.train.guards import check_labels
    >>> check_labels(torch.tensor([0, 12]), 10)
    'holds label 12, outside 0..9'
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

    One ``aminmax`` of the label tensor (on the CPU, where the loader yields it), so it costs nothing per step.

    Example:
        >>> check_labels(torch.tensor([0, 3, 9]), 10) is None
        True
        >>> check_labels(torch.tensor([0, -1]), 10), check_labels(torch.tensor([2, 10]), 10)
        ('holds label -1, outside 0..9', 'holds label 10, outside 0..9')
        >>> check_labels(torch.zeros(0, dtype=torch.long), 10)
        'is empty (0 samples)'
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
    """What a :func:`check_labels` problem means, and how to fix it.

    Example:
        >>> label_fix("holds label 10, outside 0..9", 10)[:53]
        'the model has 10 classes, so labels must be in 0..9: '
        >>> label_fix("is empty (0 samples)", 10)[:40]
        'the dataset or its collate function drop'
    """
    if problem.startswith("is empty"):
        return ("the dataset or its collate function dropped every sample of the batch (a filter or a transform that "
                "returns nothing); fix the dataset so that every batch holds samples")
    return (f"the model has {num_classes} classes, so labels must be in 0..{(num_classes or 1) - 1}: the dataset's "
            "labels do not fit its class count (a split labelled -1 for 'no label', or num_classes smaller than the "
            "dataset's). Fix the labels or num_classes (--num-classes)")


def last_good(state_dir: Path | None) -> str:
    """``the last good checkpoint is '...'`` (or that none was written yet): what an error that stops a run keeps.

    Example:
        >>> last_good(None)
        'no checkpoint was written yet'
    """
    last = latest_checkpoint(state_dir) if state_dir is not None else None
    return f"the last good checkpoint is {str(last)!r}" if last else "no checkpoint was written yet"


def _diverged(what: str, *, epoch: int, step: int, state_dir: Path | None, detail: str = "") -> TrainingError:
    """The error that stops a diverged run: ``what`` went wrong at that step (``detail`` after it), the last good
    checkpoint, the fix."""
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
    """Whether every element of every tensor is finite: one fused max-abs reduction per device, one host sync each
    (a max, not a norm, so huge but finite values do not overflow into a false alarm).

    Example:
        >>> all_finite([torch.ones(3), torch.zeros(2, 2)]), all_finite([torch.tensor([1.0, float("nan")])])
        (True, False)
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel() and not t.is_sparse:
            by_device.setdefault(t.device, []).append(t.detach())
    return all(bool(torch.isfinite(torch.stack(torch._foreach_norm(group, math.inf))).all())
               for group in by_device.values())


class StepGuard:
    """The checks of one training step, bound to its epoch, step (both 0-based) and train-state folder.

    - ``guard(loss)``: the first pass's loss, as :func:`checked_loss` (averaged over ranks, teacher logits checked);
    - ``guard.gradient(optimizer)``: before a plain optimizer's update, whether its gradient is finite;
    - ``guard.after_step(optimizer, ...)``: after the update, stops the run when SAM's perturbed pass gave a non-finite
      loss, when the gradient was not finite and no GradScaler was there to skip the step, or when the weights became
      non-finite. Under torchrun one all-reduce decides for every rank.

    :func:`~timm_remem.train.loop.train_step` runs all three when its ``check`` is a ``StepGuard`` (``fit`` passes
    one); a plain callable is only given the first pass's loss.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> guard = StepGuard(epoch=0, step=4, state_dir=None)
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> guard.gradient(opt)
        True
        >>> opt.step()
        >>> guard.after_step(opt, loss_value=1.0)  # finite weights: nothing to say
        >>> with torch.no_grad():
        ...     model.weight[0, 0] = float("inf")
        >>> guard.after_step(opt, loss_value=1.0)
        Traceback (most recent call last):
        ...
        timm_remem.errors.TrainingError: the weights became non-finite in the optimizer step at epoch 1, step 5 (the...
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
        """Whether the gradients the optimizer is about to apply are all finite."""
        return all_finite(p.grad for p in self._params(optimizer) if p.grad is not None)

    def after_step(self, optimizer: torch.optim.Optimizer, *, loss_value: float, gradient_finite: bool = True,
                   perturbed_loss: torch.Tensor | None = None) -> None:
        """Stop the run (a :class:`TrainingError`, the same on every rank) when the step diverged.

        Args:
            optimizer: The optimizer that took (or skipped) the step; its parameters are checked.
            loss_value: The first pass's loss (finite: :meth:`__call__` checked it).
            gradient_finite: False when the step's gradient was not finite and no GradScaler skipped it.
            perturbed_loss: The loss of SAM's perturbed pass, when there was one.
        """
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
    """The step's loss, averaged over ranks under torchrun, checked finite: every rank stops on the same step.

    ``teacher_finite=False`` (the step's teacher logits held NaN/inf, on this or any rank) stops training with a
    :class:`TrainingError` that blames the teacher (folded into the same collective as the loss).
    """
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
    """Raise a :class:`ConfigError` (on every rank at once under torchrun) when the training batch ``batch`` (0-based)
    of epoch ``epoch`` (0-based) is empty or has labels out of range (``problem``, from :func:`check_labels`).

    Example:
        >>> stop_on_bad_batch(None, epoch=0, batch=0, num_classes=10, state_dir=None)  # nothing wrong
    """
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
    and resets the note, for :func:`checked_loss`).

    Example:
        >>> watch = TeacherWatch(lambda x, target, idx, t: (x.sum(), x, torch.tensor([float("nan")])))
        >>> _ = watch(torch.ones(2), None, None, None); watch.take(), watch.take()
        (False, True)
    """

    def __init__(self, compute: Compute) -> None:
        self.compute, self.finite = compute, True

    def __call__(self, x, target, idx, teacher_logits):
        loss, logits, teacher_out = self.compute(x, target, idx, teacher_logits)
        if teacher_logits is None and teacher_out is not None:  # computed now (SAM's second pass reuses them)
            self.finite = bool(torch.isfinite(teacher_out).all())
        return loss, logits, teacher_out

    def take(self) -> bool:
        """Whether the last teacher logits were finite (True again afterwards)."""
        finite, self.finite = self.finite, True
        return finite
