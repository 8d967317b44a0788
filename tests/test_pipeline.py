"""Tests for timm_remem.pipeline: checkpoints, resume, teacher calls, selection, errors (tiny models, CPU)."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_remem.pipeline as pipeline
from timm_remem.checkpoint import list_checkpoints, verify_checkpoint
from timm_remem.errors import CheckpointError, ConfigError, TrainingError
from timm_remem.pipeline import (
    TrainResult,
    distill_student,
    finetune_teacher,
    select_teacher,
)

TINY = dict(dataset="digits", img_size=16, batch_size=64, eval_batch_size=512, progress=False)
VIT = dict(TINY, model="test_vit")
CNN = dict(TINY, model="test_resnet")


pytestmark = pytest.mark.usefixtures("one_thread")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    return finetune_teacher(**VIT, epochs=2, save_at=[1, 2], limit_train_batches=2, alpha=0.7, rho=0.05,
                            output=str(out))


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


def _crash_on_step(monkeypatch, n):
    """Make the n-th training step raise (simulating a kill), via the per-step loss check."""
    real = pipeline._check_finite
    calls = {"n": 0}

    def check(loss, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("simulated kill")
        return real(loss, **kwargs)

    monkeypatch.setattr(pipeline, "_check_finite", check)


RESUME = dict(VIT, epochs=2, limit_train_batches=3, alpha=0.8, rho=0.05, ema=True, ema_decay=0.9,
              model_kwargs={"drop_path_rate": 0.2}, save_at=[])


def test_resume_after_epoch_matches_uninterrupted(tmp_path, monkeypatch):
    full = finetune_teacher(**RESUME, output=str(tmp_path / "full"))
    _crash_on_step(monkeypatch, 5)  # step 5 is in epoch 2: only the epoch-1 checkpoint exists
    with pytest.raises(KeyboardInterrupt):
        finetune_teacher(**RESUME, output=str(tmp_path / "cut"))
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "train-state")] == ["step-000000003"]
    resumed = finetune_teacher(**RESUME, output=str(tmp_path / "cut"), resume=True)
    assert _same_weights(full.model, resumed.model)
    assert [r["step"] for r in resumed.history] == [3, 6]
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 2


def test_resume_mid_epoch_matches_uninterrupted(tmp_path, monkeypatch):
    opts = dict(RESUME, checkpoint_every=1)
    full = finetune_teacher(**opts, output=str(tmp_path / "full"))
    _crash_on_step(monkeypatch, 6)  # dies during step 6: the newest checkpoint is step 5, mid-epoch 2
    with pytest.raises(KeyboardInterrupt):
        finetune_teacher(**opts, output=str(tmp_path / "cut"))
    monkeypatch.undo()
    assert list_checkpoints(tmp_path / "cut" / "train-state")[-1].name == "step-000000005"
    resumed = finetune_teacher(**opts, output=str(tmp_path / "cut"), resume=True)
    assert _same_weights(full.model, resumed.model)


def test_resume_accepts_settings_that_json_turns_into_lists(tmp_path):
    opts = dict(VIT, epochs=2, limit_train_batches=1, save_at=[], model_kwargs={"img_size": (16, 16)})
    finetune_teacher(**opts, output=str(tmp_path))
    resumed = finetune_teacher(**opts, output=str(tmp_path), resume=True)  # finished already: nothing left to run
    assert [r["epoch"] for r in resumed.history] == [1, 2]


def test_resume_with_other_settings_is_refused(tmp_path):
    opts = dict(VIT, epochs=1, limit_train_batches=1, save_at=[])
    finetune_teacher(**opts, output=str(tmp_path))
    with pytest.raises(CheckpointError, match=r"other settings: lr=0.001 \(checkpoint\) vs 0.01 \(now\)"):
        finetune_teacher(**dict(opts, lr=0.01), output=str(tmp_path), resume=True)


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    opts = dict(VIT, epochs=1, limit_train_batches=1, save_at=[])
    finetune_teacher(**opts, output=str(tmp_path))
    with pytest.raises(ConfigError, match="already holds training checkpoints"):
        finetune_teacher(**opts, output=str(tmp_path))


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

    monkeypatch.setattr(pipeline, "distill_student", fake)
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
    seen = []

    def fake(cfg):
        seen.append(cfg.output)
        return TrainResult(output=tmp_path, model=torch.nn.Identity(), history=[], checkpoints=[],
                           val_acc=0.9 if "remem" in cfg.teacher else 0.8, teacher_acc=0.8)

    monkeypatch.setattr(pipeline, "distill_student", fake)
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
