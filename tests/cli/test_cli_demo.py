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
    assert len(json.loads((out / "demo.json").read_text())["rows"]) == 5


@pytest.mark.parametrize(("argv", "message"), [
    (["--teacher-epochs", "0"], "--teacher-epochs must be a positive integer, got 0"),
    (["--student-epochs", "-1"], "--student-epochs must be a positive integer, got -1"),
    (["--threads", "-1"], "--threads must be an integer >= 0, got -1; 0 keeps torch's default"),
])
def test_bad_numbers_exit_2_before_anything_runs(argv, message, tmp_path, capsys):
    assert cli.main(["demo", "--quick", "--output", str(tmp_path / "demo"), *argv]) == 2
    assert f"timm-remem demo: error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()
