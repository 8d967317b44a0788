"""``timm-remem demo``: the offline demo end to end (``--quick``), and its flag checks."""

from __future__ import annotations

import json

import pytest

import timm_remem.cli as cli

pytestmark = pytest.mark.usefixtures("one_thread")


def test_demo_quick_prints_table_and_writes_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--no-progress", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    for stage in ("teacher: plain", "teacher: ReMem", "student: no teacher", "student <- plain teacher",
                  "student <- ReMem teacher"):
        assert stage in text
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    rows = json.loads((out / "demo.json").read_text())["rows"]
    assert len(rows) == 5 and all(r["n"] == 2 for r in rows)  # a small study: two seeds per arm
    assert "95% Student-t intervals over seeds [0, 1]" in text and "cannot show ReMem's effect" in text


def test_demo_rows_are_the_study_intervals_scipy_recomputes(tmp_path):
    import scipy.stats

    from timm_remem.train import DemoResult, run_demo

    res = run_demo(tmp_path / "demo", quick=True, progress=False)
    assert isinstance(res, DemoResult)
    runs = json.loads((tmp_path / "demo" / "study.json").read_text())["runs"]
    for row, arm, metric in (("student: no teacher", "student", "student_acc"), ("teacher: ReMem", "remem",
                                                                                   "teacher_acc")):
        values = [r[metric] for r in runs if r["arm"] == arm]
        low, high = scipy.stats.t.interval(0.95, 1, loc=sum(values) / 2, scale=scipy.stats.sem(values))
        got = next(r for r in res.rows if r["stage"] == row)
        if values[0] == values[1]:
            assert got[f"{metric}_low"] == got[f"{metric}_high"] == values[0]
        else:
            assert (got[f"{metric}_low"], got[f"{metric}_high"]) == (pytest.approx(low), pytest.approx(high))


@pytest.mark.parametrize(("argv", "message"), [
    (["--teacher-epochs", "0"], "--teacher-epochs must be a positive integer, got 0"),
    (["--student-epochs", "-1"], "--student-epochs must be a positive integer, got -1"),
    (["--threads", "-1"], "--threads must be an integer >= 0, got -1; 0 keeps torch's default"),
])
def test_bad_numbers_exit_2_before_anything_runs(argv, message, tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--output", str(tmp_path / "demo"), *argv]) == 2
    assert f"timm-remem demo: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_a_foreign_folder_with_a_demo_json_is_refused_and_kept(tmp_path, capsys):
    # A demo clears only its own earlier output: a folder of yours that happens to hold a demo.json is not one.
    out = tmp_path / "project"
    (out / "src").mkdir(parents=True)
    (out / "src" / "app.py").write_text("print('mine')\n")
    (out / "notes.txt").write_text("mine\n")
    (out / "demo.json").write_text("{}\n")
    assert cli.main(["demo", "--quick", "--no-progress", "--output", str(out)]) == 2
    assert "not a timm-remem study folder" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["demo.json", "notes.txt", "src"]
    assert (out / "src" / "app.py").read_text() == "print('mine')\n"


def test_a_rerun_clears_only_an_earlier_demo_of_its_own(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--no-progress", "--output", str(out)]) == 0
    (out / "mine.txt").write_text("mine\n")
    before = sorted(p.name for p in out.iterdir())
    assert cli.main(["demo", "--quick", "--no-progress", "--output", str(out)]) == 2
    assert "mine.txt, which the demo did not write" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before  # nothing removed
    (out / "mine.txt").unlink()
    (out / "study.md").write_text("stale\n")
    assert cli.main(["demo", "--quick", "--no-progress", "--output", str(out)]) == 0
    assert (out / "study.md").read_text() != "stale\n"  # a fresh demo
