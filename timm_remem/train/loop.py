"""The training loop shared by teacher fine-tuning and student distillation.

:func:`fit` trains a model with a ``compute(x, target, idx, teacher_logits) -> (loss, logits, teacher_logits)``
callable: one :func:`train_step` per batch (SAM's two passes when the optimizer is SAM, the teacher run at most once
per step), the learning-rate schedule and the EMA updated every step, an evaluation and one ``metrics.jsonl`` line
per epoch, resumable training checkpoints (every epoch and every ``checkpoint_every`` steps) and exports at the
``save_at`` epochs. Under torchrun every rank runs it: metrics are reduced over ranks and rank 0 alone writes files
while the others wait at a barrier.

Example:
    >>> import torch
    >>> from timm_remem.train.loop import evaluate
    >>> model = torch.nn.Linear(4, 3)
    >>> batches = [(torch.randn(5, 4), torch.randint(0, 3, (5,)), torch.arange(5))]
    >>> loss, acc = evaluate(model, batches, torch.device("cpu"))
    >>> 0.0 <= acc <= 1.0
    True
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.utils import dispatch_clip_grad
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from .._io import atomic_replace_dir
from ..checkpoint import get_rng_state, latest_checkpoint, save_checkpoint
from ..errors import ConfigError, TrainingError
from ..sam import SAM
from .builders import (
    autocast_factory,
    create_ema,
    create_mixup,
    create_optimizer,
    create_scaler,
    create_scheduler,
    seed_everything,
)
from .config import TrainConfig
from .resume import EXPORT_DIR, METRICS_FILE, STATE_DIR, LoopState, prepare_output, restore

__all__ = ["fit", "train_step", "evaluate", "accuracy", "check_finite", "checked_loss", "write_metrics"]

Compute = Callable[..., tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]]


# ---------------------------------------------------------------------------------------------------------- steps


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> int:
    """Number of correct top-1 predictions."""
    return int((logits.argmax(dim=-1) == target).sum())


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> tuple[float, float]:
    """Mean loss and accuracy; under torchrun the sums of every rank's shard are reduced (same result everywhere)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y, _ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += accuracy(logits, y)
        count += y.numel()
    model.train(was_training)
    if distributed.is_distributed():
        loss_sum, correct, count = distributed.all_reduce_sum([loss_sum, correct, count])
    return loss_sum / max(count, 1), correct / max(count, 1)


def check_finite(loss: torch.Tensor, *, epoch: int, step: int, state_dir: Path | None) -> float:
    """The loss as a float; a NaN/inf loss stops training with a :class:`TrainingError` naming the last checkpoint."""
    value = float(loss.detach())
    if not math.isfinite(value):
        last = latest_checkpoint(state_dir) if state_dir is not None else None
        where = f"the last good checkpoint is {str(last)!r}" if last else "no checkpoint was written yet"
        raise TrainingError(
            f"the training loss became {value} at epoch {epoch + 1}, step {step + 1}; training stopped and nothing was "
            f"saved after it ({where}). Resume with gradient clipping (--resume --clip-grad 1.0), or start a new run "
            "with a lower learning rate or without amp"
        )
    return value


def checked_loss(loss: torch.Tensor, *, epoch: int, step: int, state_dir: Path | None) -> float:
    """The step's loss, averaged over ranks under torchrun, checked finite: every rank stops on the same step."""
    if distributed.is_distributed():
        mean = distributed.all_reduce_sum([float(loss.detach())])[0] / distributed.get_world_size()
        loss = torch.tensor(mean, dtype=torch.float64)
    return check_finite(loss, epoch=epoch, step=step, state_dir=state_dir)


def _backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _sam_step(model, optimizer: SAM, compute: Compute, x, target, idx, *, scaler, autocast, clip_grad, check):
    with optimizer.first_pass(model):
        with autocast():
            loss, logits, teacher_logits = compute(x, target, idx, None)
        value = check(loss)
        _backward(loss, scaler)
    perturbed = optimizer.first_step(zero_grad=True, scaler=scaler)
    if optimizer.is_sam_step and distributed.is_distributed():
        # Each replica perturbs by its own gradient, so one may skip (non-finite gradient norm) while the others
        # perturbed. The second pass's gradient all-reduce needs every rank, so all of them skip it then: the
        # perturbed ranks restore their weights and find no gradient to apply, and the weights stay identical.
        perturbed = distributed.all_reduce_sum([0.0 if perturbed else 1.0])[0] == 0
    if perturbed:
        with optimizer.second_pass(model):
            with autocast():
                loss2, _, _ = compute(x, target, idx, teacher_logits)
            _backward(loss2, scaler)
    optimizer.second_step(zero_grad=True, scaler=scaler, max_grad_norm=clip_grad)
    return value, logits


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    compute: Compute,
    x: torch.Tensor,
    target: torch.Tensor,
    idx: torch.Tensor,
    *,
    scaler: torch.amp.GradScaler | None,
    autocast: Callable[[], contextlib.AbstractContextManager],
    clip_grad: float | None,
    check: Callable[[torch.Tensor], float],
) -> tuple[float, torch.Tensor]:
    """One optimizer step; returns the loss value (checked finite by ``check``) and the logits of the first pass.

    With SAM the teacher logits returned by the first ``compute`` are handed to the second one, so the teacher runs
    at most once per step; SAM's own AMP recipe is used (the scaler goes to ``first_step``/``second_step``, which
    unscale, skip on inf/NaN and call ``scaler.update()``).

    Example:
        >>> import contextlib, torch
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> def compute(x, target, idx, teacher_logits):
        ...     logits = model(x)
        ...     return torch.nn.functional.cross_entropy(logits, target), logits, None
        >>> value, logits = train_step(model, opt, compute, torch.randn(8, 4), torch.randint(0, 3, (8,)),
        ...                            torch.arange(8), scaler=None, autocast=contextlib.nullcontext,
        ...                            clip_grad=1.0, check=lambda loss: float(loss.detach()))
        >>> tuple(logits.shape)
        (8, 3)
    """
    if isinstance(optimizer, SAM):
        return _sam_step(model, optimizer, compute, x, target, idx, scaler=scaler, autocast=autocast,
                         clip_grad=clip_grad, check=check)
    with autocast():
        loss, logits, _ = compute(x, target, idx, None)
    value = check(loss)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if clip_grad is not None:
            scaler.unscale_(optimizer)
            dispatch_clip_grad(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if clip_grad is not None:
            dispatch_clip_grad(model.parameters(), clip_grad)
        optimizer.step()
    return value, logits


def write_metrics(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line to ``metrics.jsonl``."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------- the loop's parts


def _sync_buffers(model: nn.Module, ema: nn.Module | None) -> None:
    """Rank 0's BatchNorm statistics everywhere: the model that rank 0 evaluates and saves."""
    if distributed.get_world_size() > 1:
        distributed.broadcast_buffers(model)
        if ema is not None:
            distributed.broadcast_buffers(ema)


class _Checkpointer:
    """Writes the resumable training checkpoints (rank 0; the other ranks wait until each one is complete)."""

    def __init__(self, cfg: TrainConfig, state_dir: Path | None, *, model, optimizer, scheduler, scaler, ema):
        self.cfg, self.state_dir = cfg, state_dir
        self.objects = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ema)

    def save(self, state: LoopState, metrics: Mapping[str, Any]) -> None:
        if self.state_dir is None:
            return
        _sync_buffers(self.objects["model"], self.objects["ema"])
        world = distributed.get_world_size()
        extra = {"epoch": state.epoch, "batch": state.batch, "history": state.history, "running": state.running,
                 "world_size": world}
        if world > 1:  # each rank's random state, so a resumed rank continues its own dropout/augmentation stream
            extra["rank_rng"] = distributed.all_gather_object(get_rng_state())
        if distributed.get_rank() == 0:
            save_checkpoint(self.state_dir, **self.objects, epoch=state.epoch, step=state.step,
                            config=self.cfg.to_dict(), metrics=dict(metrics), keep_last=self.cfg.keep_last,
                            extra=extra)
        distributed.barrier()  # the others wait until the checkpoint is complete


class _Exporter:
    """Exports ``checkpoints/epoch-NNN`` after the ``save_at`` epochs (written aside, then swapped in)."""

    def __init__(self, cfg: TrainConfig, out: Path, write_export: Callable[..., Any], resumed: bool):
        self.save_at = [cfg.epochs] if cfg.save_at is None else list(cfg.save_at)
        self.folder = out / EXPORT_DIR
        self.write_export = write_export
        self.exports = sorted(p for p in self.folder.glob("epoch-*") if p.is_dir()) if resumed else []

    def after_epoch(self, epoch: int, model: nn.Module, record: Mapping[str, Any]) -> None:
        if epoch not in self.save_at:
            return
        exported = self.folder / f"epoch-{epoch:03d}"
        if distributed.get_rank() == 0:
            atomic_replace_dir(partial(self.write_export, model, record=record), exported)
        distributed.barrier()
        self.exports = [p for p in self.exports if p != exported] + [exported]


class _Progress:
    """The tqdm bar of one epoch (rank 0 only) with the running loss, accuracy and throughput."""

    def __init__(self, cfg: TrainConfig, desc: str, state: LoopState, steps_per_epoch: int):
        self.enabled = cfg.progress and distributed.get_rank() == 0
        self.bar = tqdm(total=steps_per_epoch, initial=state.batch, desc=f"{desc} {state.epoch + 1}/{cfg.epochs}",
                        disable=not self.enabled, leave=False, dynamic_ncols=True)

    def update(self, running: Mapping[str, Any]) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{running['loss'] / running['count']:.3f}",
                             acc=f"{running['correct'] / running['count']:.3f}",
                             img_s=f"{running['count'] / max(running['time'], 1e-9):.0f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _report_epoch(cfg: TrainConfig, desc: str, record: Mapping[str, Any]) -> None:
    if cfg.progress and distributed.get_rank() == 0:
        tqdm.write(f"{desc} epoch {record['epoch']}/{cfg.epochs}: loss {record['train_loss']:.4f} "
                   f"train acc {record['train_acc']:.4f} val acc {record['val_acc']:.4f} "
                   f"({record['samples_per_s']:.0f} img/s)")


def _steps_per_epoch(cfg: TrainConfig, train_loader) -> int:
    steps = len(train_loader)
    if cfg.limit_train_batches is not None:
        steps = min(steps, cfg.limit_train_batches)
    if steps == 0:
        raise ConfigError("the training loader yields no batch; lower batch_size or check the dataset")
    return steps


def _count(running: dict[str, Any], loss_value: float, logits: torch.Tensor, y: torch.Tensor) -> None:
    """Add one step to the epoch's running sums (the correct count and sample count summed over ranks)."""
    n, correct = y.numel(), accuracy(logits.detach(), y)
    if distributed.get_world_size() > 1:  # loss_value is already the mean over ranks (every rank holds as many)
        correct, n = (int(v) for v in distributed.all_reduce_sum([correct, n]))
    running["loss"] += loss_value * n
    running["correct"] += correct
    running["count"] += n


def _epoch_record(state: LoopState, *, val: tuple[float, float], lr: float) -> dict[str, Any]:
    running = state.running
    epoch_time = distributed.all_reduce_max([running["time"]])[0]  # the slowest rank's time
    record: dict[str, Any] = {
        "epoch": state.epoch + 1,
        "step": state.step,
        "train_loss": running["loss"] / max(running["count"], 1),
        "train_acc": running["correct"] / max(running["count"], 1),
        "val_loss": val[0],
        "val_acc": val[1],
        "lr": lr,
        "epoch_time_s": epoch_time,
        "samples_per_s": running["count"] / max(epoch_time, 1e-9),
    }
    if distributed.get_world_size() > 1:
        record["world_size"] = distributed.get_world_size()
    return record


# ---------------------------------------------------------------------------------------------------------- fit


@dataclass
class _Run:
    """What one call of :func:`fit` trains with (built once, before the first epoch)."""

    cfg: TrainConfig
    model: nn.Module
    device: torch.device
    desc: str
    steps_per_epoch: int
    state_dir: Path | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    autocast: Callable[[], contextlib.AbstractContextManager]
    ema: Any
    mixup: Any
    step: Callable[..., tuple[float, torch.Tensor]]
    saver: _Checkpointer


def _train_epoch(run: _Run, state: LoopState, train_loader) -> None:
    """Train the rest of the current epoch (from the resumed batch on), checkpointing every ``checkpoint_every``."""
    cfg = run.cfg
    run.model.train()
    train_loader.sampler.set_epoch(state.epoch, start_index=state.batch * cfg.batch_size)
    remaining = run.steps_per_epoch - state.batch
    progress = _Progress(cfg, run.desc, state, run.steps_per_epoch)
    t0, time_before = time.perf_counter(), state.running["time"]
    for i, (x, y, idx) in enumerate(train_loader):
        if i >= remaining:
            break
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        target = y
        if run.mixup is not None:
            x, target = run.mixup(x, y)
        loss_value, logits = run.step(x, target, idx, check=partial(checked_loss, epoch=state.epoch, step=state.step,
                                                                    state_dir=run.state_dir))
        state.step += 1
        state.batch += 1
        if run.scheduler is not None:
            run.scheduler.step_update(num_updates=state.step)
        if run.ema is not None:
            run.ema.update(run.model, step=state.step)
        _count(state.running, loss_value, logits, y)
        state.running["time"] = time_before + time.perf_counter() - t0
        progress.update(state.running)
        if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.batch < run.steps_per_epoch:
            run.saver.save(state, {})
    progress.close()


def _evaluate_epoch(run: _Run, state: LoopState, val_loader, extra_metrics) -> dict[str, Any]:
    """The epoch's metrics record: training sums, validation (and EMA validation), learning rate, throughput."""
    _sync_buffers(run.model, run.ema)
    record = _epoch_record(state, val=evaluate(run.model, val_loader, run.device, run.autocast),
                           lr=run.optimizer.param_groups[0]["lr"])
    if run.ema is not None:
        record["ema_val_loss"], record["ema_val_acc"] = evaluate(run.ema.module, val_loader, run.device,
                                                                 run.autocast)
    if extra_metrics is not None:
        record.update(extra_metrics())
    return record


def fit(
    cfg: TrainConfig,
    model: nn.Module,
    *,
    train_loader,
    val_loader,
    device: torch.device,
    compute: Compute,
    desc: str,
    write_export: Callable[[nn.Module, Path, Mapping[str, Any]], Any],
    extra_metrics: Callable[[], dict[str, Any]] | None = None,
    train_model: nn.Module | None = None,
) -> tuple[list[dict[str, Any]], list[Path], float]:
    """Train ``model`` with ``compute(x, y, idx, teacher_logits) -> (loss, logits, teacher_logits)``.

    ``train_model`` is what ``compute`` runs forward through: ``model`` itself, or its ``DistributedDataParallel``
    wrapper under torchrun (SAM's first pass then runs under its ``no_sync``). The optimizer, EMA, checkpoints and
    exports use the plain ``model``. ``write_export(model, folder, record=...)`` writes one export.

    Returns:
        ``(history, exports, val_acc)``: the per-epoch metrics, the export folders and the final validation accuracy
        (of the EMA weights when ``ema=True``).
    """
    train_model = model if train_model is None else train_model
    out = Path(cfg.output)
    state_dir = out / STATE_DIR if cfg.save_state else None
    steps_per_epoch = _steps_per_epoch(cfg, train_loader)
    if distributed.get_world_size() > 1:  # identical initial weights (DDP broadcasts them); per-rank dropout
        seed_everything(cfg.seed, distributed.get_rank())

    optimizer = create_optimizer(cfg, model)
    scheduler = create_scheduler(cfg, optimizer, steps_per_epoch)
    scaler = create_scaler(cfg, device)
    autocast = autocast_factory(cfg, device)
    ema = create_ema(cfg, model)
    mixup = create_mixup(cfg, model.num_classes)
    state, resumed = restore(cfg, out, state_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                             scaler=scaler, ema=ema)
    prepare_output(cfg, out, resumed)
    exporter = _Exporter(cfg, out, write_export, resumed)
    run = _Run(cfg, model, device, desc, steps_per_epoch, state_dir, optimizer, scheduler, autocast, ema, mixup,
               step=partial(train_step, train_model, optimizer, compute, scaler=scaler, autocast=autocast,
                            clip_grad=cfg.clip_grad),
               saver=_Checkpointer(cfg, state_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                                   scaler=scaler, ema=ema))

    while state.epoch < cfg.epochs:
        _train_epoch(run, state, train_loader)
        record = _evaluate_epoch(run, state, val_loader, extra_metrics)
        _report_epoch(cfg, desc, record)
        state.history.append(record)
        if distributed.get_rank() == 0:
            write_metrics(out / METRICS_FILE, record)
        state.end_epoch()
        # export first: a crash before the training checkpoint redoes (and re-exports) the epoch
        exporter.after_epoch(state.epoch, ema.module if ema is not None else model, record)
        run.saver.save(state, record)

    final = state.history[-1] if state.history else {}
    val_acc = final.get("ema_val_acc", final.get("val_acc", 0.0))
    return state.history, sorted(exporter.exports), float(val_acc)
