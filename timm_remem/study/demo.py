"""The offline demo (``timm-remem demo``), a small :func:`~timm_remem.study.run_study` on scikit-learn's digits."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from .._io import OWNER_FILE, atomic_write_text, claim_output_dir
from .._table import format_table
from .._validation import check_int
from ..analysis.plots import plot_study
from ..errors import ConfigError
from ..train.demo import (
    DEMO_ALPHA,
    DEMO_RHO,
    DEMO_STUDENT,
    DEMO_STUDENT_KWARGS,
    DEMO_TEACHER,
    DEMO_TEACHER_KWARGS,
)
from ..train.results import DemoResult
from .report import CAVEAT, StudyResult
from .runner import run_study

__all__ = ["run_demo", "StudyDemoResult", "DEMO_SEEDS", "DEMO_CAVEAT"]

#: Seeds per arm: the fewest that give a confidence interval.
DEMO_SEEDS = 2
#: Printed under the table and on the picture.
DEMO_CAVEAT = ("The teachers start from random weights on digits, where a small CNN alone reaches ~98%: the demo "
               "exercises the pipeline and the statistics; it cannot show ReMem's effect, which concerns teachers "
               "pretrained at scale. Two seeds give wide intervals. " + CAVEAT.split(";")[0] + ".")
# Stage rows of the demo's table: (row name, study arm, metric).
_STAGES = (("teacher: plain", "plain", "teacher_acc"), ("teacher: ReMem", "remem", "teacher_acc"),
           ("student: no teacher", "student", "student_acc"), ("student <- plain teacher", "plain", "student_acc"),
           ("student <- ReMem teacher", "remem", "student_acc"))


@dataclass
class StudyDemoResult(DemoResult):
    """:class:`~timm_remem.train.DemoResult` plus the :class:`~timm_remem.study.StudyResult` behind it; ``rows``
    hold one row per stage with the mean over seeds and the interval (``*_low``, ``*_high``)."""

    study: StudyResult | None = None


def _stage_rows(study: StudyResult) -> list[dict[str, Any]]:
    arms = {a["arm"]: a for a in study.arms}
    rows = []
    for name, arm, metric in _STAGES:
        a = arms[arm]
        seeds = [r for r in study.runs if r["arm"] == arm]
        kind = "teacher" if metric == "teacher_acc" else "student"
        row: dict[str, Any] = {"stage": name, "teacher_acc": None, "student_acc": None, "n": a["n"],
                               "time_s": sum(float(r["times"].get(kind, 0.0)) for r in seeds)}
        for m in ("teacher_acc", "student_acc") if metric == "student_acc" else ("teacher_acc",):
            iv = a.get(m)
            if iv is not None:
                row[m], row[f"{m}_low"], row[f"{m}_high"] = iv["mean"], iv["low"], iv["high"]
        if metric == "student_acc" and arm != "plain" and a.get("vs_plain"):
            row["verdict_vs_plain"] = a["vs_plain"].get("verdict")
        rows.append(row)
    return rows


def run_demo(output: str | os.PathLike = "remem-demo", *, quick: bool = False, progress: bool = True,
             seed: int = 0, teacher_epochs: int | None = None, student_epochs: int | None = None,
             threads: int | None = 1, seeds: int = DEMO_SEEDS) -> StudyDemoResult:
    """The offline demo: a study of arms ``plain``, ``remem`` and ``student`` on digits over ``seeds`` seeds.

    For each seed: a small ViT teacher trained plainly and, reweighted (``alpha=0.85``) with SAM (``rho=0.05``), as
    ReMem; a small CNN student distilled from each and trained alone. Writes ``demo.png``, ``demo.md`` and
    ``demo.json`` beside the study's own files; each teacher exports checkpoints at a third, two thirds and the end.

    Args:
        output: Output folder (a study folder; a rerun replaces an earlier demo there).
        quick: Tiny models and a few batches (a smoke test that runs in seconds).
        progress: Show progress bars and the table.
        seed: First seed (the demo runs ``seed .. seed + seeds - 1``).
        teacher_epochs: Override the teachers' epochs (default 6).
        student_epochs: Override the students' epochs (default 4).
        threads: torch intra-op threads while the demo runs (restored afterwards; None keeps torch's setting); the
            models are tiny, so one thread loses little and avoids oversubscription on a busy machine.
        seeds: Seeds per arm (at least 2: the intervals need them).

    Returns:
        A :class:`StudyDemoResult` (a :class:`~timm_remem.train.DemoResult`).

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
    check_int("seeds", seeds, low=2, hint="the demo's confidence intervals need at least 2 seeds")
    if threads is not None:
        check_int("threads", threads, low=1)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return run_demo(output, quick=quick, progress=progress, seed=seed, teacher_epochs=teacher_epochs,
                            student_epochs=student_epochs, threads=None, seeds=seeds)
        finally:
            torch.set_num_threads(previous)
    out = Path(output)
    _clear_earlier_demo(out)
    if quick:
        teacher, teacher_kwargs, student, student_kwargs = "test_vit", {}, "test_resnet", {}
        t_epochs, s_epochs, img, limit = 1, 1, 16, 2
    else:
        teacher, teacher_kwargs = DEMO_TEACHER, dict(DEMO_TEACHER_KWARGS)
        student, student_kwargs = DEMO_STUDENT, {k: list(v) if isinstance(v, tuple) else v
                                                 for k, v in DEMO_STUDENT_KWARGS.items()}
        t_epochs, s_epochs, img, limit = 6, 4, 32, None
    t_epochs = teacher_epochs or t_epochs
    s_epochs = student_epochs or s_epochs
    common = dict(img_size=img, limit_train_batches=limit, batch_size=64, save_state=False)
    finetune = dict(common, epochs=t_epochs, lr=1e-3, weight_decay=0.05, warmup_epochs=min(2, t_epochs - 1),
                    save_at=sorted({max(1, t_epochs // 3), max(1, 2 * t_epochs // 3), t_epochs}))
    distill = dict(common, epochs=s_epochs, lr=2e-3, weight_decay=0.05, save_at=[])
    study = run_study(teacher=teacher, teacher_kwargs=teacher_kwargs, student=student, student_kwargs=student_kwargs,
                      dataset="digits", arms=["plain", "remem", "student"], seeds=seeds, first_seed=seed,
                      alpha=[DEMO_ALPHA], rho=DEMO_RHO, finetune=finetune, distill=distill,
                      mi={"max_samples": 360}, sharpness=None, device="cpu", output=str(out), progress=False)
    rows = _stage_rows(study)
    settings = (f"teachers: {_named(teacher, teacher_kwargs)} from scratch on digits, {t_epochs} epochs; ReMem = "
                f"alpha {DEMO_ALPHA} + SAM rho {DEMO_RHO}; student: {_named(student, student_kwargs)}, {s_epochs} "
                f"epochs; seeds {seed}..{seed + seeds - 1}; total {study.wall_time:.0f} s")
    stage_table = format_table(
        ["stage", "teacher acc", "student acc", "time (s, all seeds)"],
        [[r["stage"], _mean_pm(r, "teacher_acc"), _mean_pm(r, "student_acc"), f"{r['time_s']:.1f}"] for r in rows])
    table = f"{stage_table}\n\n{study.table}\n\n{settings}.\n{DEMO_CAVEAT}"
    plot = plot_study(study.arms, study.runs, out / "demo.png", caveat=DEMO_CAVEAT, settings=settings)
    atomic_write_text(out / "demo.md", table + "\n")
    summary = {"rows": rows, "wall_time_s": study.wall_time, "quick": quick, "seed": seed,
               "seeds": list(range(seed, seed + seeds)), "study": "study.json"}
    atomic_write_text(out / "demo.json", json.dumps(summary, indent=2) + "\n")
    if progress:
        print(table)
        print("wrote: " + ", ".join(str(p) for p in [out / "demo.md", out / "demo.json"] + ([plot] if plot else [])
                                    + study.files))
    return StudyDemoResult(rows, table, plot, out, study.wall_time, study=study)


# What a demo writes into its folder (besides the .timm-remem marker): the only entries a new demo clears.
_DEMO_ENTRIES = ("demo.json", "demo.md", "demo.png", "runs", "study-settings.json", "study.json", "study.md",
                 "study.png")


def _clear_earlier_demo(out: Path) -> None:
    """Remove what an earlier demo wrote in ``out``: only in a study folder with a ``demo.json`` and nothing but the
    demo's own entries (symlinks removed, never followed); otherwise refuse before removing anything."""
    if not out.is_dir() or out.is_symlink() or not any(out.iterdir()):
        return
    claim_output_dir(out, "study", create=False, what="--output")  # foreign folders are refused here
    if not (out / "demo.json").is_file() or (out / "demo.json").is_symlink():
        raise ConfigError(f"{str(out)!r} is not empty and holds no earlier demo; choose another --output")
    others = sorted(n for n in os.listdir(out) if n not in _DEMO_ENTRIES and not n.startswith(OWNER_FILE))
    if others:
        raise ConfigError(f"{str(out)!r} holds an earlier demo and also {', '.join(others[:5])}, which the demo did "
                          "not write: move them out, or choose another --output (nothing was removed)")
    for name in (*_DEMO_ENTRIES, *(n for n in os.listdir(out) if n.startswith(OWNER_FILE))):
        entry = out / name
        if entry.is_symlink() or entry.is_file():
            entry.unlink()
        elif entry.is_dir():
            shutil.rmtree(entry)


def _named(model: str, kwargs: dict[str, Any]) -> str:
    return f"{model} {kwargs}" if kwargs else model


def _mean_pm(row: dict[str, Any], key: str) -> str:
    if row.get(key) is None:
        return "-"
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    return f"{row[key]:.4f}" if low is None else f"{row[key]:.4f} ± {(high - low) / 2:.4f}"
