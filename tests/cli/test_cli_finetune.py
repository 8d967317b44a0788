"""``timm-remem finetune``: flags reach FinetuneConfig, errors exit 2 with the fix (tiny models, a few batches)."""

from __future__ import annotations

import dataclasses

import pytest

import timm_remem.cli as cli
from timm_remem.cli import finetune
from timm_remem.train import FinetuneConfig

TINY = ["--img-size", "16", "--epochs", "1", "--limit-train-batches", "1", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def parse(argv: list[str]):
    return cli.build_parser().parse_args(["finetune", *argv])


def test_every_flag_reaches_the_config():
    args = parse([
        "--model", "test_vit", "--model-kwargs", '{"depth": 2}', "--pretrained", "--dataset", "folder",
        "--data-dir", "data", "--download", "--img-size", "16", "--num-classes", "7", "--output", "out",
        "--epochs", "4", "--batch-size", "8", "--eval-batch-size", "9", "--opt", "sgd", "--lr", "0.1",
        "--weight-decay", "0", "--momentum", "0.8", "--sched", "step", "--warmup-epochs", "1", "--min-lr", "1e-5",
        "--smoothing", "0.1", "--augment", "--mixup", "0.2", "--cutmix", "0.3", "--rho", "0.05", "--sam", "onepass",
        "--amp", "--clip-grad", "1.5", "--ema", "--ema-decay", "0.99", "--seed", "3", "--device", "cpu",
        "--workers", "2", "--limit-train-batches", "5", "--save-at", "4", "2", "--checkpoint-every", "10",
        "--keep-last", "3", "--resume", "auto", "--resume-mismatch", "allow", "--no-progress", "--alpha", "0.85",
        "--schedule", "constant",
        "--top-k", "2", "--learnable", "--log", "tensorboard", "wandb", "--lora-rank", "4", "--lora-alpha", "8",
        "--lora-dropout", "0.1", "--lora-targets", "qkv,fc1", "--train-per-class", "5", "--train-imbalance", "10",
        "--subset-seed", "2",
    ])
    expected = FinetuneConfig(
        model="test_vit", model_kwargs={"depth": 2}, pretrained=True, dataset="folder", data_dir="data",
        download=True, img_size=16, num_classes=7, output="out", epochs=4, batch_size=8, eval_batch_size=9,
        optimizer="sgd", lr=0.1, weight_decay=0.0, momentum=0.8, sched="step", warmup_epochs=1, min_lr=1e-5,
        label_smoothing=0.1, augment=True, mixup=0.2, cutmix=0.3, rho=0.05, sam="onepass", amp=True, clip_grad=1.5,
        ema=True, ema_decay=0.99, seed=3, device="cpu", num_workers=2, limit_train_batches=5, save_at=[2, 4],
        checkpoint_every=10, keep_last=3, resume="auto", resume_mismatch="allow", progress=False, alpha=0.85,
        schedule="constant", top_k=2,
        learnable=True, log=["tensorboard", "wandb"], lora_rank=4, lora_alpha=8.0, lora_dropout=0.1,
        lora_targets=["qkv", "fc1"], train_per_class=5, train_imbalance=10.0, subset_seed=2,
    )
    assert FinetuneConfig(**finetune.options(args)) == expected
    default = FinetuneConfig(model="other")
    untouched = [f.name for f in dataclasses.fields(FinetuneConfig)
                 if getattr(expected, f.name) == getattr(default, f.name)]
    # the command line covers every other field (adaptive is ASAM, the exact SAM's: it cannot go with --sam onepass)
    assert untouched == ["adaptive", "save_state"]
    assert finetune.options(parse(["--model", "m", "--rho", "0.5", "--adaptive"]))["adaptive"] is True


def test_flags_left_out_keep_the_library_default():
    assert finetune.options(parse(["--model", "test_vit"])) == {"model": "test_vit"}


@pytest.mark.parametrize(("argv", "value"), [([], None), (["--resume"], True), (["--resume", "auto"], "auto"),
                                             (["--resume", "runs/x/train-state/step-1"], "runs/x/train-state/step-1")])
def test_resume_forms(argv, value):
    assert finetune.options(parse(["--model", "test_vit", *argv])).get("resume") == value


def test_save_at_without_epochs_exports_nothing():
    assert finetune.options(parse(["--model", "test_vit", "--save-at"]))["save_at"] == []


def test_run_passes_only_the_given_options(monkeypatch, capsys):
    calls = []

    def fake(**kwargs):
        calls.append(kwargs)
        return type("Result", (), {"val_acc": 0.5, "checkpoints": ["c1", "c2"]})()

    monkeypatch.setattr(finetune, "finetune_teacher", fake)
    assert cli.main(["finetune", "--model", "test_vit", "--rho", "0.05"]) == 0
    assert calls == [{"model": "test_vit", "rho": 0.05}]
    assert capsys.readouterr().out == "teacher val acc 0.5000; checkpoints: c1, c2\n"


def test_conflicting_options_exit_2_with_the_fix(tmp_path, capsys):
    assert cli.main(["finetune", "--model", "test_vit", "--adaptive", "--output", str(tmp_path)]) == 2
    assert "adaptive=True (ASAM) needs rho > 0" in capsys.readouterr().err


def test_resume_without_checkpoint_exits_1(tmp_path, capsys):
    """A CheckpointError is a failure while running (exit 1), not a usage error."""
    assert cli.main(["finetune", "--model", "test_vit", *TINY, "--resume", "--output", str(tmp_path / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_bad_model_kwargs_json_is_an_argparse_error(capsys):
    assert cli.main(["finetune", "--model", "test_vit", "--model-kwargs", "{depth: 2"]) == 2
    assert "--model-kwargs is not valid JSON" in capsys.readouterr().err
