"""A study's statistics and report: per-arm intervals, paired differences against ``plain`` and their verdicts, the
tables (``study.md``), every number (``study.json``) and the plot (``study.png``); see ``docs/evidence.md``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import atomic_write_text
from .._table import format_table
from ..analysis.plots import plot_study
from .config import StudyConfig, sharpness_settings
from .stats import VERDICTS, Interval, mean_interval, paired_interval, sharpness_verdict, verdict

__all__ = ["StudyResult", "summarise", "format_study_table", "format_sharpness_table", "format_number", "write_report",
           "CAVEAT"]

_SHARPNESS = ("sam_increase", "top_eigenvalue")
_METRICS = ("teacher_acc", "student_acc", "mi", *_SHARPNESS)
#: What every study report says about its own reach.
CAVEAT = ("Intervals are Student-t over seeds (paired against plain on the same seeds); a verdict holds for this "
          "setting and this N only. Teachers trained from random weights on a small dataset do not reproduce "
          "ReMem's effect, which concerns teachers pretrained at scale.")


@dataclass
class StudyResult:
    """Outcome of :func:`~timm_remem.study.run_study`.

    Attributes:
        arms: One dict per arm: ``arm``, ``n``, ``teacher_acc`` / ``student_acc`` / ``mi`` / ``sam_increase`` /
            ``top_eigenvalue`` (interval dicts or None), ``sharpness`` (how many power iterations converged, or
            None), and ``vs_plain`` (paired differences, the student's ``verdict`` and the ``sharpness_verdicts``;
            None for ``plain`` itself or without it).
        runs: One dict per (arm, seed): ``arm``, ``seed``, ``teacher_acc``, ``student_acc``, ``mi``,
            ``sam_increase``, ``top_eigenvalue``, ``checkpoint``, ``sharpness`` (the stage's settings and details),
            ``times``.
        table: The printed table (also in ``study.md``).
        output: The study folder.
        files: The files written (``study.json``, ``study.md``, and ``study.png`` unless matplotlib is missing).
        plot: ``study.png`` or None.
        wall_time: Seconds spent in this call (runs skipped as finished cost nothing).
        verdicts: The possible verdicts.
    """

    arms: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    table: str
    output: Path
    files: list[Path]
    plot: Path | None
    wall_time: float
    verdicts: tuple[str, ...] = field(default=VERDICTS)


def _as_dict(iv: Interval, confidence: float | None) -> dict[str, Any]:
    return iv.to_dict() | ({} if confidence else {"low": None, "high": None, "half_width": None})


def _interval(values: list[float | None], confidence: float | None, name: str) -> dict[str, Any] | None:
    if not values or any(v is None for v in values):
        return None
    return _as_dict(mean_interval(values, confidence or 0.95, name=name), confidence)


def summarise(cfg: StudyConfig, arm_names: Sequence[str], runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-arm intervals and paired differences against ``plain`` (matched by seed), with verdicts.

    Example:
        >>> from timm_remem.study.config import StudyConfig
        >>> cfg = StudyConfig(teacher="t", student="s", seeds=2, arms=["plain", "student"])
        >>> runs = [{"arm": "plain", "seed": 0, "teacher_acc": 0.9, "student_acc": 0.80, "mi": 1.0},
        ...         {"arm": "plain", "seed": 1, "teacher_acc": 0.9, "student_acc": 0.82, "mi": 1.1},
        ...         {"arm": "student", "seed": 0, "teacher_acc": None, "student_acc": 0.70, "mi": None},
        ...         {"arm": "student", "seed": 1, "teacher_acc": None, "student_acc": 0.71, "mi": None}]
        >>> summarise(cfg, ["plain", "student"], runs)[1]["vs_plain"]["verdict"]
        'worse'
    """
    by_arm = {name: sorted((r for r in runs if r["arm"] == name), key=lambda r: r["seed"]) for name in arm_names}
    plain = {r["seed"]: r for r in by_arm.get("plain", [])}
    out = []
    for name in arm_names:
        rows = by_arm[name]
        entry: dict[str, Any] = {"arm": name, "n": len(rows), "seeds": [r["seed"] for r in rows]}
        for metric in _METRICS:
            entry[metric] = _interval([r.get(metric) for r in rows], cfg.confidence, f"{name} {metric}")
        measured = [r["sharpness"] for r in rows if r.get("sharpness")]
        entry["sharpness"] = {"runs": len(measured), "eigen_converged": sum(bool(m.get("eigen_converged"))
                                                                            for m in measured)} if measured else None
        entry["vs_plain"] = None
        if name != "plain" and plain:
            paired = [r for r in rows if r["seed"] in plain]
            diff: dict[str, Any] = {"seeds": [r["seed"] for r in paired],
                                    "sharpness_verdicts": dict.fromkeys(_SHARPNESS)}
            for metric in _METRICS:
                a = [r.get(metric) for r in paired]
                b = [plain[r["seed"]].get(metric) for r in paired]
                if not paired or any(v is None for v in a + b):
                    diff[metric] = None
                    continue
                iv = paired_interval(a, b, cfg.confidence or 0.95, name=f"{name} - plain {metric}")
                diff[metric] = _as_dict(iv, cfg.confidence)
                if metric == "student_acc":
                    diff["verdict"] = verdict(iv) if cfg.confidence else None
                elif metric in _SHARPNESS:
                    diff["sharpness_verdicts"][metric] = sharpness_verdict(iv) if cfg.confidence else None
            entry["vs_plain"] = diff
        out.append(entry)
    return out


def _cell(iv: dict[str, Any] | None, signed: bool = False) -> str:
    if iv is None:
        return "-"
    sign = "+" if signed else ""
    text = f"{iv['mean']:{sign}.4f}"
    return text if iv.get("half_width") is None else f"{text} ± {iv['half_width']:.4f}"


def format_number(iv: dict[str, Any] | None, signed: bool = False) -> str:
    """A sharpness cell: ``mean ± half-width`` rounded to the half-width's second significant digit (4 significant
    digits of the mean without an interval); ``-`` for None.

    Example:
        >>> format_number({"mean": 173.44, "half_width": 12.3}), format_number({"mean": -0.01234, "half_width": 0.0045},
        ...                                                                     signed=True)
        ('173 ± 12', '-0.0123 ± 0.0045')
    """
    if iv is None:
        return "-"
    mean, half = iv["mean"], iv.get("half_width")
    if half:
        digits = 1 - math.floor(math.log10(abs(half)))
    elif mean:
        digits = 3 - math.floor(math.log10(abs(mean)))
    else:
        digits = 4
    digits = min(max(digits, 0), 10)
    text = f"{mean:{'+' if signed else ''}.{digits}f}"
    return text if half is None else f"{text} ± {half:.{digits}f}"


def _batches(n: int) -> str:
    return f"{n} batch" if n == 1 else f"{n} batches"


def format_sharpness_table(cfg: StudyConfig, arms: Sequence[dict[str, Any]]) -> str | None:
    """The teachers' sharpness (a manipulation check: did the SAM arms flatten the teacher?): per teacher arm, each
    measure's mean ± half-width, its paired difference against ``plain`` and the verdict; None when nothing was
    measured."""
    rows_in = [a for a in arms if a.get("sam_increase") is not None or a.get("top_eigenvalue") is not None]
    opts = sharpness_settings(cfg)
    if not rows_in or opts is None:
        return None
    headers = ["arm", f"SAM increase (rho {opts['rho']:g})", "SAM increase - plain (paired)", "verdict",
               "top Hessian eigenvalue", "eigenvalue - plain (paired)", "verdict"]
    rows = []
    for a in rows_in:
        vs = a.get("vs_plain") or {}
        words = vs.get("sharpness_verdicts") or {}
        rows.append([a["arm"], format_number(a.get("sam_increase")), format_number(vs.get("sam_increase"), True),
                     words.get("sam_increase") or "-", format_number(a.get("top_eigenvalue")),
                     format_number(vs.get("top_eigenvalue"), True), words.get("top_eigenvalue") or "-"])
    runs = sum((a.get("sharpness") or {}).get("runs", 0) for a in rows_in)
    converged = sum((a.get("sharpness") or {}).get("eigen_converged", 0) for a in rows_in)
    eigen = (f"the Hessian's top eigenvalue by power iteration (at most {opts['iters']} iterations, relative tolerance "
             f"{opts['tol']:g}; {converged} of {runs} converged)") if opts["eigen"] else "no eigenvalue (eigen off)"
    caption = (f"Teacher sharpness on the same training images for every run (up to {_batches(opts['batches'])} of "
               f"{opts['batch_size']}, evaluation transform, task loss): SAM's loss increase at rho {opts['rho']:g} "
               f"and {eigen}; lower is flatter. flatter / sharper: the paired interval against plain lies wholly "
               "below / above 0.")
    return format_table(headers, rows) + f"\n\n{caption}"


def format_study_table(cfg: StudyConfig, arms: Sequence[dict[str, Any]]) -> str:
    """The study's Markdown tables: one row per arm, means ± half-widths of the intervals; then, when the teachers'
    sharpness was measured, its table (:func:`format_sharpness_table`).

    Example:
        >>> cfg = StudyConfig(teacher="t", student="s", seeds=2, arms=["plain"])
        >>> iv = {"mean": 0.9, "half_width": 0.01}
        >>> print(format_study_table(cfg, [{"arm": "plain", "n": 2, "teacher_acc": iv, "student_acc": iv,
        ...                                  "mi": None, "vs_plain": None}]).splitlines()[2])
        | plain | 2     | 0.9000 ± 0.0100 | -         | 0.9000 ± 0.0100 | -                            | -       |
    """
    headers = ["arm", "seeds", "teacher acc", "I(X; F_T)", "student acc", "student acc - plain (paired)",
               "verdict"]
    rows = []
    for a in arms:
        vs = a.get("vs_plain") or {}
        rows.append([a["arm"], str(a["n"]), _cell(a["teacher_acc"]), _cell(a["mi"]), _cell(a["student_acc"]),
                     _cell(vs.get("student_acc"), signed=True), vs.get("verdict") or "-"])
    if cfg.confidence:
        caption = f"mean ± half-width of the {100 * cfg.confidence:g}% Student-t intervals over seeds {cfg.seed_list}."
    else:
        caption = f"means over seeds {cfg.seed_list}; no intervals (confidence off)."
    sharpness = format_sharpness_table(cfg, arms)
    return format_table(headers, rows) + f"\n\n{caption}" + (f"\n\n{sharpness}" if sharpness else "")


def write_report(cfg: StudyConfig, arms: list[dict[str, Any]], runs: list[dict[str, Any]], out: Path, *,
                 wall_time: float, caveat: str = CAVEAT) -> StudyResult:
    """Write ``study.json`` (every number, per-seed rows included), ``study.md`` and ``study.png``."""
    table = format_study_table(cfg, arms)
    stage_times: dict[str, float] = {}
    for r in runs:
        for stage, t in (r.get("times") or {}).items():
            stage_times[stage] = stage_times.get(stage, 0.0) + float(t)
    public_runs = [{k: v for k, v in r.items() if k != "settings"} for r in runs]
    data = {"config": cfg.to_dict(), "confidence": cfg.confidence, "arms": arms, "runs": public_runs,
            "stage_times_s": stage_times, "wall_time_s": wall_time, "caveat": caveat}
    atomic_write_text(out / "study.json", json.dumps(data, indent=2, sort_keys=True) + "\n")
    atomic_write_text(out / "study.md", table + "\n\n" + caveat + "\n")
    settings = (f"teacher {cfg.teacher}, student {cfg.student}, {cfg.dataset}; seeds {cfg.seed_list}; "
                f"alpha {cfg.alpha}, schedule {cfg.schedule}, rho {cfg.rho}"
                + ("; checkpoint by select" if cfg.select else "; last teacher checkpoint"))
    plot = plot_study(arms, public_runs, out / "study.png", caveat=caveat, settings=settings)
    files = [out / "study.json", out / "study.md"] + ([plot] if plot is not None else [])
    return StudyResult(arms, public_runs, table, out, files, plot, wall_time)
