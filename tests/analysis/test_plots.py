"""The figures: PNGs written through matplotlib's Figure API, without pyplot or a global backend change."""

from __future__ import annotations

import subprocess
import sys

import pytest

from timm_remem.analysis.plots import plot_demo, plot_pruning, plot_select

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SELECT_ROWS = [
    {"checkpoint": "epoch-002", "student_acc": 0.61, "teacher_acc": 0.70},
    {"checkpoint": "epoch-010", "student_acc": 0.66, "teacher_acc": 0.81},
]
DEMO_ROWS = [
    {"stage": "teacher: plain", "teacher_acc": 0.90, "student_acc": None, "time_s": 3.0},
    {"stage": "teacher: ReMem", "teacher_acc": 0.88, "student_acc": None, "time_s": 4.0},
    {"stage": "student <- plain teacher", "teacher_acc": 0.90, "student_acc": 0.80, "time_s": 1.5},
]


@pytest.mark.parametrize(("fn", "rows"), [(plot_select, SELECT_ROWS), (plot_demo, DEMO_ROWS)])
def test_plot_writes_a_png_and_returns_its_path(tmp_path, fn, rows):
    path = tmp_path / "out.png"
    assert fn(rows, path) == path
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plots_leave_pyplot_and_the_backend_alone(tmp_path):
    code = (
        "import sys, matplotlib; backend = matplotlib.rcParams._get('backend'); "
        "from timm_remem.analysis.plots import plot_demo, plot_select; "
        f"plot_select({SELECT_ROWS!r}, {str(tmp_path / 's.png')!r}); "
        f"plot_demo({DEMO_ROWS!r}, {str(tmp_path / 'd.png')!r}); "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot was imported'; "
        "assert matplotlib.rcParams._get('backend') == backend, 'the backend changed'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plot_select_and_demo_without_matplotlib_warn_and_return_none(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if matplotlib were missing
    assert plot_select(SELECT_ROWS, tmp_path / "s.png") is None
    assert plot_demo(DEMO_ROWS, tmp_path / "d.png") is None
    assert not (tmp_path / "s.png").exists()
    assert "pip install timm-remem[demo]" in caplog.text


def test_analysis_plots_without_matplotlib_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'timm-remem\[demo\]'"):
        plot_pruning({"num_blocks": 1, "rows": [{"kind": "mlp", "k": 0, "accuracy": 0.9, "i_xf": 2.0}]})
