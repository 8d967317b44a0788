"""``timm-remem distill``: flags reach DistillConfig, the student trains with or without a teacher."""

from __future__ import annotations

import pytest

import timm_remem.cli as cli
from timm_remem.cli import distill
from timm_remem.train import DistillConfig

TINY = ["--img-size", "16", "--epochs", "1", "--limit-train-batches", "1", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def parse(argv: list[str]):
    return cli.build_parser().parse_args(["distill", *argv])


def test_distillation_flags_reach_the_config():
    args = parse(["--model", "test_resnet", "--teacher", "runs/t/checkpoints/epoch-002", "--teacher-kwargs",
                  '{"img_size": 16}', "--no-teacher-pretrained", "--method", "dist", "--temperature", "2",
                  "--task-weight", "0.5", "--distill-weight", "3", "--cache-teacher", "on", "--epochs", "2",
                  "--opt", "sgd", "--smoothing", "0.1", "--workers", "1", "--save-at", "1", "--no-progress",
                  "--labels-per-class", "4"])
    expected = DistillConfig(model="test_resnet", teacher="runs/t/checkpoints/epoch-002",
                             teacher_kwargs={"img_size": 16}, teacher_pretrained=False, method="dist",
                             temperature=2.0, task_weight=0.5, distill_weight=3.0, cache_teacher=True, epochs=2,
                             optimizer="sgd", label_smoothing=0.1, num_workers=1, save_at=[1], progress=False,
                             labels_per_class=4)
    assert DistillConfig(**distill.options(args)) == expected


@pytest.mark.parametrize(("word", "value"), [("auto", None), ("on", True), ("off", False)])
def test_cache_teacher_words(word, value):
    assert distill.options(parse(["--model", "m", "--cache-teacher", word])) == {"model": "m", "cache_teacher": value}


def test_flags_left_out_keep_the_library_default():
    options = distill.options(parse(["--model", "test_resnet"]))
    assert options == {"model": "test_resnet"}
    assert DistillConfig(**options) == DistillConfig(model="test_resnet")


def test_distill_from_a_teacher_prints_both_accuracies(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    assert cli.main(["finetune", "--model", "test_vit", *TINY, "--output", str(teacher)]) == 0
    capsys.readouterr()
    assert cli.main(["distill", "--model", "test_resnet", *TINY, "--teacher", str(teacher / "checkpoints" /
                     "epoch-001"), "--method", "dist", "--output", str(tmp_path / "student")]) == 0
    assert "(teacher " in capsys.readouterr().out


def test_distill_without_teacher_trains_the_student_alone(tmp_path, capsys):
    assert cli.main(["distill", "--model", "test_resnet", *TINY, "--output", str(tmp_path)]) == 0
    assert "(teacher" not in capsys.readouterr().out


def test_cached_logits_with_augmentation_is_refused(tmp_path, capsys):
    code = cli.main(["distill", "--model", "test_resnet", "--cache-teacher", "on", "--mixup", "0.2",
                     "--output", str(tmp_path)])
    assert code == 2
    assert "cache_teacher=True needs deterministic inputs" in capsys.readouterr().err


def test_unknown_flag_is_an_argparse_error(capsys):
    assert cli.main(["distill", "--model", "test_resnet", "--temprature", "2"]) == 2
    assert "unrecognized arguments: --temprature" in capsys.readouterr().err
