"""What a training run says on the console, all of it through the ``timm_remem.train`` logger.

Rank 0 of a run logs, at level INFO: one start-up line (what is about to run), ``resumed from <checkpoint> (epoch E,
step S)`` when it resumes, one summary line per epoch (whatever ``progress`` says) and the path of each export.
With ``progress=True`` the epoch's progress is a tqdm bar on a terminal (``sys.stderr.isatty()``); elsewhere (a log
file, a pipe, a batch job) it is a plain line every 10% of the epoch, so a redirected log stays small.

Where the lines go: the ``timm_remem.train`` logger (level INFO unless set otherwise) carries a
:class:`ConsoleHandler` that writes them to ``sys.stderr`` (through ``tqdm.write``, so a bar is not torn) as long as
the application has not configured logging itself. Once the root logger (or ``timm_remem``) has a handler, the
records go there instead, once, formatted the application's way. ``logging.getLogger("timm_remem.train")
.setLevel(logging.WARNING)`` silences a run.

Example:
    >>> from timm_remem.train.console import epoch_line
    >>> line = epoch_line("finetune", 2, {"epoch": 1, "train_loss": 2.25, "train_acc": 0.125, "val_loss": 2.0,
    ...                                   "val_acc": 0.25, "lr": 0.001, "epoch_time_s": 3.0, "samples_per_s": 450.0})
    >>> print(line.replace(", ", ",\\n"))
    finetune epoch 1/2: train loss 2.2500,
    train acc 0.1250,
    val loss 2.0000,
    val acc 0.2500,
    lr 0.001,
    3.0 s (450 img/s)
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from .config import TrainConfig

__all__ = ["LOGGER", "ConsoleHandler", "install_console", "count_text", "startup_line", "epoch_line",
           "resumed_line", "EpochProgress"]

LOGGER = "timm_remem.train"
# A plain progress line every this fraction of an epoch when stderr is not a terminal.
PLAIN_EVERY = 0.1

log = logging.getLogger(LOGGER)


def _handled_elsewhere() -> bool:
    """Whether records of ``timm_remem.train`` reach a handler the application installed (root or timm_remem)."""
    logger: logging.Logger | None = logging.getLogger(LOGGER)
    while logger is not None and logger.propagate:
        logger = logger.parent
        if logger is not None and logger.handlers:
            return True
    return False


class ConsoleHandler(logging.Handler):
    """Writes ``timm_remem.train`` records to the current ``sys.stderr`` (via ``tqdm.write``), unless the
    application configured logging (a handler on the root or ``timm_remem`` logger), which then shows them.

    Example:
        >>> handler = ConsoleHandler()
        >>> handler.level == logging.NOTSET
        True
    """

    def emit(self, record: logging.LogRecord) -> None:
        if _handled_elsewhere():
            return
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's contract: report, never raise
            self.handleError(record)


def install_console() -> None:
    """Give the ``timm_remem.train`` logger its :class:`ConsoleHandler` (once) and level INFO (unless set).

    Example:
        >>> install_console(); install_console()
        >>> sum(isinstance(h, ConsoleHandler) for h in logging.getLogger(LOGGER).handlers)
        1
    """
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
        logger.addHandler(ConsoleHandler())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


install_console()


def count_text(n: int) -> str:
    """A count the way people read it: ``850``, ``12.3K``, ``5.72M``, ``1.30B``.

    Example:
        >>> count_text(850), count_text(12_345), count_text(5_717_416), count_text(1_300_000_000)
        ('850', '12.3K', '5.72M', '1.30B')
    """
    for size, suffix, digits in ((1e9, "B", 2), (1e6, "M", 2), (1e3, "K", 1)):
        if n >= size:
            return f"{n / size:.{digits}f}{suffix}"
    return str(n)


def _sam(cfg: TrainConfig) -> str:
    if cfg.rho <= 0:
        return "SAM off"
    kind = "one-pass SAM" if cfg.sam == "onepass" else "ASAM" if cfg.adaptive else "SAM"
    return f"{kind} rho={cfg.rho:g}"


def _reweighting(cfg: TrainConfig) -> str | None:
    if not hasattr(cfg, "alpha"):
        return None  # a student: nothing to reweight
    if cfg.alpha is None:
        return "reweighting off"
    text = f"reweighting alpha={cfg.alpha:g} ({cfg.schedule}"
    if getattr(cfg, "top_k", None) is not None:
        text += f", top {cfg.top_k} blocks"
    if getattr(cfg, "learnable", False):
        text += ", learnable"
    return text + ")"


def startup_line(desc: str, cfg: TrainConfig, model: nn.Module, *, n_train: int | None, n_val: int | None,
                 device: Any, world: int, steps_per_epoch: int) -> str:
    """The one line a run starts with: model and parameter count, data, device, SAM, reweighting (and LoRA rank,
    teacher), the length of the run and the output folder.

    Example:
        >>> import torch
        >>> from timm_remem.train import FinetuneConfig
        >>> cfg = FinetuneConfig(model="test_vit", alpha=0.8, rho=0.05, epochs=2, output="runs/t")
        >>> line = startup_line("finetune", cfg, torch.nn.Linear(100, 10), n_train=1437, n_val=360, device="cpu",
        ...                     world=1, steps_per_epoch=23)
        >>> print(line.replace("; ", ";\\n"))
        finetune test_vit: 1.0K parameters;
        data digits: 1437 train / 360 val images;
        device cpu;
        SAM rho=0.05;
        reweighting alpha=0.8 (exponential);
        2 epochs x 23 steps;
        output runs/t
    """
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    params = f"{count_text(total)} parameters"
    if trainable != total:
        params += f" ({count_text(trainable)} trainable)"
    shown = lambda n: "?" if n is None else str(n)  # noqa: E731
    parts = [f"{desc} {cfg.model}: {params}",
             f"data {cfg.dataset}: {shown(n_train)} train / {shown(n_val)} val images",
             f"device {device}" + (f" x {world} processes" if world > 1 else "")]
    teacher = getattr(cfg, "teacher", None)
    if teacher is not None:
        parts.append(f"teacher {teacher} ({cfg.method}, T={cfg.temperature:g})")
    parts.append(_sam(cfg))
    reweighting = _reweighting(cfg)
    if reweighting is not None:
        parts.append(reweighting)
    if getattr(cfg, "lora_rank", None) is not None:
        parts.append(f"LoRA rank {cfg.lora_rank}")
    parts.append(f"{cfg.epochs} epochs x {steps_per_epoch} steps")
    parts.append(f"output {Path(cfg.output)}")
    return "; ".join(parts)


def resumed_line(checkpoint: Path, epoch: int, step: int) -> str:
    """``resumed from <checkpoint> (epoch E, step S)``: E is the 1-based epoch the checkpoint was written in.

    Example:
        >>> resumed_line(Path("runs/t/train-state/step-000000004"), 1, 4)
        'resumed from runs/t/train-state/step-000000004 (epoch 1, step 4)'
    """
    return f"resumed from {checkpoint} (epoch {epoch}, step {step})"


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else str(value)


def epoch_line(desc: str, epochs: int, record: Mapping[str, Any]) -> str:
    """The summary line of one epoch (the module example shows it)."""
    text = (f"{desc} epoch {record['epoch']}/{epochs}: train loss {_num(record['train_loss'], '.4f')}, "
            f"train acc {_num(record['train_acc'], '.4f')}, val loss {_num(record['val_loss'], '.4f')}, "
            f"val acc {_num(record['val_acc'], '.4f')}")
    if "ema_val_acc" in record:
        text += f", ema val acc {_num(record['ema_val_acc'], '.4f')}"
    if record.get("teacher_acc") is not None:
        text += f", teacher acc {_num(record['teacher_acc'], '.4f')}"
    return (text + f", lr {_num(record['lr'], '.3g')}, {_num(record['epoch_time_s'], '.1f')} s "
            f"({_num(record['samples_per_s'], '.0f')} img/s)")


class EpochProgress:
    """The progress of one epoch on rank 0: a tqdm bar on a terminal, else a plain line every 10% of the epoch.

    Args:
        desc: ``finetune``, ``distill``, ``train``.
        epoch: The 1-based epoch.
        epochs: The run's epoch count.
        steps: Steps of the epoch.
        start: Steps already done (a resumed epoch).
        enabled: Show progress at all (``cfg.progress`` on rank 0).

    Example:
        >>> p = EpochProgress("finetune", 1, 2, steps=20, start=0, enabled=True)
        >>> [p.line(done, {"loss": 2.0 * done, "correct": done, "count": 8 * done, "time": 0.1 * done})
        ...  for done in (1, 2, 4, 20)][1]
        'finetune epoch 1/2: 10% (2/20 steps), loss 0.2500, acc 0.1250, 80 img/s'
        >>> p.close()
    """

    def __init__(self, desc: str, epoch: int, epochs: int, *, steps: int, start: int, enabled: bool) -> None:
        self.desc, self.epoch, self.epochs, self.steps = desc, epoch, epochs, steps
        self.every = max(1, math.ceil(steps * PLAIN_EVERY))
        self.bar = None
        self.plain = False
        if enabled and _is_terminal():
            self.bar = tqdm(total=steps, initial=start, desc=f"{desc} {epoch}/{epochs}", leave=False,
                            dynamic_ncols=True, file=sys.stderr)
        else:
            self.plain = enabled

    def line(self, done: int, running: Mapping[str, Any]) -> str | None:
        """The plain progress line after ``done`` steps (None when none is due)."""
        if not self.plain or done % self.every or done >= self.steps:
            return None  # the epoch's summary line follows its last step
        count = max(running["count"], 1)
        return (f"{self.desc} epoch {self.epoch}/{self.epochs}: {100 * done // self.steps}% ({done}/{self.steps} "
                f"steps), loss {running['loss'] / count:.4f}, acc {running['correct'] / count:.4f}, "
                f"{running['count'] / max(running['time'], 1e-9):.0f} img/s")

    def update(self, done: int, running: Mapping[str, Any]) -> None:
        """After each step: advance the bar, or log the plain line when one is due."""
        if self.bar is not None:
            count = max(running["count"], 1)
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{running['loss'] / count:.3f}", acc=f"{running['correct'] / count:.3f}",
                                 img_s=f"{running['count'] / max(running['time'], 1e-9):.0f}", refresh=False)
            return
        text = self.line(done, running)
        if text is not None:
            log.info(text)

    def close(self) -> None:
        """Remove the bar (the epoch's summary line replaces it)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _is_terminal() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
