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


# --- what a reader sees at a glance (issue 12 item 8), checked on the Figure objects -----------------------------

def _has_error_bars(ax):
    return any(type(c).__name__ == "ErrorbarContainer" for c in ax.containers)


def test_select_figure_accuracy_axis_starts_at_0_and_has_a_title():
    from timm_remem.analysis.plots import select_figure

    fig = select_figure(SELECT_ROWS)
    (ax,) = fig.axes
    assert ax.get_ylim()[0] == 0.0 and ax.get_title()


def test_demo_figure_carries_the_caveat_and_settings_and_starts_at_0():
    from timm_remem.analysis.plots import demo_figure

    rows = [dict(r, student_acc_low=0.7, student_acc_high=0.9) if r["student_acc"] is not None else
            dict(r, teacher_acc_low=r["teacher_acc"] - 0.01, teacher_acc_high=r["teacher_acc"] + 0.01)
            for r in DEMO_ROWS]
    fig = demo_figure(rows, caveat="CAVEAT: pipeline only", settings="teachers: test_vit, 2 seeds")
    text = " ".join(t.get_text() for t in fig.texts)
    assert "CAVEAT: pipeline only" in text and "teachers: test_vit, 2 seeds" in text
    acc, times = fig.axes
    assert acc.get_ylim()[0] == 0.0 and all(ax.get_title() for ax in fig.axes)
    assert _has_error_bars(acc)  # the intervals are drawn


def test_study_figure_panels_have_titles_error_bars_and_the_caveat():
    from timm_remem.analysis.plots import study_figure

    iv = {"mean": 0.9, "half_width": 0.02, "low": 0.88, "high": 0.92}
    d = {"mean": 0.01, "half_width": 0.03, "low": -0.02, "high": 0.04}
    arms = [{"arm": "plain", "teacher_acc": iv, "student_acc": iv, "mi": iv, "vs_plain": None},
            {"arm": "remem", "teacher_acc": iv, "student_acc": iv, "mi": iv, "vs_plain": {"student_acc": d}}]
    runs = [{"arm": a, "seed": s, "teacher_acc": 0.9, "student_acc": 0.9, "mi": 0.9} for a in ("plain", "remem")
            for s in (0, 1)]
    fig = study_figure(arms, runs, caveat="only this setting", settings="seeds [0, 1]")
    acc, diff, plane = fig.axes
    assert all(ax.get_title() for ax in fig.axes)
    assert acc.get_ylim()[0] == 0.0
    assert _has_error_bars(acc) and _has_error_bars(diff)  # bars and the paired interval
    caps = next(c for c in diff.containers if type(c).__name__ == "ErrorbarContainer").lines[1]
    assert sorted(round(y, 6) for c in caps for y in c.get_ydata()) == [-0.02, 0.04]
    assert "only this setting" in fig.texts[0].get_text() and "seeds [0, 1]" in fig.texts[0].get_text()


def test_information_plane_colour_bar_has_integer_ticks():
    from timm_remem.analysis.plots import plot_information_plane

    points = [{"error": 0.1 * i, "i_xf": float(i), "name": f"ep{i}"} for i in range(5)]
    fig = plot_information_plane(points)
    bar = fig.axes[-1]
    ticks = list(bar.get_yticks())
    assert ticks == [0, 1, 2, 3, 4] and all(float(t).is_integer() for t in ticks)
    assert fig.axes[0].get_title()


def test_pruning_accuracy_axis_starts_at_0():
    rows = [{"kind": "mlp", "k": 0, "accuracy": 0.9, "i_xf": 2.0}, {"kind": "mlp", "k": 1, "accuracy": 0.85,
                                                                       "i_xf": 3.0}]
    fig = plot_pruning({"num_blocks": 1, "rows": rows})
    assert fig.axes[0].get_ylim()[0] == 0.0 and all(ax.get_title() for ax in fig.axes)
