"""The published CPU run in docs/evidence.md is what its raw rows say: every table cell is recomputed here from the
per-seed rows in docs/evidence/cpu-run-p*.json with scipy's Student-t interval (and the paired differences from the
same seeds), so a number edited by hand, or a table pasted from another run, fails. Two tables: student accuracy per
arm, and the teachers' sharpness per teacher arm."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
import scipy.stats

DOCS = Path(__file__).resolve().parents[1] / "docs"
ARMS = ["plain", "reweight-a0.7", "reweight-a0.85", "sam", "onepass", "remem-a0.7", "remem-a0.85", "student"]
STRENGTHS = ["4", "8", "16"]
SEEDS = [0, 1, 2, 3, 4]
ACCURACY_HEADER = ("| teacher strength P | arm | teacher acc | I(X; F_T) | student acc | student - plain (paired) "
                   "| verdict |")
SHARPNESS_HEADER = ("| teacher strength P | teacher arm | SAM increase (rho 0.05) | SAM increase - plain (paired) | "
                    "verdict | top Hessian eigenvalue | eigenvalue - plain (paired) | verdict |")


def _table(header: str) -> list[list[str]]:
    """The rows of the table under ``header`` (cells stripped), up to the first line that is not a row."""
    lines = (DOCS / "evidence.md").read_text(encoding="utf-8").splitlines()
    assert lines.count(header) == 1, f"one table with header {header!r}"
    rows = []
    for line in lines[lines.index(header) + 2:]:
        if not line.startswith("| "):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _interval(values: list[float]) -> tuple[float, float, float]:
    mean = statistics.fmean(values)
    if len(set(values)) == 1:  # no spread (scipy gives nan): the interval is the point itself
        return mean, mean, mean
    low, high = scipy.stats.t.interval(0.95, len(values) - 1, loc=mean, scale=scipy.stats.sem(values))
    return mean, low, high


def _accuracy_cell(values: list[float], signed: bool = False) -> tuple[str, float, float]:
    mean, low, high = _interval(values)
    return f"{mean:{'+' if signed else ''}.4f} ± {(high - low) / 2:.4f}", low, high


def _sharpness_cell(values: list[float], signed: bool = False) -> tuple[str, float, float]:
    """Rounded at the half-width's second significant digit."""
    mean, low, high = _interval(values)
    half = (high - low) / 2
    digits = min(max(1 - math.floor(math.log10(half)), 0), 10)
    return f"{mean:{'+' if signed else ''}.{digits}f} ± {half:.{digits}f}", low, high


def _runs(strength: str, arm: str) -> list[dict]:
    runs = json.loads((DOCS / "evidence" / f"cpu-run-p{strength}.json").read_text(encoding="utf-8"))["runs"]
    mine = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
    assert [r["seed"] for r in mine] == SEEDS
    return mine


def test_the_tables_hold_every_arm_of_every_strength():
    assert [(r[0], r[1]) for r in _table(ACCURACY_HEADER)][:-1] == [(p, a) for p in STRENGTHS for a in ARMS]
    assert [(r[0], r[1]) for r in _table(SHARPNESS_HEADER)] == [(p, a) for p in STRENGTHS for a in ARMS
                                                                if a != "student"]


@pytest.mark.parametrize("row", _table(ACCURACY_HEADER)[:-1], ids=lambda r: f"P{r[0]}-{r[1]}")
def test_every_published_accuracy_cell_follows_from_the_per_seed_rows(row):
    strength, arm, teacher, mi, student, paired, verdict = row
    mine = _runs(strength, arm)
    assert student == _accuracy_cell([r["student_acc"] for r in mine])[0]
    if arm == "student":
        assert teacher == mi == "-"
    else:
        assert teacher == _accuracy_cell([r["teacher_acc"] for r in mine])[0]
        assert mi == _accuracy_cell([r["mi"] for r in mine])[0]
    if arm == "plain":
        assert paired == verdict == "-"
        return
    plain = {r["seed"]: r["student_acc"] for r in _runs(strength, "plain")}
    text, low, high = _accuracy_cell([r["student_acc"] - plain[r["seed"]] for r in mine], signed=True)
    assert paired == text
    assert verdict == ("better" if low > 0 else "worse" if high < 0 else "no detectable difference at this N")


@pytest.mark.parametrize("row", _table(SHARPNESS_HEADER), ids=lambda r: f"P{r[0]}-{r[1]}")
def test_every_published_sharpness_cell_follows_from_the_per_seed_rows(row):
    strength, arm = row[:2]
    mine = _runs(strength, arm)
    plain = {r["seed"]: r for r in _runs(strength, "plain")}
    for metric, (value, paired, verdict) in (("sam_increase", row[2:5]), ("top_eigenvalue", row[5:8])):
        assert all(r["sharpness"]["settings"]["rho"] == 0.05 for r in mine)
        assert value == _sharpness_cell([r[metric] for r in mine])[0]
        if arm == "plain":
            assert paired == verdict == "-"
            continue
        text, low, high = _sharpness_cell([r[metric] - plain[r["seed"]][metric] for r in mine], signed=True)
        assert paired == text
        assert verdict == ("flatter" if high < 0 else "sharper" if low > 0 else "no detectable difference at this N")


def test_the_baseline_row_follows_from_its_rows():
    runs = json.loads((DOCS / "evidence" / "cpu-run-student-50.json").read_text(encoding="utf-8"))["runs"]
    cell = _accuracy_cell([r["student_acc"] for r in runs])[0]
    assert _table(ACCURACY_HEADER)[-1] == ["-", "student alone, 50 labelled images, 60 epochs", "-", "-", cell, "-",
                                           "-"]
