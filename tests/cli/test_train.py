"""Smoke tests of ``timm-remem finetune | distill | select | demo`` (tiny models, a few batches)."""

from __future__ import annotations

import json

import pytest

import timm_remem.cli as cli

TINY = ["--img-size", "16", "--epochs", "1", "--limit-train-batches", "1", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _with_train_commands(monkeypatch):
    # make sure the pipeline commands are registered, whether or not the CLI lists them already
    monkeypatch.setattr(cli, "_COMMAND_MODULES", tuple(dict.fromkeys((*cli._COMMAND_MODULES, "train"))))


def test_demo_quick_prints_table_and_writes_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--no-progress", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    for stage in ("teacher: plain", "teacher: ReMem", "student: no teacher", "student <- plain teacher",
                  "student <- ReMem teacher"):
        assert stage in text
    assert (out / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((out / "demo.json").read_text())["rows"]) == 5


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


def test_distill_without_teacher_trains_the_student_alone(tmp_path, capsys):
    assert cli.main(["distill", "--model", "test_resnet", *TINY, "--output", str(tmp_path)]) == 0
    assert "(teacher" not in capsys.readouterr().out


def test_conflicting_options_exit_2_with_the_fix(tmp_path, capsys):
    assert cli.main(["finetune", "--model", "test_vit", "--adaptive", "--output", str(tmp_path)]) == 2
    assert "adaptive=True (ASAM) needs rho > 0" in capsys.readouterr().err


def test_cached_logits_with_augmentation_is_refused(tmp_path, capsys):
    code = cli.main(["distill", "--model", "test_resnet", "--cache-teacher", "on", "--mixup", "0.2",
                     "--output", str(tmp_path)])
    assert code == 2
    assert "cache_teacher=True needs deterministic inputs" in capsys.readouterr().err


def test_resume_without_checkpoint_exit_2(tmp_path, capsys):
    assert cli.main(["finetune", "--model", "test_vit", *TINY, "--resume", "--output", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _exit_code(argv: list[str]) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse errors exit, unless main() turns them into a return code
        return exc.code


def test_bad_model_kwargs_json_is_an_argparse_error(capsys):
    assert _exit_code(["finetune", "--model", "test_vit", "--model-kwargs", "{depth: 2"]) == 2
    assert "--model-kwargs is not valid JSON" in capsys.readouterr().err


def test_unknown_flag_is_an_argparse_error(capsys):
    assert _exit_code(["distill", "--model", "test_resnet", "--temprature", "2"]) == 2
    assert "unrecognized arguments: --temprature" in capsys.readouterr().err
