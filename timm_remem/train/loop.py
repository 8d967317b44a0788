"""The training loop shared by teacher fine-tuning and student distillation: :func:`fit`.

One :func:`train_step` per batch, the schedule and EMA updated every step, an evaluation and a ``metrics.jsonl`` line
per epoch, resumable checkpoints and exports. Under torchrun every rank runs it and rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
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

from .. import distributed
from .._io import atomic_replace_dir
from ..checkpoint import get_rng_state, save_checkpoint
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
from .console import EpochProgress, epoch_line, log, resumed_line, startup_line
from .guards import StepGuard, TeacherWatch, check_finite, check_labels, checked_loss, label_fix, stop_on_bad_batch
from .lock import OutputLock
from .resume import EXPORT_DIR, METRICS_FILE, STATE_DIR, LoopState, prepare_output, restore, resumed_epoch
from .trackers import Trackers

__all__ = ["fit", "train_step", "evaluate", "accuracy", "check_finite", "checked_loss", "check_labels",
           "write_metrics"]

Compute = Callable[..., tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]]


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> int:
    """Number of correct top-1 predictions."""
    return int((logits.argmax(dim=-1) == target).sum())


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> tuple[float, float]:
    """Mean loss and accuracy, summed over every rank's shard.

    Raises:
        ConfigError: A batch with no sample or labels outside the model's classes, or no sample at all.
        TrainingError: A non-finite loss.
    """
    was_training = model.training
    model.eval()
    loss_sum, correct, count, problem = 0.0, 0, 0, None
    for i, (x, y, _) in enumerate(loader):
        x = x.to(device, non_blocking=True)
        with autocast():
            logits = model(x)
        problem = check_labels(y, logits.shape[-1])
        if problem is not None:
            problem = f"validation batch {i + 1} {problem}: {label_fix(problem, logits.shape[-1])}"
            break
        y = y.to(device, non_blocking=True)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += accuracy(logits, y)
        count += y.numel()
    model.train(was_training)
    bad = 1.0 if problem is not None else 0.0
    if distributed.is_distributed():
        loss_sum, correct, count, bad = distributed.all_reduce_sum([loss_sum, correct, count, bad])
    if bad:
        raise ConfigError(problem or "another rank's validation batch has labels outside the model's classes or no "
                                     "sample; see rank 0's message")
    if count == 0:
        raise ConfigError("the validation data holds no sample: an empty validation split (check the dataset and "
                          "its val split) would report accuracy 0")
    if not math.isfinite(loss_sum):
        raise TrainingError(
            f"evaluation gave a non-finite loss ({loss_sum}): the model's outputs hold NaN or inf (a diverged or "
            "broken checkpoint, or float16 overflow under amp). Check the weights (timm-remem inspect), or run "
            "without amp"
        )
    return loss_sum / count, correct / count


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
    loss2 = None
    if perturbed:
        with optimizer.second_pass(model):
            with autocast():
                loss2, _, _ = compute(x, target, idx, teacher_logits)
            _backward(loss2, scaler)  # a non-finite loss2 gives a non-finite gradient: second_step skips the step
    optimizer.second_step(zero_grad=True, scaler=scaler, max_grad_norm=clip_grad)
    if isinstance(check, StepGuard):
        # SAM skipped the step when a gradient was not finite: legitimate under a GradScaler (a float16 overflow,
        # the scale backs off), a diverged run without one, which stops here as the plain optimizers do
        check.after_step(optimizer, loss_value=value, gradient_finite=scaler is not None or not optimizer.stats.skipped,
                         perturbed_loss=loss2)
    return value, logits


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, compute: Compute, x: torch.Tensor,
               target: torch.Tensor, idx: torch.Tensor, *, scaler: torch.amp.GradScaler | None,
               autocast: Callable[[], contextlib.AbstractContextManager], clip_grad: float | None,
               check: Callable[[torch.Tensor], float]) -> tuple[float, torch.Tensor]:
    """One optimizer step; returns the loss value (checked by ``check``) and the logits of the first pass.

    With SAM the first pass's teacher logits are reused by the second (the teacher runs once per step). A
    :class:`~timm_remem.train.guards.StepGuard` ``check`` stops every optimizer path the same way when the step
    diverged; any other callable only checks the first pass's loss.
    """
    if isinstance(optimizer, SAM):
        return _sam_step(model, optimizer, compute, x, target, idx, scaler=scaler, autocast=autocast,
                         clip_grad=clip_grad, check=check)
    with autocast():
        loss, logits, _ = compute(x, target, idx, None)
    value = check(loss)
    guard = check if isinstance(check, StepGuard) else None
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if clip_grad is not None:
            scaler.unscale_(optimizer)
            dispatch_clip_grad(model.parameters(), clip_grad)
        scaler.step(optimizer)  # skips the update on inf/NaN gradients (a float16 overflow) and backs off
        scaler.update()
    else:
        loss.backward()
        if clip_grad is not None:
            dispatch_clip_grad(model.parameters(), clip_grad)
        if guard is not None and not guard.gradient(optimizer):  # would turn the weights into NaN: stop first
            guard.after_step(optimizer, loss_value=value, gradient_finite=False)
        optimizer.step()
    if guard is not None:
        guard.after_step(optimizer, loss_value=value)
    return value, logits


def write_metrics(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line to ``metrics.jsonl``; never through a symlink (one planted mid-run is refused)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError:
        if os.path.islink(path):
            raise ConfigError(f"{str(path)!r} became a symlink during the run; timm-remem writes nothing through "
                              "a symlink: remove it (the run's metrics.jsonl is a regular file)") from None
        raise
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _sync_buffers(model: nn.Module, ema: nn.Module | None) -> None:
    """Rank 0's BatchNorm statistics everywhere (rank 0 evaluates and saves)."""
    if distributed.get_world_size() > 1:
        distributed.broadcast_buffers(model)
        if ema is not None:
            distributed.broadcast_buffers(ema)


class _Checkpointer:
    """Writes the resumable training checkpoints on rank 0."""

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
        distributed.barrier()


class _Exporter:
    """Exports ``checkpoints/epoch-NNN`` after the ``save_at`` epochs."""

    def __init__(self, cfg: TrainConfig, out: Path, write_export: Callable[..., Any], resumed: bool, desc: str):
        self.save_at = [cfg.epochs] if cfg.save_at is None else list(cfg.save_at)
        self.folder = out / EXPORT_DIR
        self.write_export = write_export
        self.desc = desc
        self.exports = sorted(p for p in self.folder.glob("epoch-*") if p.is_dir()) if resumed else []

    def after_epoch(self, epoch: int, model: nn.Module, record: Mapping[str, Any]) -> None:
        if epoch not in self.save_at:
            return
        exported = self.folder / f"epoch-{epoch:03d}"
        if distributed.get_rank() == 0:
            atomic_replace_dir(partial(self.write_export, model, record=record), exported)
            log.info("%s epoch %d: exported %s", self.desc, epoch, exported)
        distributed.barrier()
        self.exports = [p for p in self.exports if p != exported] + [exported]


def _steps_per_epoch(cfg: TrainConfig, train_loader) -> int:
    steps = len(train_loader)
    if cfg.limit_train_batches is not None:
        steps = min(steps, cfg.limit_train_batches)
    if steps == 0:
        raise ConfigError("the training loader yields no batch; lower batch_size or check the dataset")
    return steps


def _sizes(train_loader, val_loader) -> tuple[int | None, int | None]:
    """The training and validation set sizes (every rank's validation shard counted once)."""
    def size(loader) -> int | None:
        if hasattr(loader, "dataset"):
            return len(loader.dataset)
        return 0 if isinstance(loader, (list, tuple)) and not loader else None

    n_train, n_val = size(train_loader), size(val_loader)
    if distributed.get_world_size() > 1:
        total, unknown = distributed.all_reduce_sum([n_val or 0, 1.0 if n_val is None else 0.0])
        n_val = None if unknown else int(total)
    return n_train, n_val


def _count(running: dict[str, Any], loss_value: float, logits: torch.Tensor, y: torch.Tensor) -> None:
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
        "epoch": state.epoch + 1, "step": state.step,
        "train_loss": running["loss"] / max(running["count"], 1),
        "train_acc": running["correct"] / max(running["count"], 1),
        "val_loss": val[0], "val_acc": val[1], "lr": lr,
        "epoch_time_s": epoch_time, "samples_per_s": running["count"] / max(epoch_time, 1e-9),
    }
    if distributed.get_world_size() > 1:
        record["world_size"] = distributed.get_world_size()
    return record


@dataclass
class _Run:
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
    watch: TeacherWatch
    num_classes: int | None


def _train_epoch(run: _Run, state: LoopState, train_loader) -> None:
    """Train the rest of the current epoch (from the resumed batch on)."""
    cfg = run.cfg
    run.model.train()
    train_loader.sampler.set_epoch(state.epoch, start_index=state.batch * cfg.batch_size)
    remaining = run.steps_per_epoch - state.batch
    progress = EpochProgress(run.desc, state.epoch + 1, cfg.epochs, steps=run.steps_per_epoch, start=state.batch,
                             enabled=cfg.progress and distributed.get_rank() == 0)
    t0, time_before = time.perf_counter(), state.running["time"]
    try:
        for i, (x, y, idx) in enumerate(train_loader):
            if i >= remaining:
                break
            stop_on_bad_batch(check_labels(y, run.num_classes), epoch=state.epoch, batch=state.batch,
                              num_classes=run.num_classes, state_dir=run.state_dir)
            x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
            target = y
            if run.mixup is not None:
                x, target = run.mixup(x, y)

            check = StepGuard(epoch=state.epoch, step=state.step, state_dir=run.state_dir,
                              teacher_finite=run.watch.take)
            loss_value, logits = run.step(x, target, idx, check=check)
            state.step += 1
            state.batch += 1
            if run.scheduler is not None:
                run.scheduler.step_update(num_updates=state.step)
            if run.ema is not None:
                run.ema.update(run.model, step=state.step)
            _count(state.running, loss_value, logits, y)
            state.running["time"] = time_before + time.perf_counter() - t0
            progress.update(state.batch, state.running)
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0 and state.batch < run.steps_per_epoch:
                run.saver.save(state, {})
    finally:
        progress.close()


def _evaluate_epoch(run: _Run, state: LoopState, val_loader, extra_metrics) -> dict[str, Any]:
    _sync_buffers(run.model, run.ema)
    record = _epoch_record(state, val=evaluate(run.model, val_loader, run.device, run.autocast),
                           lr=run.optimizer.param_groups[0]["lr"])
    if run.ema is not None:
        record["ema_val_loss"], record["ema_val_acc"] = evaluate(run.ema.module, val_loader, run.device,
                                                                 run.autocast)
    if extra_metrics is not None:
        record.update(extra_metrics())
    return record


def fit(cfg: TrainConfig, model: nn.Module, *, train_loader, val_loader, device: torch.device, compute: Compute,
        desc: str, write_export: Callable[[nn.Module, Path, Mapping[str, Any]], Any],
        extra_metrics: Callable[[], dict[str, Any]] | None = None,
        train_model: nn.Module | None = None) -> tuple[list[dict[str, Any]], list[Path], float]:
    """Train ``model`` with ``compute(x, y, idx, teacher_logits) -> (loss, logits, teacher_logits)``, holding the
    lock of ``cfg.output``.

    ``compute`` runs through ``train_model`` (``model`` or its DDP wrapper); the optimizer, EMA, checkpoints and
    exports (``write_export(model, folder, record=...)``) use ``model``.

    Returns:
        ``(history, exports, val_acc)``; ``val_acc`` is the EMA's when ``ema=True``.

    Raises:
        TrainingError: Another run holds the output folder; a non-finite loss or teacher logits.
        ConfigError: A batch with no sample or with labels outside the model's classes.
    """
    out = Path(cfg.output)
    lock = OutputLock(out) if distributed.is_main_process() else None
    distributed.run_on_main(lambda: lock.acquire())  # every rank refuses when the folder is another run's
    try:
        return _fit(cfg, model, out, train_loader=train_loader, val_loader=val_loader, device=device,
                    compute=compute, desc=desc, write_export=write_export, extra_metrics=extra_metrics,
                    train_model=model if train_model is None else train_model)
    finally:
        if lock is not None:
            lock.release()


def _open_trackers(cfg: TrainConfig, out: Path, resumed_step: int | None) -> Trackers | None:
    """The run's trackers on rank 0 (None elsewhere); a failure stops every rank."""
    if not cfg.log:
        return None
    opened: list[Trackers] = []
    distributed.run_on_main(lambda: opened.append(Trackers(cfg, out, resumed_step)))
    return opened[0] if opened else None


def _fit(cfg: TrainConfig, model: nn.Module, out: Path, *, train_loader, val_loader, device, compute, desc,
         write_export, extra_metrics, train_model):
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
    state, resumed_from = restore(cfg, out, state_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                                  scaler=scaler, ema=ema)
    prepare_output(cfg, out, resumed_from)
    n_train, n_val = _sizes(train_loader, val_loader)
    if distributed.get_rank() == 0:
        log.info(startup_line(desc, cfg, model, n_train=n_train, n_val=n_val, device=device,
                              world=distributed.get_world_size(), steps_per_epoch=steps_per_epoch))
        if resumed_from is not None:
            log.info(resumed_line(resumed_from, resumed_epoch(state), state.step))
    exporter = _Exporter(cfg, out, write_export, resumed_from is not None, desc)
    watch = TeacherWatch(compute)
    run = _Run(cfg, model, device, desc, steps_per_epoch, state_dir, optimizer, scheduler, autocast, ema, mixup,
               step=partial(train_step, train_model, optimizer, watch, scaler=scaler, autocast=autocast,
                            clip_grad=cfg.clip_grad),
               saver=_Checkpointer(cfg, state_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                                   scaler=scaler, ema=ema),
               watch=watch, num_classes=getattr(model, "num_classes", None) or None)

    trackers = _open_trackers(cfg, out, state.step if resumed_from is not None else None)
    failed = True
    try:
        while state.epoch < cfg.epochs:
            _train_epoch(run, state, train_loader)
            record = _evaluate_epoch(run, state, val_loader, extra_metrics)
            state.history.append(record)
            if distributed.get_rank() == 0:
                log.info(epoch_line(desc, cfg.epochs, record))
                write_metrics(out / METRICS_FILE, record)
                if trackers is not None:
                    trackers.log(record)
            state.end_epoch()
            # export first: a crash before the training checkpoint redoes (and re-exports) the epoch
            exporter.after_epoch(state.epoch, ema.module if ema is not None else model, record)
            run.saver.save(state, record)
        failed = False
    finally:
        if trackers is not None:
            trackers.close(failed=failed)

    final = state.history[-1] if state.history else {}
    val_acc = final.get("ema_val_acc", final.get("val_acc", 0.0))
    return state.history, sorted(exporter.exports), float(val_acc)
