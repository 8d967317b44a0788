"""Tests for timm_remem.train.select: picking the teacher checkpoint with the best student, and the MI score's
Spearman correlation (tiny models, CPU)."""

from __future__ import annotations

import json
import math

import pytest
import scipy.stats
import torch
from train_cases import CNN, short_teacher_run

import timm_remem.train.select as select
from timm_remem.errors import ConfigError
from timm_remem.train import TrainResult, select_teacher
from timm_remem.train.select import average_ranks, spearman

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    return short_teacher_run(tmp_path_factory.mktemp("teacher"))


def test_select_picks_the_checkpoint_with_the_best_student(tmp_path, monkeypatch):
    for name in ("epoch-001", "epoch-002", "epoch-010"):
        (tmp_path / "ckpts" / name).mkdir(parents=True)
        (tmp_path / "ckpts" / name / "config.json").write_text("{}")
        (tmp_path / "ckpts" / name / "model.safetensors").write_bytes(b"")
    accs = {"epoch-001": 0.50, "epoch-002": 0.90, "epoch-010": 0.70}

    def fake(cfg):
        name = cfg.teacher.rsplit("/", 1)[-1]
        return TrainResult(output=tmp_path, model=torch.nn.Identity(), history=[], checkpoints=[],
                           val_acc=accs[name], teacher_acc=0.8)

    monkeypatch.setattr(select, "distill_student", fake)
    res = select_teacher(tmp_path / "ckpts", model="test_resnet", output=str(tmp_path / "sel"), progress=False)
    assert res.best.name == "epoch-002"
    assert [r["checkpoint"] for r in res.rows] == ["epoch-001", "epoch-002", "epoch-010"]  # natural order
    assert "* epoch-002" in res.table
    assert (tmp_path / "sel" / "select.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "sel" / "select.json").read_text())
    assert saved["best"].endswith("epoch-002")


def test_select_qualifies_checkpoints_with_the_same_name(tmp_path, monkeypatch):
    for run in ("plain", "remem"):
        (tmp_path / run / "checkpoints" / "epoch-003").mkdir(parents=True)
        (tmp_path / run / "checkpoints" / "epoch-003" / "config.json").write_text("{}")
        (tmp_path / run / "checkpoints" / "epoch-003" / "model.safetensors").write_bytes(b"")
    seen = []

    def fake(cfg):
        seen.append(cfg.output)
        return TrainResult(output=tmp_path, model=torch.nn.Identity(), history=[], checkpoints=[],
                           val_acc=0.9 if "remem" in cfg.teacher else 0.8, teacher_acc=0.8)

    monkeypatch.setattr(select, "distill_student", fake)
    dirs = [tmp_path / run / "checkpoints" / "epoch-003" for run in ("plain", "remem")]
    res = select_teacher(dirs, model="test_resnet", output=str(tmp_path / "sel"), progress=False)
    assert [r["checkpoint"] for r in res.rows] == ["plain/checkpoints/epoch-003", "remem/checkpoints/epoch-003"]
    assert len(set(seen)) == 2 and res.best == dirs[1]


def test_select_with_mi_score_reports_a_score_per_checkpoint(teacher_run, tmp_path):
    res = select_teacher(teacher_run.output / "checkpoints", **CNN, epochs=1, limit_train_batches=1,
                         output=str(tmp_path), mi_score=True)
    assert all(math.isfinite(r["mi_score"]) for r in res.rows)
    assert res.spearman is None  # a rank correlation over 2 checkpoints says nothing; it needs 3 or more


def test_select_end_to_end_writes_table_and_plot(teacher_run, tmp_path):
    res = select_teacher(teacher_run.output / "checkpoints", **CNN, epochs=1, limit_train_batches=1,
                         output=str(tmp_path))
    assert len(res.rows) == 2 and res.best in teacher_run.checkpoints
    assert (tmp_path / "select.md").read_text().startswith("| checkpoint")
    assert res.plot is not None and res.plot.stat().st_size > 1000


def test_select_accepts_a_finetune_run_folder(teacher_run, tmp_path):
    # the run folder holds its own config.json (the run's settings) but is not itself a checkpoint
    res = select_teacher(teacher_run.output, **CNN, epochs=1, limit_train_batches=1, output=str(tmp_path))
    assert sorted(res.rows[i]["checkpoint"] for i in range(2)) == ["epoch-001", "epoch-002"]


def test_select_without_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="holds no teacher checkpoints"):
        select_teacher(tmp_path, model="test_resnet", progress=False)


def test_spearman_matches_a_hand_computed_value_with_ties():
    # a = [1, 2, 2, 4, 5] has ranks [1, 2.5, 2.5, 4, 5]; b = [5, 6, 7, 8, 7] has ranks [1, 2, 3.5, 5, 3.5].
    # Centred (mean 3): ra = [-2, -.5, -.5, 1, 2], rb = [-2, -1, .5, 2, .5]; sum(ra*rb) = 4 + .5 - .25 + 2 + 1 = 7.25,
    # sum(ra^2) = 9.5, sum(rb^2) = 9.5, so rho = 7.25 / 9.5.
    assert average_ranks([5, 6, 7, 8, 7]).tolist() == [1.0, 2.0, 3.5, 5.0, 3.5]
    assert spearman([1, 2, 2, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(7.25 / 9.5, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_spearman_agrees_with_scipy(seed):
    g = torch.Generator().manual_seed(seed)
    n = 3 + seed
    a = torch.randint(0, 4, (n,), generator=g).double().tolist()  # few distinct values: many ties
    b = torch.rand(n, generator=g).double().tolist()
    expected = scipy.stats.spearmanr(a, b).statistic
    got = spearman(a, b)
    if math.isnan(expected):
        assert got is None
    else:
        assert got == pytest.approx(float(expected), abs=1e-12)


def test_spearman_is_none_when_undefined():
    assert spearman([0.1, 0.2], [1, 2]) is None  # two points
    assert spearman([1, 1, 1], [1, 2, 3]) is None  # a constant side
    assert spearman([1, float("nan"), 3], [1, 2, 3]) is None
    with pytest.raises(ConfigError, match="same length"):
        spearman([1, 2, 3], [1, 2])


def test_select_reports_spearman_over_three_checkpoints_without_scipy(tmp_path, monkeypatch):
    for name in ("epoch-001", "epoch-002", "epoch-003"):
        (tmp_path / "ckpts" / name).mkdir(parents=True)
        (tmp_path / "ckpts" / name / "config.json").write_text("{}")
        (tmp_path / "ckpts" / name / "model.safetensors").write_bytes(b"")
    accs = {"epoch-001": 0.5, "epoch-002": 0.9, "epoch-003": 0.7}

    def fake(cfg):
        return TrainResult(output=tmp_path, model=torch.nn.Identity(), history=[], checkpoints=[],
                           val_acc=accs[cfg.teacher.rsplit("/", 1)[-1]], teacher_acc=0.8)

    monkeypatch.setattr(select, "distill_student", fake)
    monkeypatch.setattr(select, "_mi_scores", lambda dirs, names, cfg: [1.0, 3.0, 2.0])
    monkeypatch.setitem(__import__("sys").modules, "scipy", None)  # "import scipy" now fails
    res = select_teacher(tmp_path / "ckpts", model="test_resnet", output=str(tmp_path / "sel"), progress=False,
                         mi_score=True)
    assert res.spearman == pytest.approx(1.0)
    assert "Spearman(MI score, student acc) = 1.0000 over 3 checkpoints" in res.table


# --- what select says (issue 12 item 4) ----------------------------------------------------------------------------

def _fake_checkpoints(tmp_path, monkeypatch, accs, times=None):
    for name in accs:
        (tmp_path / "ckpts" / name).mkdir(parents=True)
        (tmp_path / "ckpts" / name / "config.json").write_text("{}")
        (tmp_path / "ckpts" / name / "model.safetensors").write_bytes(b"")
    clock = iter([t for pair in (times or {}).values() for t in (0.0, pair)])

    def fake(cfg):
        return TrainResult(output=tmp_path, model=torch.nn.Identity(), history=[], checkpoints=[],
                           val_acc=accs[cfg.teacher.rsplit("/", 1)[-1]], teacher_acc=0.8)

    monkeypatch.setattr(select, "distill_student", fake)
    if times:
        monkeypatch.setattr(select.time, "perf_counter", lambda: next(clock))


def test_select_names_each_checkpoint_as_it_runs_and_the_files_it_wrote(tmp_path, monkeypatch, caplog):
    _fake_checkpoints(tmp_path, monkeypatch, {"epoch-001": 0.5, "epoch-002": 0.9})
    with caplog.at_level("INFO", logger="timm_remem.train"):
        select_teacher(tmp_path / "ckpts", model="test_resnet", output=str(tmp_path / "sel"), progress=False)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("select [1/2]: distilling a student from epoch-001 (")
    assert lines[1].startswith("select [2/2]: distilling a student from epoch-002 (")
    sel = tmp_path / "sel"
    assert lines[-1] == f"select: wrote {sel / 'select.json'}, {sel / 'select.md'}, {sel / 'select.png'}"


def test_select_table_uses_one_format_per_column(tmp_path, monkeypatch):
    _fake_checkpoints(tmp_path, monkeypatch, {"epoch-001": 0.5, "epoch-002": 0.9},
                      times={"epoch-001": 3.21, "epoch-002": 12.345})
    res = select_teacher(tmp_path / "ckpts", model="test_resnet", output=str(tmp_path / "sel"), progress=False)
    rows = [line.split("|") for line in res.table.splitlines()[2:4]]
    assert [r[4].strip() for r in rows] == ["3.2", "12.3"]  # times: 1 decimal, whatever their size
    assert [r[3].strip() for r in rows] == ["0.5000", "0.9000"]


@pytest.mark.parametrize(("accs", "scores", "reason"), [
    ({"epoch-001": 0.5, "epoch-002": 0.9}, [1.0, 2.0],
     "fewer than 3 checkpoints (2): a rank correlation needs at least 3"),
    ({"epoch-001": 0.5, "epoch-002": 0.9, "epoch-003": 0.7}, [1.5, 1.5, 1.5],
     "every MI score is the same (1.5000): a constant has no rank correlation"),
    ({"epoch-001": 0.7, "epoch-002": 0.7, "epoch-003": 0.7}, [1.0, 2.0, 3.0],
     "every student acc is the same (0.7000): a constant has no rank correlation"),
], ids=["two-checkpoints", "constant-scores", "tied-students"])
def test_select_says_why_the_correlation_is_missing(tmp_path, monkeypatch, accs, scores, reason):
    _fake_checkpoints(tmp_path, monkeypatch, accs)
    monkeypatch.setattr(select, "_mi_scores", lambda dirs, names, cfg: scores)
    res = select_teacher(tmp_path / "ckpts", model="test_resnet", output=str(tmp_path / "sel"), progress=False,
                         mi_score=True)
    assert res.spearman is None
    assert f"Spearman(MI score, student acc): not computed, {reason}" in res.table
    assert json.loads((tmp_path / "sel" / "select.json").read_text())["spearman_missing"] == reason
