"""Resuming a training run (timm_remem.train.resume): bit-exact continuation, refused mismatches (tiny models, CPU).

The kill-and-resume tests of the command line are in test_resume_kill.py.
"""

from __future__ import annotations

import logging

import pytest
import torch
from train_cases import VIT

import timm_remem.train.guards as guards
from timm_remem.checkpoint import list_checkpoints
from timm_remem.errors import CheckpointError, ConfigError
from timm_remem.train import FinetuneConfig, finetune_teacher
from timm_remem.train.resume import config_differences

pytestmark = pytest.mark.usefixtures("one_thread")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _crash_on_step(monkeypatch, n):
    """Make the n-th training step raise (simulating a kill), via the per-step loss check."""
    real = guards.check_finite
    calls = {"n": 0}

    def check(loss, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("simulated kill")
        return real(loss, **kwargs)

    monkeypatch.setattr(guards, "check_finite", check)

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
    with pytest.raises(CheckpointError, match=r"other settings \(saved -> now\):\n  lr: 0.001 -> 0.01\.\nResume"):
        finetune_teacher(**dict(opts, lr=0.01), output=str(tmp_path), resume=True)


def test_resume_with_another_architecture_lists_the_settings_not_the_state_dict_keys(tmp_path):
    """Other model kwargs make the weights not fit; the settings that differ are what the user needs to see."""
    opts = dict(VIT, epochs=1, limit_train_batches=1, save_at=[])
    finetune_teacher(**opts, alpha=0.8, model_kwargs={"depth": 2}, output=str(tmp_path))
    with pytest.raises(CheckpointError) as info:
        finetune_teacher(**opts, alpha=0.9, output=str(tmp_path), resume=True)
    message = str(info.value)
    lines = message.splitlines()
    assert lines[1:3] == ["  alpha: 0.8 -> 0.9;", '  model_kwargs: {"depth": 2} -> {}.']
    assert "missing keys" not in message and "unexpected keys" not in message


def test_resume_treats_a_setting_the_checkpoint_predates_as_its_default():
    """A checkpoint written before a config field existed (here: lora_rank, log) matches when it keeps its default."""
    saved = FinetuneConfig(model="test_vit", alpha=0.8).to_dict()
    for newer in ("lora_rank", "lora_dropout", "log"):
        saved.pop(newer)
    assert config_differences(saved, FinetuneConfig(model="test_vit", alpha=0.8)) == []
    assert config_differences(saved, FinetuneConfig(model="test_vit", alpha=0.8, lora_rank=4)) == [
        "lora_rank: unset -> 4"]


def test_resumed_run_says_where_it_resumed_from(tmp_path, caplog):
    opts = dict(VIT, epochs=2, limit_train_batches=2, save_at=[], checkpoint_every=1)
    finetune_teacher(**dict(opts), output=str(tmp_path / "full"))
    state = tmp_path / "cut" / "train-state"
    state.mkdir(parents=True)
    import shutil

    shutil.copytree(tmp_path / "full" / "train-state" / "step-000000003", state / "step-000000003")  # mid-epoch 2
    shutil.copy(tmp_path / "full" / "run-identity.json", tmp_path / "cut")  # what the run is computed from
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="timm_remem.train"):
        finetune_teacher(**opts, output=str(tmp_path / "cut"), resume=True)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("timm_remem.train")]
    assert f"resumed from {state / 'step-000000003'} (epoch 2, step 3)" in lines
    assert lines[0].startswith("finetune test_vit: ") and lines[1].startswith("resumed from ")


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    opts = dict(VIT, epochs=1, limit_train_batches=1, save_at=[])
    finetune_teacher(**opts, output=str(tmp_path))
    with pytest.raises(ConfigError, match="already holds training checkpoints"):
        finetune_teacher(**opts, output=str(tmp_path))


def test_another_runs_checkpoint_is_not_resumed_into_a_folder_that_holds_a_run(tmp_path):
    # Resuming run A's checkpoint with --output B, where B already holds a run: the two runs would mix (B's metrics
    # and exports with A's state). Into an empty folder it is fine: that is how a run is moved.
    opts = dict(VIT, epochs=1, limit_train_batches=1, save_at=[])
    finetune_teacher(**opts, output=str(tmp_path / "a"))
    finetune_teacher(**dict(opts, seed=7), output=str(tmp_path / "b"))
    before = sorted(p.name for p in (tmp_path / "b").rglob("*"))
    identity = (tmp_path / "b" / "run-identity.json").read_text()
    checkpoint = list_checkpoints(tmp_path / "a" / "train-state")[-1]
    with pytest.raises(ConfigError, match="holds a run of its own .* would mix the two runs"):
        finetune_teacher(**opts, output=str(tmp_path / "b"), resume=str(checkpoint))
    assert sorted(p.name for p in (tmp_path / "b").rglob("*")) == before
    assert (tmp_path / "b" / "run-identity.json").read_text() == identity
    finetune_teacher(**opts, output=str(tmp_path / "moved"), resume=str(checkpoint))


def test_a_resumed_runs_config_json_repeats_the_run_instead_of_resuming_it(tmp_path):
    # README: `--config OUTPUT/config.json --output new` re-runs a run. A run started with resume=<path> records
    # settings, not how it was started: repeating it must not continue from that checkpoint.
    import json

    from timm_remem.cli._config_file import file_options

    opts = dict(VIT, epochs=2, limit_train_batches=1, save_at=[], checkpoint_every=1)
    finetune_teacher(**opts, output=str(tmp_path / "a"))
    checkpoint = list_checkpoints(tmp_path / "a" / "train-state")[0]  # after step 1 of 2
    finetune_teacher(**opts, output=str(tmp_path / "moved"), resume=str(checkpoint))
    recorded = json.loads((tmp_path / "moved" / "config.json").read_text())
    assert recorded["resume"] is None
    repeated = file_options(str(tmp_path / "moved" / "config.json"), FinetuneConfig)
    assert repeated.get("resume") is None
