"""The published CPU run in docs/evidence.md is what its raw rows say: every table cell is recomputed here from the
per-seed rows in docs/evidence/cpu-run-p*.json with scipy's Student-t interval (and the paired differences from the
same seeds), so a number edited by hand, or a table pasted from another run, fails."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
import scipy.stats

DOCS = Path(__file__).resolve().parents[1] / "docs"
ROW = re.compile(r"^\| (\d+) \| ([\w.-]+) \| (.*?) \| (.*?) \| (.*?) \| (.*?) \| (.*?) \|$", re.M)


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    low, high = scipy.stats.t.interval(0.95, len(values) - 1, loc=mean, scale=scipy.stats.sem(values))
    return f"{mean:.4f} ± {(high - low) / 2:.4f}", low, high


def _rows():
    rows = ROW.findall((DOCS / "evidence.md").read_text(encoding="utf-8"))
    assert len(rows) == 21  # 3 teacher strengths x 7 arms
    return rows


@pytest.mark.parametrize("row", _rows(), ids=lambda r: f"P{r[0]}-{r[1]}")
def test_every_published_cell_follows_from_the_per_seed_rows(row):
    strength, arm, teacher, mi, student, paired, verdict = row
    runs = json.loads((DOCS / "evidence" / f"cpu-run-p{strength}.json").read_text(encoding="utf-8"))["runs"]
    mine = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
    assert [r["seed"] for r in mine] == [0, 1, 2, 3, 4]
    assert student == _cell([r["student_acc"] for r in mine])[0]
    if arm == "student":
        assert teacher == mi == "-"
    else:
        assert teacher == _cell([r["teacher_acc"] for r in mine])[0]
        assert mi == _cell([r["mi"] for r in mine])[0]
    if arm == "plain":
        assert paired == verdict == "-"
        return
    plain = {r["seed"]: r["student_acc"] for r in runs if r["arm"] == "plain"}
    text, low, high = _cell([r["student_acc"] - plain[r["seed"]] for r in mine])
    assert paired == ("+" if not text.startswith("-") else "") + text
    assert verdict == ("better" if low > 0 else "worse" if high < 0 else "no detectable difference at this N")


def test_the_baseline_row_follows_from_its_rows():
    runs = json.loads((DOCS / "evidence" / "cpu-run-student-50.json").read_text(encoding="utf-8"))["runs"]
    cell = _cell([r["student_acc"] for r in runs])[0]
    assert f"| student alone, 50 labelled images, 60 epochs | - | - | {cell} |" in (DOCS / "evidence.md").read_text(
        encoding="utf-8")
