"""Tests for timm_remem.checkpoint: exact round trips without pickle, integrity checks, crash safety."""

from __future__ import annotations

import json
import os
import random
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from timm.scheduler import CosineLRScheduler
from torch import nn

import timm_remem.checkpoint as ckpt
from timm_remem.checkpoint import (
    flatten_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    unflatten_state,
    verify_checkpoint,
)
from timm_remem.errors import CheckpointError
from timm_remem.sam import SAM


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 6, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def _assert_same_optimizer_state(a: dict, b: dict) -> None:
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for pid in a["state"]:
        sa, sb = a["state"][pid], b["state"][pid]
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
            else:
                assert sa[k] == sb[k], k


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4),
        lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.05),
    ],
    ids=["sgd", "adamw"],
)
def test_round_trip_is_bit_exact_and_training_continues_identically(tmp_path, make_opt):
    model = _model()
    opt = make_opt(model.parameters())
    _train(model, opt)
    save_checkpoint(tmp_path, model=model, optimizer=opt, epoch=1, step=3)

    model2 = _model(seed=99)
    opt2 = make_opt(model2.parameters())
    info = load_checkpoint(tmp_path, model=model2, optimizer=opt2)
    assert (info.epoch, info.step) == (1, 3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k
    _assert_same_optimizer_state(opt.state_dict(), opt2.state_dict())
    # behaviour: the next steps give identical weights (momentum / moments were restored)
    _train(model, opt, steps=2, seed=5)
    _train(model2, opt2, steps=2, seed=5)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_sam_optimizer_state_round_trip(tmp_path):
    def make(model):
        opt = SAM(model.parameters(), base_optimizer=torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
        return opt, CosineLRScheduler(opt, t_initial=6, t_in_epochs=False)

    def sam_steps(m, o, sched, seed, start):
        g = torch.Generator().manual_seed(seed)
        for i in range(2):
            x = torch.randn(5, 6, generator=g)
            m(x).square().mean().backward()
            o.first_step(zero_grad=True)
            m(x).square().mean().backward()
            o.second_step(zero_grad=True)
            sched.step_update(start + i + 1)  # the learning rate changes every step

    model = _model()
    opt, sched = make(model)
    sam_steps(model, opt, sched, 1, 0)
    save_checkpoint(tmp_path, model=model, optimizer=opt, scheduler=sched, step=2)
    model2 = _model(seed=3)
    opt2, sched2 = make(model2)
    load_checkpoint(tmp_path, model=model2, optimizer=opt2, scheduler=sched2)
    sam_steps(model, opt, sched, 7, 2)
    sam_steps(model2, opt2, sched2, 7, 2)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_scheduler_and_scaler_state_round_trip(tmp_path):
    from timm.scheduler import CosineLRScheduler

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sched = CosineLRScheduler(opt, t_initial=10, warmup_t=2, warmup_lr_init=0.01)
    for e in range(4):
        sched.step(e)
    scaler = torch.amp.GradScaler("cpu", init_scale=512.0, growth_interval=7)
    save_checkpoint(tmp_path, model=model, optimizer=opt, scheduler=sched, scaler=scaler, step=4)

    opt2 = torch.optim.SGD(_model().parameters(), lr=0.5)
    sched2 = CosineLRScheduler(opt2, t_initial=99)
    scaler2 = torch.amp.GradScaler("cpu")
    load_checkpoint(tmp_path, optimizer=opt2, scheduler=sched2, scaler=scaler2)
    assert sched2.t_initial == 10 and sched2.warmup_t == 2
    sched.step(5)
    sched2.step(5)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert scaler2.get_scale() == 512.0 and scaler2.get_growth_interval() == 7


def test_ema_weights_round_trip(tmp_path):
    from timm.utils import ModelEmaV3

    model = _model()
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, step=10)
    save_checkpoint(tmp_path, model=model, ema=ema, step=1)
    ema2 = ModelEmaV3(_model(seed=4), decay=0.5)
    load_checkpoint(tmp_path, ema=ema2)
    for k, v in ema.state_dict().items():
        assert torch.equal(v, ema2.state_dict()[k]), k


def test_rng_states_are_restored(tmp_path):
    torch.manual_seed(11)
    random.seed(12)
    np.random.seed(13)
    save_checkpoint(tmp_path, model=_model(), step=1)
    expected = (torch.rand(3), random.random(), np.random.rand(2))
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    load_checkpoint(tmp_path)
    got = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]
    np.testing.assert_array_equal(got[2], expected[2])


def test_files_are_safetensors_and_json_only(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    _train(model, opt)
    path = save_checkpoint(tmp_path, model=model, optimizer=opt, step=3, extra={"note": (1, 2)})
    for f in path.iterdir():
        if f.suffix == ".json":
            json.loads(f.read_text())
        else:
            assert f.suffix == ".safetensors"
            load_file(f)
    state_tensors = load_file(path / "state.safetensors")
    assert any(k.endswith("exp_avg_sq") for k in state_tensors)


def test_unpicklable_value_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="no pickle"):
        save_checkpoint(tmp_path, model=_model(), step=1, extra={"callback": object()})
    assert list_checkpoints(tmp_path) == []


def test_flatten_round_trip_keeps_tuples_int_keys_and_non_finite_floats():
    obj = {"state": {0: {"m": torch.arange(3.0)}}, "betas": (0.9, 0.99), "x": [float("-inf"), None, True]}
    tree, tensors = flatten_state(obj, "s")
    out = unflatten_state(json.loads(json.dumps(tree, allow_nan=False)), tensors)
    assert out["betas"] == (0.9, 0.99) and isinstance(out["betas"], tuple)
    assert list(out["state"]) == [0] and torch.equal(out["state"][0]["m"], torch.arange(3.0))
    assert out["x"] == [float("-inf"), None, True]


def test_truncated_file_is_detected(tmp_path):
    path = save_checkpoint(tmp_path, model=_model(), step=1)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path, model=_model())


def test_corrupted_bytes_are_detected(tmp_path):
    path = save_checkpoint(tmp_path, model=_model(), step=1)
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 does not match"):
        verify_checkpoint(path)


def test_checkpoint_without_manifest_is_incomplete(tmp_path):
    path = save_checkpoint(tmp_path, model=_model(), step=1)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="did not finish"):
        load_checkpoint(path, model=_model())


def test_run_directory_falls_back_to_previous_good_checkpoint(tmp_path):
    model = _model()
    save_checkpoint(tmp_path, model=model, step=1, epoch=1)
    newest = save_checkpoint(tmp_path, model=model, step=2, epoch=2)
    (newest / "state.json").write_text("{ broken")
    assert latest_checkpoint(tmp_path).name == "step-000000001"
    assert load_checkpoint(tmp_path, model=_model()).epoch == 1


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = _model()
    first = save_checkpoint(tmp_path, model=model, step=1)
    real = ckpt.atomic_write_json

    def fail_on_state(path, data, **kwargs):
        if path.name == "state.json":
            raise OSError("disk full (simulated)")
        return real(path, data, **kwargs)

    monkeypatch.setattr(ckpt, "atomic_write_json", fail_on_state)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*step-000000002': disk full \(simulated\)"):
        save_checkpoint(tmp_path, model=model, step=2, keep_last=1)
    assert list_checkpoints(tmp_path) == [first]
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary left behind
    verify_checkpoint(first)
    restored = _model(seed=5)
    load_checkpoint(tmp_path, model=restored)
    assert not torch.equal(restored[0].weight, model[0].weight)


def test_keep_last_prunes_oldest(tmp_path):
    model = _model()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model=model, step=step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000002", "step-000000003"]


def test_resaving_same_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, model=_model(), step=4, metrics={"acc": 0.1})
    save_checkpoint(tmp_path, model=_model(), step=4, metrics={"acc": 0.2})
    assert len(list_checkpoints(tmp_path)) == 1
    assert load_checkpoint(tmp_path).metrics == {"acc": 0.2}


def test_model_mismatch_names_the_keys(tmp_path):
    save_checkpoint(tmp_path, model=_model(), step=1)
    other = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 5))
    with pytest.raises(CheckpointError, match=r"shape mismatch \['3.weight: checkpoint \(3, 8\) vs model \(5, 8\)"):
        load_checkpoint(tmp_path, model=other)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "step-000000009")


def test_empty_run_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(tmp_path)


def test_tied_weights_are_saved(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    save_checkpoint(tmp_path, model=model, step=1)
    fresh = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    load_checkpoint(tmp_path, model=fresh)
    assert torch.equal(fresh[0].weight, model[0].weight) and torch.equal(fresh[1].weight, model[0].weight)


def test_failed_resave_of_the_same_step_keeps_the_old_one(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, model=_model(), step=4, metrics={"acc": 0.1})
    real = ckpt.atomic_write_json

    def fail_on_manifest(path, data, **kwargs):
        if path.name == "manifest.json":
            raise OSError("disk full (simulated)")
        return real(path, data, **kwargs)

    monkeypatch.setattr(ckpt, "atomic_write_json", fail_on_manifest)
    with pytest.raises(CheckpointError, match="simulated"):
        save_checkpoint(tmp_path, model=_model(seed=3), step=4, metrics={"acc": 0.2})
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000004"]
    assert load_checkpoint(tmp_path).metrics == {"acc": 0.1}


def test_a_crash_while_replacing_a_step_is_repaired_by_the_next_save(tmp_path):
    """A kill between moving the old ``step-N`` aside and moving the new one in leaves ``.old-step-N``."""
    first = save_checkpoint(tmp_path, model=_model(), step=4, metrics={"acc": 0.1})
    first.rename(tmp_path / ".old-step-000000004")
    (tmp_path / ".tmp-step-000000004-x1y2").mkdir()  # and the half-moved new one
    save_checkpoint(tmp_path, model=_model(), step=5, keep_last=None)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000004", "step-000000005"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000004", "step-000000005"]
    verify_checkpoint(tmp_path / "step-000000004")


def test_checkpoint_files_get_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path, model=_model(), ema=_model(), step=1)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir()}
    assert sorted(modes) == ["ema.safetensors", "manifest.json", "model.safetensors", "state.json",
                             "state.safetensors"]
    assert set(modes.values()) == {0o644} and stat.S_IMODE(path.stat().st_mode) == 0o755


def test_manifest_lists_every_file_the_loader_reads(tmp_path):
    path = save_checkpoint(tmp_path, model=_model(), ema=_model(), step=1)
    manifest = json.loads((path / "manifest.json").read_text())
    on_disk = sorted(p.name for p in path.iterdir() if p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk
    assert manifest["format_version"] == 1 and isinstance(manifest["timm_remem"], str)
