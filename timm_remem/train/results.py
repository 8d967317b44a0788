"""What the training calls return: :class:`TrainResult`, :class:`SelectResult` and :class:`DemoResult`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["TrainResult", "SelectResult", "DemoResult"]


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        output: The run folder.
        model: The trained model (eval mode; a teacher stays reweighted, not merged).
        history: One dict of metrics per epoch (also in ``metrics.jsonl``).
        checkpoints: Exported checkpoint folders, oldest first.
        val_acc: Final validation accuracy (of the EMA weights when ``ema=True``), in [0, 1].
        teacher_acc: The teacher's validation accuracy (distillation only).
        wall_time: Seconds spent in this call.
        teacher_forwards: Teacher forward passes run during training (distillation only; cache hits not counted).
        trainable_params: Parameter elements the run trained (with LoRA: the adapters, the head and learnable
            factors; otherwise every parameter).
    """

    output: Path
    model: nn.Module
    history: list[dict[str, Any]]
    checkpoints: list[Path]
    val_acc: float
    teacher_acc: float | None = None
    wall_time: float = 0.0
    teacher_forwards: int = 0
    trainable_params: int = 0


@dataclass
class SelectResult:
    """Outcome of :func:`timm_remem.train.select_teacher`.

    Attributes:
        rows: One dict per checkpoint: ``checkpoint``, ``teacher_acc``, ``student_acc``, ``time_s`` (and
            ``mi_score`` when computed).
        best: The checkpoint whose student was most accurate.
        table: The printed table.
        plot: The PNG plot (None when matplotlib is missing).
        spearman: Spearman correlation between ``mi_score`` and ``student_acc`` (None when not computed).
    """

    rows: list[dict[str, Any]]
    best: Path
    table: str
    plot: Path | None
    spearman: float | None = None


@dataclass
class DemoResult:
    """Outcome of :func:`timm_remem.train.run_demo`: the table rows, the printed table, the plot and the total time."""

    rows: list[dict[str, Any]]
    table: str
    plot: Path | None
    output: Path
    wall_time: float
