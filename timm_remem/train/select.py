"""ReMem's teacher-checkpoint selection (:func:`select_teacher`): a short distillation from every checkpoint, the
best student wins; :func:`spearman` says how well an MI score predicts the students.

Example:
    >>> from timm_remem.train.select import spearman
    >>> spearman([0.1, 0.4, 0.3, 0.9], [1, 3, 2, 4])
    1.0
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from .._io import atomic_write_text, claim_output_dir, write_into
from .._models import data_config
from .._table import format_table
from ..analysis.information import rank_checkpoints
from ..analysis.plots import plot_select
from ..data import create_dataset, create_loader
from ..errors import ConfigError
from ..teachers import list_exports, load_teacher_model
from .builders import dataset_classes, default_img_size
from .config import DistillConfig, make_config
from .console import install_console
from .recipes import distill_student
from .results import SelectResult

__all__ = ["select_teacher", "spearman", "spearman_missing", "average_ranks"]

_log = logging.getLogger(__name__)


def _say(text: str) -> None:
    """A line for the user, shown whatever ``progress`` says."""
    install_console()
    _log.info(text)


def average_ranks(values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``values`` (float64), ties sharing the average of the ranks they span.

    Example:
        >>> average_ranks([10.0, 20.0, 10.0, 5.0]).tolist()
        [2.5, 4.0, 2.5, 1.0]
    """
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    order = torch.argsort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    last = torch.cumsum(counts, 0).to(torch.float64)  # 1-based rank of the last member of each tie group
    mean_rank = last - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(x)
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation of ``a`` and ``b``; None with fewer than 3 pairs, a NaN or a constant side.

    Raises:
        ConfigError: ``a`` and ``b`` differ in length.

    Example:
        >>> spearman([1, 2, 3], [3, 2, 1])
        -1.0
        >>> spearman([1, 2], [1, 2]) is None
        True
    """
    if len(a) != len(b):
        raise ConfigError(f"spearman needs two sequences of the same length, got {len(a)} and {len(b)}")
    if len(a) < 3:
        return None
    x, y = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if torch.isnan(x).any() or torch.isnan(y).any():
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = torch.sqrt((rx * rx).sum() * (ry * ry).sum())
    if float(denom) == 0.0:
        return None
    value = float((rx * ry).sum() / denom)
    return max(-1.0, min(1.0, value)) if math.isfinite(value) else None


def spearman_missing(a: Sequence[float], b: Sequence[float], *, what: tuple[str, str] = ("MI score", "student acc"),
                     items: str = "checkpoints") -> str | None:
    """Why :func:`spearman` gives no correlation for ``a`` and ``b`` (None when it gives one).

    Example:
        >>> spearman_missing([1.0, 1.0, 1.0], [0.5, 0.6, 0.7])
        'every MI score is the same (1.0000): a constant has no rank correlation'
    """
    if len(a) < 3:
        return f"fewer than 3 {items} ({len(a)}): a rank correlation needs at least 3"
    for name, values in zip(what, (a, b), strict=True):
        if any(math.isnan(float(v)) for v in values):
            return f"a {name} is NaN"
        if len({float(v) for v in values}) == 1:
            return f"every {name} is the same ({float(values[0]):.4f}): a constant has no rank correlation"
    return None if spearman(a, b) is not None else "undefined (the ranks do not vary)"


def _unique_names(dirs: Sequence[Path]) -> list[str]:
    """Folder names, qualified by their parents where two share a name (``run/checkpoints/epoch-005``)."""
    names = [d.name for d in dirs]
    if len(set(names)) == len(names):
        return names
    common = Path(os.path.commonpath([str(d.resolve()) for d in dirs]))
    return [d.resolve().relative_to(common).as_posix() for d in dirs]


def _mi_scores(dirs: Sequence[Path], names: Sequence[str], cfg: DistillConfig) -> list[float]:
    """The :func:`~timm_remem.analysis.rank_checkpoints` score of each checkpoint (validation split)."""
    num_classes = dataset_classes(cfg)
    teachers = {}
    for d, name in zip(dirs, names, strict=True):
        teachers[name] = load_teacher_model(d, num_classes=num_classes, pretrained=cfg.teacher_pretrained,
                                            model_kwargs=cfg.teacher_kwargs, against=f"dataset {cfg.dataset!r}"
                                            ).to(torch.device("cpu")).eval()
    dc = data_config(next(iter(teachers.values())))
    size = default_img_size(cfg) or int(dc["input_size"][-1])
    val = create_dataset(cfg.dataset, cfg.data_dir, "val", img_size=size, mean=dc["mean"], std=dc["std"])
    loader = [(x, y) for x, y, _ in create_loader(val, cfg.eval_batch_size)]
    # the loader holds images normalised for the first checkpoint; every other one gets them re-normalised to its own
    ranking = rank_checkpoints(teachers, loader, progress=False, data_mean=dc["mean"], data_std=dc["std"])
    by_name = {r.name: r.score for r in ranking}
    return [float(by_name[name]) for name in names]


def _num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(rows: list[dict[str, Any]], best_i: int, mi_score: bool, spearman_value: float | None,
           missing: str | None) -> str:
    headers = ["checkpoint", "teacher acc", "student acc", "time (s)"] + (["MI score"] if mi_score else [])
    table_rows = [
        [("* " if i == best_i else "  ") + r["checkpoint"], _num(r["teacher_acc"]), _num(r["student_acc"]),
         _num(r["time_s"], 1)] + ([_num(r["mi_score"])] if mi_score else [])
        for i, r in enumerate(rows)
    ]
    table = format_table(headers, table_rows)
    table += f"\n\nbest: {rows[best_i]['checkpoint']} (student acc {rows[best_i]['student_acc']:.4f})"
    if spearman_value is not None:
        table += f"\nSpearman(MI score, student acc) = {spearman_value:.4f} over {len(rows)} checkpoints"
    elif mi_score:
        table += f"\nSpearman(MI score, student acc): not computed, {missing}"
    return table


def select_teacher(teachers: str | os.PathLike | Sequence[str | os.PathLike], /, *, mi_score: bool = False,
                   **kwargs: Any) -> SelectResult:
    """ReMem's checkpoint selection: distill a student briefly from each teacher checkpoint and keep the best.

    Every student starts from the same weights and sees the same inputs (teacher logits cached). Writes
    ``select.json``, ``select.md`` (the table) and ``select.png`` into ``output``.

    Args:
        teachers: A folder of checkpoint folders (e.g. ``runs/teacher/checkpoints``), a finetune run folder, or a
            list of checkpoint folders (see :func:`timm_remem.teachers.list_exports`).
        mi_score: Also score each checkpoint with :func:`timm_remem.analysis.rank_checkpoints` (MI-based; on the
            validation split) and report its Spearman correlation with student accuracy.
        **kwargs: :class:`~timm_remem.train.DistillConfig` fields for the short distillations (default
            ``epochs=3``, ``output="runs/select"``; ``save_at`` defaults to none and ``save_state`` to False).

    Raises:
        ConfigError: No checkpoints, bad distillation settings, or an ``output`` folder that is not timm-remem's
            to write (see :func:`timm_remem._io.claim_output_dir`).
        CheckpointError: A checkpoint folder that does not load.

    Example:
        >>> import tempfile
        >>> from timm_remem.train import finetune_teacher
        >>> root = tempfile.mkdtemp()
        >>> _ = finetune_teacher(model="test_vit", img_size=16, epochs=2, save_at=[1, 2], limit_train_batches=1,
        ...                      output=root + "/t", progress=False)
        >>> sel = select_teacher(root + "/t/checkpoints", model="test_resnet", img_size=16, epochs=1,
        ...                      limit_train_batches=1, output=root + "/s", progress=False)
        >>> sel.best.name in ("epoch-001", "epoch-002")
        True
    """
    options = {"epochs": 3, "output": "runs/select", "save_at": [], "save_state": False, **kwargs}
    if "teacher" in options:
        raise ConfigError("select_teacher takes the teachers as its first argument, not teacher=")
    base = make_config(DistillConfig, None, options)
    if base.stochastic_inputs and base.cache_teacher is None:
        _log.warning("select: augmentation or mixup is on, so teacher logits are not cached (slower)")
    out = Path(base.output)
    claim_output_dir(out, "select", create=False)  # checked before anything runs; claimed below
    dirs = list_exports(teachers)
    names = _unique_names(dirs)

    def claim() -> None:  # rank 0 decides; every rank raises its refusal (the claim itself is not sent)
        claim_output_dir(out, "select")

    distributed.run_on_main(claim)
    rows: list[dict[str, Any]] = []
    main = distributed.is_main_process()
    for i, (d, name) in enumerate(zip(dirs, names, strict=True)):
        if main:
            _say(f"select [{i + 1}/{len(dirs)}]: distilling a student from {name} ({d})")
        t0 = time.perf_counter()
        sub = dataclasses.replace(base, teacher=str(d), output=str(out / name.replace("/", "__")), resume=None)
        result = distill_student(sub)
        rows.append({"checkpoint": name, "path": str(d), "teacher_acc": result.teacher_acc,
                     "student_acc": result.val_acc, "time_s": time.perf_counter() - t0})
    rho, missing = None, None
    if mi_score:
        if main:
            _say(f"select: scoring {len(dirs)} checkpoints by mutual information")
        for row, s in zip(rows, _mi_scores(dirs, names, base), strict=True):
            row["mi_score"] = s
        scores, accs = [r["mi_score"] for r in rows], [r["student_acc"] for r in rows]
        rho, missing = spearman(scores, accs), spearman_missing(scores, accs)
    best_i = max(range(len(rows)), key=lambda i: (rows[i]["student_acc"], -i))
    table = _table(rows, best_i, mi_score, rho, missing)
    plot: Path | None = out / "select.png"
    if distributed.is_main_process():  # under torchrun, rank 0 writes the summary
        drawn: list[Path | None] = []  # matplotlib writes where it is told: into a private folder, then moved in
        write_into(out, lambda tmp: drawn.append(plot_select(rows, tmp / "select.png")))
        plot = plot if drawn[0] is not None else None
        atomic_write_text(out / "select.md", table + "\n")
        atomic_write_text(out / "select.json", json.dumps(
            {"rows": rows, "best": rows[best_i]["path"], "spearman": rho, "spearman_missing": missing,
             "config": base.to_dict()}, indent=2, sort_keys=True) + "\n")
        written = [out / "select.json", out / "select.md"] + ([plot] if plot is not None else [])
        if base.progress:
            print(table)
        _say("select: wrote " + ", ".join(str(p) for p in written))
    distributed.barrier()
    return SelectResult(rows, Path(rows[best_i]["path"]), table, plot, rho)
