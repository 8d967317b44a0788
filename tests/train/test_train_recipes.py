"""Tests for timm_remem.train.recipes (finetune_teacher, distill_student) and the loop they share (tiny models, CPU)."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from train_cases import CNN, VIT, short_teacher_run

from timm_remem.checkpoint import list_checkpoints, load_checkpoint, verify_checkpoint
from timm_remem.errors import CheckpointError, ConfigError, TrainingError
from timm_remem.sam import SAM
from timm_remem.train import FinetuneConfig, distill_student, finetune_teacher
from timm_remem.train.builders import create_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    return short_teacher_run(tmp_path_factory.mktemp("teacher"))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_finetune_writes_exports_state_and_metrics(teacher_run):
    out = teacher_run.output
    assert [p.name for p in teacher_run.checkpoints] == ["epoch-001", "epoch-002"]
    for p in teacher_run.checkpoints:
        assert (p / "config.json").is_file() and (p / "model.safetensors").is_file()
    states = list_checkpoints(out / "train-state")
    assert [p.name for p in states] == ["step-000000002", "step-000000004"]
    for p in states:
        verify_checkpoint(p)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2] and [r["step"] for r in lines] == [2, 4]
    assert all(0.0 <= r["val_acc"] <= 1.0 for r in lines)
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())


def test_export_is_merged_plain_timm_with_same_outputs(teacher_run):
    plain = timm.create_model(f"local-dir:{teacher_run.checkpoints[-1]}", pretrained=True).eval()
    assert not any("remem_scale" in k for k in plain.state_dict())
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), teacher_run.model.eval()(x), atol=1e-5, rtol=1e-5)


def test_export_config_records_remem_settings(teacher_run):
    remem = json.loads((teacher_run.checkpoints[-1] / "config.json").read_text())["remem"]
    assert remem["alpha"] == 0.7 and remem["rho"] == 0.05 and remem["merged"] is True


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoints(tmp_path, monkeypatch):
    real = F.cross_entropy
    calls = {"n": 0}

    def poisoned(input, target, *args, **kwargs):
        if kwargs.get("reduction", "mean") == "mean":  # training losses only, not the evaluation sums
            calls["n"] += 1
            if calls["n"] > 2:
                return real(input, target, *args, **kwargs) * float("nan")
        return real(input, target, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"loss became nan at epoch 2, step 3.*step-000000002"):
        finetune_teacher(**VIT, epochs=3, limit_train_batches=2, save_at=[1, 2, 3], output=str(out))
    states = list_checkpoints(out / "train-state")
    assert [p.name for p in states] == ["step-000000002"]
    verify_checkpoint(states[0])
    fresh = timm.create_model("test_vit", pretrained=False, img_size=16, num_classes=10)
    assert load_checkpoint(states[0], model=fresh, restore_rng=False).step == 2  # the kept checkpoint still loads
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["epoch-001"]


def _counting(model: torch.nn.Module) -> dict:
    calls = {"n": 0}
    model.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    return calls


def test_distill_with_sam_runs_teacher_once_per_step(tmp_path):
    teacher = timm.create_model("test_vit", pretrained=False, img_size=16, num_classes=10)
    calls = _counting(teacher)
    res = distill_student(**CNN, epochs=1, limit_train_batches=3, rho=0.05, cache_teacher=False, save_at=[],
                          output=str(tmp_path), teacher_model=teacher)
    val_batches = math.ceil(360 / 512)  # one teacher pass over the validation split for its accuracy
    assert calls["n"] == val_batches + 3
    assert res.teacher_forwards == 3


def test_distill_caches_teacher_logits_across_epochs(tmp_path):
    teacher = timm.create_model("test_vit", pretrained=False, img_size=16, num_classes=10)
    calls = _counting(teacher)
    distill_student(**dict(CNN, batch_size=512), epochs=2, save_at=[], save_state=False, output=str(tmp_path),
                    teacher_model=teacher)
    train_batches = math.ceil(1437 / 512)
    assert calls["n"] == 1 + train_batches  # validation pass + first epoch only; epoch 2 is served from the cache


def test_distill_from_exported_teacher_folder(teacher_run, tmp_path):
    res = distill_student(**CNN, epochs=1, limit_train_batches=1, save_at=[1], output=str(tmp_path),
                          teacher=str(teacher_run.checkpoints[-1]), method="dist", temperature=2.0)
    assert res.teacher_acc == pytest.approx(teacher_run.history[-1]["ema_val_acc"]
                                            if "ema_val_acc" in teacher_run.history[-1]
                                            else teacher_run.history[-1]["val_acc"])
    student = timm.create_model(f"local-dir:{res.checkpoints[0]}", pretrained=True)
    assert _same_weights(student, res.model)


def test_teacher_checkpoint_not_matching_its_config_is_refused(teacher_run, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(teacher_run.checkpoints[-1], bad)
    config = json.loads((bad / "config.json").read_text())
    config.setdefault("model_args", {})["embed_dim"] = 32  # test_vit's width is 64
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="do not match"):
        distill_student(**CNN, epochs=1, limit_train_batches=1, output=str(tmp_path / "s"), teacher=str(bad))


def test_teacher_with_other_class_count_is_refused(tmp_path):
    teacher = timm.create_model("test_vit", pretrained=False, img_size=16, num_classes=3)
    with pytest.raises(ConfigError, match="num_classes=3 differs from student num_classes=10"):
        distill_student(**CNN, epochs=1, output=str(tmp_path), teacher_model=teacher)


def test_amp_ema_clip_and_mixup_run(tmp_path):
    res = finetune_teacher(**VIT, epochs=1, limit_train_batches=2, amp=True, ema=True, clip_grad=1.0, mixup=0.8,
                           cutmix=1.0, label_smoothing=0.1, save_at=[], output=str(tmp_path))
    record = res.history[-1]
    assert math.isfinite(record["train_loss"]) and "ema_val_acc" in record


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown timm model 'vit_tinyy'"):
        finetune_teacher(**dict(VIT, model="vit_tinyy"), output=str(tmp_path))


def test_unknown_option_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['alpah'\]"):
        finetune_teacher(model="test_vit", alpah=0.8)


def test_adaptive_without_rho_is_a_clear_error():
    with pytest.raises(ConfigError, match="adaptive=True"):
        finetune_teacher(model="test_vit", adaptive=True)


@pytest.mark.parametrize(("name", "nesterov"), [("momentum", False), ("sgd", True), ("nesterov", True)])
def test_sam_wraps_the_named_sgd_variant(name, nesterov):
    """optimizer="momentum" is classical momentum under SAM too (timm's "momentum" is nesterov=False)."""
    model = torch.nn.Linear(3, 2)
    plain = create_optimizer(FinetuneConfig(model="test_vit", optimizer=name, lr=0.1), model)
    sam = create_optimizer(FinetuneConfig(model="test_vit", optimizer=name, lr=0.1, rho=0.05), model)
    assert isinstance(sam, SAM) and type(sam.base_optimizer) is torch.optim.SGD
    assert plain.defaults["nesterov"] is nesterov
    assert sam.base_optimizer.defaults["nesterov"] is nesterov
    assert sam.base_optimizer.defaults["momentum"] == 0.9
