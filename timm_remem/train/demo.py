"""The offline demo: plain vs ReMem teacher on scikit-learn's digits, the same small CNN student from each, plus
the student alone (``timm-remem demo``).

Example:
    >>> from timm_remem.train.demo import DEMO_ALPHA, DEMO_RHO
    >>> DEMO_ALPHA, DEMO_RHO
    (0.85, 0.05)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from .._io import atomic_write_text
from .._validation import check_int
from ..analysis.plots import plot_demo
from ..errors import ConfigError
from ._table import format_table
from .recipes import distill_student, finetune_teacher
from .results import DemoResult, TrainResult

__all__ = ["run_demo", "DEMO_TEACHER", "DEMO_TEACHER_KWARGS", "DEMO_STUDENT", "DEMO_STUDENT_KWARGS", "DEMO_ALPHA",
           "DEMO_RHO"]

#: The demo's teacher: a small ViT (timm ``vit_tiny_patch16_224`` rebuilt for 32 px digits).
DEMO_TEACHER = "vit_tiny_patch16_224"
DEMO_TEACHER_KWARGS = {"patch_size": 8, "embed_dim": 96, "depth": 6, "num_heads": 3}
#: The demo's student: a CNN from timm (ResNet-18 at a quarter of its width).
DEMO_STUDENT = "resnet18"
DEMO_STUDENT_KWARGS = {"channels": (16, 32, 64, 128), "stem_width": 16}
#: ReMem settings of the demo (chosen a priori, not tuned on the demo's results).
DEMO_ALPHA = 0.85
DEMO_RHO = 0.05


def run_demo(output: str | os.PathLike = "remem-demo", *, quick: bool = False, progress: bool = True,
             seed: int = 0, teacher_epochs: int | None = None, student_epochs: int | None = None,
             threads: int | None = 1) -> DemoResult:
    """The offline demo: plain vs ReMem teacher on scikit-learn digits, the same CNN student from each.

    Five stages, each timed: a small ViT teacher trained plainly (AdamW); the same ViT, same seed, reweighted
    (``alpha=0.85``) and trained with SAM (``rho=0.05``); the student trained alone; the student distilled from each
    teacher's final checkpoint. Prints one table and saves ``demo.png``, ``demo.md`` and ``demo.json`` in
    ``output``; each teacher also exports checkpoints at a third, two thirds and the end of its training, ready for
    ``timm-remem select``. The teachers start from random weights: the demo exercises the whole pipeline, it cannot
    reproduce ReMem's effect, which concerns teachers pretrained at scale.

    Args:
        output: Output folder (each stage gets a sub-folder).
        quick: Tiny models and a few batches (a smoke test that runs in seconds).
        progress: Show progress bars and the table.
        seed: Seed of every stage.
        teacher_epochs: Override the teachers' epochs (default 12).
        student_epochs: Override the students' epochs (default 8).
        threads: torch intra-op threads while the demo runs (restored afterwards; None keeps torch's setting).
            The models are tiny, so one thread loses little on an idle machine and avoids the large slowdown
            of oversubscribed threads on a busy one.

    Returns:
        A :class:`DemoResult`.

    Example:
        >>> import tempfile
        >>> run_demo(tempfile.mkdtemp(), quick=True, progress=False).rows[0]["stage"]
        'teacher: plain'
    """
    if distributed.env_world_size() > 1:
        raise ConfigError(
            "the demo runs in one process; run `timm-remem demo` without torchrun (finetune, distill and select "
            "run under torchrun)"
        )
    if threads is not None:
        check_int("threads", threads, low=1)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run_demo(output, quick=quick, progress=progress, seed=seed, teacher_epochs=teacher_epochs,
                            student_epochs=student_epochs, threads=None)
        finally:
            torch.set_num_threads(previous)
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        if not (out / "demo.json").is_file():
            raise ConfigError(f"{str(out)!r} is not empty and holds no earlier demo; choose another --output")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if quick:
        teacher, teacher_kwargs = "test_vit", {}
        student, student_kwargs = "test_resnet", {}
        t_epochs, s_epochs, img, limit = 1, 1, 16, 2
    else:
        teacher, teacher_kwargs = DEMO_TEACHER, DEMO_TEACHER_KWARGS
        student, student_kwargs = DEMO_STUDENT, DEMO_STUDENT_KWARGS
        t_epochs, s_epochs, img, limit = 12, 8, 32, None
    t_epochs = teacher_epochs or t_epochs
    s_epochs = student_epochs or s_epochs
    common = dict(dataset="digits", img_size=img, seed=seed, progress=progress, limit_train_batches=limit,
                  batch_size=64, save_state=False)
    teacher_common = dict(common, model=teacher, model_kwargs=dict(teacher_kwargs), epochs=t_epochs, lr=1e-3,
                          weight_decay=0.05, warmup_epochs=min(2, t_epochs - 1),
                          save_at=sorted({max(1, t_epochs // 3), max(1, 2 * t_epochs // 3), t_epochs}))
    student_common = dict(common, model=student, model_kwargs=dict(student_kwargs), epochs=s_epochs, lr=2e-3,
                          weight_decay=0.05)

    rows: list[dict[str, Any]] = []

    def stage(name: str, fn: Callable[[], TrainResult], kind: str) -> TrainResult:
        if progress:
            print(f"== {name}")
        res = fn()
        row = {"stage": name, "teacher_acc": None, "student_acc": None, "time_s": res.wall_time}
        if kind == "teacher":
            row["teacher_acc"] = res.val_acc
        else:
            row["student_acc"] = res.val_acc
            row["teacher_acc"] = res.teacher_acc
        rows.append(row)
        return res

    plain = stage("teacher: plain", lambda: finetune_teacher(**teacher_common, output=str(out / "teacher-plain")),
                  "teacher")
    remem = stage("teacher: ReMem", lambda: finetune_teacher(**teacher_common, output=str(out / "teacher-remem"),
                                                             alpha=DEMO_ALPHA, rho=DEMO_RHO), "teacher")
    stage("student: no teacher", lambda: distill_student(**student_common, output=str(out / "student-alone"),
                                                         save_at=[]), "student")
    stage("student <- plain teacher", lambda: distill_student(**student_common, output=str(out / "student-plain"),
                                                              teacher=str(plain.checkpoints[-1])), "student")
    stage("student <- ReMem teacher", lambda: distill_student(**student_common, output=str(out / "student-remem"),
                                                              teacher=str(remem.checkpoints[-1])), "student")
    wall = time.perf_counter() - t_start
    table = format_table(["stage", "teacher acc", "student acc", "time (s)"],
                          [[r["stage"], r["teacher_acc"], r["student_acc"], r["time_s"]] for r in rows])
    table += (f"\n\ntotal {wall:.0f} s. Teachers: {teacher} {teacher_kwargs or ''} trained from scratch on digits "
              f"({t_epochs} epochs); ReMem = alpha {DEMO_ALPHA} + SAM rho {DEMO_RHO}. Student: {student} "
              f"{student_kwargs or ''} ({s_epochs} epochs). Not pretrained at scale: this shows the pipeline, not "
              "ReMem's effect.")
    plot = plot_demo(rows, out / "demo.png")
    atomic_write_text(out / "demo.md", table + "\n")
    atomic_write_text(out / "demo.json", json.dumps({"rows": rows, "wall_time_s": wall, "quick": quick,
                                                      "seed": seed}, indent=2) + "\n")
    if progress:
        print(table)
        if plot is not None:
            print(f"plot: {plot}")
    return DemoResult(rows, table, plot, out, wall)
