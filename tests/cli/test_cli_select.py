"""``timm-remem select``: its flags, and the finetune -> distill -> select chain on tiny models."""

from __future__ import annotations

import json

import pytest

import timm_remem.cli as cli
from timm_remem.cli import select
from timm_remem.train import DistillConfig

TINY = ["--img-size", "16", "--epochs", "1", "--limit-train-batches", "1", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_flags_reach_the_config():
    args = cli.build_parser().parse_args(["select", "runs/t/checkpoints", "--model", "test_resnet", "--epochs", "2",
                                          "--cache-teacher", "on", "--method", "hard", "--no-progress",
                                          "--mi-score"])
    assert (args.teachers, args.mi_score) == ("runs/t/checkpoints", True)
    assert DistillConfig(**select.options(args)) == DistillConfig(model="test_resnet", epochs=2, cache_teacher=True,
                                                                  method="hard", progress=False)


def test_run_passes_only_the_given_options(monkeypatch, capsys):
    calls = []

    def fake(teachers, /, **kwargs):
        calls.append((teachers, kwargs))
        return type("Result", (), {"table": "| checkpoint |", "best": "ckpts/epoch-002"})()

    monkeypatch.setattr(select, "select_teacher", fake)
    assert cli.main(["select", "ckpts", "--model", "test_resnet", "--no-progress"]) == 0
    assert calls == [("ckpts", {"mi_score": False, "model": "test_resnet", "progress": False})]
    assert capsys.readouterr().out == "| checkpoint |\nbest teacher checkpoint: ckpts/epoch-002\n"


def test_finetune_distill_select_chain(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    assert cli.main(["finetune", "--model", "test_vit", *TINY, "--epochs", "2", "--save-at", "1", "2",
                     "--alpha", "0.8", "--rho", "0.05", "--output", str(teacher)]) == 0
    assert "checkpoints:" in capsys.readouterr().out
    last = teacher / "checkpoints" / "epoch-002"
    assert cli.main(["distill", "--model", "test_resnet", *TINY, "--teacher", str(last), "--method", "dist",
                     "--output", str(tmp_path / "student")]) == 0
    assert "(teacher " in capsys.readouterr().out
    assert cli.main(["select", str(teacher / "checkpoints"), "--model", "test_resnet", *TINY,
                     "--output", str(tmp_path / "select")]) == 0
    out = capsys.readouterr().out
    assert "best teacher checkpoint:" in out and "| checkpoint" in out


def test_help_shows_the_defaults_select_really_uses(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default output folder is relative
    assert cli.main(["finetune", "--model", "test_vit", *TINY, "--output", "teacher"]) == 0
    assert cli.main(["select", "teacher/checkpoints", "--model", "test_resnet", "--img-size", "16",
                     "--limit-train-batches", "1", "--no-progress"]) == 0
    monkeypatch.setenv("COLUMNS", "200")
    capsys.readouterr()
    assert cli.main(["select", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    config = json.loads((tmp_path / "runs" / "select" / "select.json").read_text())["config"]
    assert f"training epochs (default: {config['epochs']})" in text
    assert f"output folder of the run (default: {config['output']})" in text
