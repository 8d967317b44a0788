"""What a training run says on the console, through the ``timm_remem.train`` logger (rank 0, level INFO).

A start-up line, ``resumed from ...`` when resuming, one line per epoch and each export's path. With ``progress=True``
an epoch shows a tqdm bar on a terminal, else a plain line every 10% of it. :class:`ConsoleHandler` writes to stderr
until the application configures logging itself; ``logging.getLogger("timm_remem.train").setLevel(logging.WARNING)``
silences a run.

Example:
    >>> from timm_remem.train.console import epoch_line
    >>> line = epoch_line("train", 2, {"epoch": 1, "train_loss": 2.25, "train_acc": 0.125, "val_loss": 2.0,
    ...                                "val_acc": 0.25, "lr": 0.001, "epoch_time_s": 3.0, "samples_per_s": 450.0})
    >>> print(line)
    train epoch 1/2: train loss 2.2500, train acc 0.1250, val loss 2.0000, val acc 0.2500, lr 0.001, 3.0 s (450 img/s)
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
    """Writes ``timm_remem.train`` records to the current ``sys.stderr`` (via ``tqdm.write``), unless a handler
    on the root or ``timm_remem`` logger shows them."""

    def emit(self, record: logging.LogRecord) -> None:
        if _handled_elsewhere():
            return
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's contract: report, never raise
            self.handleError(record)


def install_console() -> None:
    """Give the ``timm_remem.train`` logger its :class:`ConsoleHandler` (once) and level INFO (unless set)."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
        logger.addHandler(ConsoleHandler())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


install_console()


def count_text(n: int) -> str:
    """A count the way people read it: ``850``, ``12.3K``, ``5.72M``, ``1.30B``."""
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
    """The line a run starts with: model, data, device, teacher, SAM, reweighting, LoRA, length and output."""
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
    """``resumed from <checkpoint> (epoch E, step S)``; E is 1-based."""
    return f"resumed from {checkpoint} (epoch {epoch}, step {step})"


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else str(value)


def epoch_line(desc: str, epochs: int, record: Mapping[str, Any]) -> str:
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
    """The progress of one epoch (1-based; ``start`` steps already done): a tqdm bar on a terminal, else a plain
    line every 10% of the epoch."""

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
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _is_terminal() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
