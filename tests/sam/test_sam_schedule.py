"""Tests for timm_remem.sam.schedule: RhoScheduler beside a stock timm LR scheduler on one SAM optimizer.

References: the cosine and step formulas written out by hand (timm's documented shapes), the perturbation norm SAM
measures (it equals rho for one group), and, for every shape, a stock timm LR scheduler of the same class run on
a plain optimizer whose lr starts at the base rho (the same numbers must come out as rho).
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import timm.scheduler
import torch
from sam_reference import batches, make_closure, mlp
from timm.scheduler.scheduler import Scheduler

from timm_remem.sam import RHO_SCHEDULES, SAM, RhoScheduler

pytestmark = pytest.mark.usefixtures("one_thread")


def cosine(t, base, floor, warmup_t, warmup_init, t_initial):
    """timm's cosine with linear warm-up (warmup_prefix=False, one cycle), by hand."""
    if t < warmup_t:
        return warmup_init + t * (base - warmup_init) / warmup_t
    if t >= t_initial:
        return floor
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * t / t_initial))


def two_group_sam(model, base=torch.optim.SGD, **kwargs):
    params = list(model.parameters())
    groups = [{"params": params[:2], "rho": 0.1, "lr": 0.1}, {"params": params[2:], "rho": 0.4, "lr": 0.02}]
    return SAM(groups, base, momentum=0.9, **kwargs) if base is torch.optim.SGD else SAM(groups, base, **kwargs)


# ---------------------------------------------------------------------- values against the formulas
def test_cosine_rho_beside_stock_cosine_lr_matches_the_formula():
    model = mlp()
    opt = two_group_sam(model)
    lr_sched = timm.scheduler.CosineLRScheduler(opt, t_initial=8, lr_min=1e-3, warmup_t=2, warmup_lr_init=1e-4,
                                                t_in_epochs=False)
    rho_sched = RhoScheduler(opt, "cosine", t_initial=8, rho_min=0.01, warmup_t=2, warmup_rho_init=0.0,
                             t_in_epochs=False)
    for n, (x, y) in enumerate(batches(11)):
        for group, base_rho, base_lr in zip(opt.param_groups, (0.1, 0.4), (0.1, 0.02), strict=True):
            assert group["rho"] == pytest.approx(cosine(n, base_rho, 0.01, 2, 0.0, 8), abs=1e-15), n
            assert group["lr"] == pytest.approx(cosine(n, base_lr, 1e-3, 2, 1e-4, 8), abs=1e-15), n
        opt.step(make_closure(model, x, y))
        lr_sched.step_update(n + 1)
        rho_sched.step_update(n + 1)
    assert opt.param_groups[1]["rho"] == 0.01 and opt.param_groups[1]["lr"] == 1e-3  # past t_initial: the floors
    assert [g["initial_rho"] for g in opt.param_groups] == [0.1, 0.4]


def test_sam_perturbs_by_the_scheduled_rho_each_epoch():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.4, lr=0.05)
    lr_sched = timm.scheduler.CosineLRScheduler(opt, t_initial=5)
    rho_sched = RhoScheduler(opt, "step", decay_t=2, decay_rate=0.5, warmup_t=1, warmup_rho_init=0.05)
    seen = []
    for epoch, (x, y) in enumerate(batches(5)):
        opt.step(make_closure(model, x, y))
        seen.append(opt.stats.perturbation_norm)
        lr_sched.step(epoch + 1)
        rho_sched.step(epoch + 1)
    # step shape, warmup_prefix=True: epoch 0 warms up from 0.05; then 0.4 * 0.5 ** ((epoch - 1) // 2)
    assert seen == pytest.approx([0.05, 0.4, 0.4, 0.2, 0.2], rel=1e-9)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 5 / 5)), abs=1e-15)


def test_layer_decay_scales_the_lr_but_not_rho():
    model = mlp()
    params = list(model.parameters())
    groups = [{"params": params[:2], "lr_scale": 0.25}, {"params": params[2:], "lr_scale": 1.0}]
    opt = SAM(groups, torch.optim.SGD, rho=0.2, lr=0.1)
    lr_sched = timm.scheduler.CosineLRScheduler(opt, t_initial=4)
    rho_sched = RhoScheduler(opt, "cosine", t_initial=4)
    lr_sched.step(1)
    rho_sched.step(1)
    c = 0.5 * (1 + math.cos(math.pi / 4))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.1 * c * 0.25, 0.1 * c], abs=1e-15)
    assert [g["rho"] for g in opt.param_groups] == pytest.approx([0.2 * c, 0.2 * c], abs=1e-15)


def test_updates_mode_ignores_epoch_steps_and_the_other_way_round():
    opt = SAM(mlp().parameters(), rho=0.3, lr=0.1)
    by_update = RhoScheduler(opt, "cosine", t_initial=4, t_in_epochs=False)
    by_update.step(2)  # an epoch call on an update schedule changes nothing, as in timm
    assert opt.param_groups[0]["rho"] == 0.3
    by_epoch = RhoScheduler(opt, "cosine", t_initial=4)
    by_epoch.step_update(2)
    assert opt.param_groups[0]["rho"] == 0.3


_SHAPES = {
    "cosine": {"t_initial": 6, "lr_min": 0.01, "warmup_t": 2, "warmup_lr_init": 0.02, "cycle_limit": 2},
    "tanh": {"t_initial": 6, "lr_min": 0.01, "warmup_t": 1},
    "step": {"decay_t": 2, "decay_rate": 0.5, "warmup_t": 1},
    "multistep": {"decay_t": [2, 5], "decay_rate": 0.3},
    "poly": {"t_initial": 6, "power": 2.0, "lr_min": 0.01},
    "wsd": {"t_initial": 8, "decay_t": 3, "warmup_t": 2},
    "constant": {"warmup_t": 3, "warmup_lr_init": 0.0},
}


@pytest.mark.parametrize("shape", RHO_SCHEDULES)
def test_every_shape_gives_rho_what_the_stock_scheduler_gives_lr(shape):
    kwargs = _SHAPES[shape]
    opt = SAM(mlp().parameters(), rho=0.3, lr=0.1)
    rho_sched = RhoScheduler(opt, shape, **kwargs)
    twin_opt = torch.optim.SGD(mlp().parameters(), lr=0.3)
    cls = type(rho_sched.scheduler)
    stock = cls(twin_opt, **kwargs) if shape != "constant" else cls(twin_opt, decay_t=1, decay_rate=1.0, **kwargs)
    rhos, lrs = [opt.param_groups[0]["rho"]], [twin_opt.param_groups[0]["lr"]]
    for epoch in range(1, 14):
        rho_sched.step(epoch)
        stock.step(epoch)
        rhos.append(opt.param_groups[0]["rho"])
        lrs.append(twin_opt.param_groups[0]["lr"])
    assert rhos == lrs
    assert len(set(rhos)) > 1  # the shape moved rho


class _LinearRho(Scheduler):
    """A user's own timm scheduler: value_t = base * (1 + t), updated per step."""

    def __init__(self, optimizer):
        super().__init__(optimizer, param_group_field="lr", t_in_epochs=False)

    def _get_lr(self, t):
        return [v * (1 + t) for v in self.base_values]


def test_a_timm_scheduler_subclass_can_be_the_shape():
    model = mlp()
    opt = SAM(model.parameters(), rho=0.05, lr=0.1)
    sched = RhoScheduler(opt, _LinearRho)
    seen = []
    for n, (x, y) in enumerate(batches(3)):
        opt.step(make_closure(model, x, y))
        seen.append(opt.stats.perturbation_norm)
        sched.step_update(n + 1)
    assert seen == pytest.approx([0.05, 0.10, 0.15], rel=1e-9)
    assert opt.param_groups[0]["lr"] == 0.1


def test_timm_optimizer_factory_output_is_accepted():
    opt = timm.optim.create_optimizer_v2(mlp(), "samadamw", lr=1e-3, weight_decay=0.05, rho=0.2)
    RhoScheduler(opt, "cosine", t_initial=2).step(1)
    assert [g["rho"] for g in opt.param_groups] == pytest.approx([0.1, 0.1], abs=1e-15)


# ---------------------------------------------------------------------- resume
def _build(model, rho=0.2):
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=rho, lr=0.01, weight_decay=0.05)
    lr_sched = timm.scheduler.CosineLRScheduler(opt, t_initial=6, warmup_t=2, warmup_lr_init=1e-3,
                                                t_in_epochs=False)
    rho_sched = RhoScheduler(opt, "cosine", t_initial=6, warmup_t=2, rho_min=0.02, t_in_epochs=False)
    return opt, lr_sched, rho_sched


def _run(model, opt, lr_sched, rho_sched, data, start):
    rhos = []
    for n, (x, y) in enumerate(data[start:], start=start):
        opt.step(make_closure(model, x, y))
        rhos.append(opt.stats.perturbation_norm)
        lr_sched.step_update(n + 1)
        rho_sched.step_update(n + 1)
    return rhos


def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("how", ["state-dicts", "rebuilt-like-timm-train"])
def test_resume_is_bit_exact(how):
    data = batches(6)
    whole = mlp()
    reference = _run(whole, *_build(whole), data, 0)

    first = mlp()
    opt, lr_sched, rho_sched = _build(first)
    head = _run(first, opt, lr_sched, rho_sched, data[:3], 0)
    saved = _roundtrip({"model": first.state_dict(), "opt": opt.state_dict(), "lr": lr_sched.state_dict(),
                        "rho": rho_sched.state_dict()})

    resumed = mlp(seed=7)  # other weights: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    if how == "state-dicts":
        opt, lr_sched, rho_sched = _build(resumed, rho=0.9)  # another base rho: the state dicts must win
        opt.load_state_dict(saved["opt"])
        lr_sched.load_state_dict(saved["lr"])
        rho_sched.load_state_dict(saved["rho"])
    else:  # timm's train.py: load the optimizer, then build the schedulers (they read initial_*) and step them
        opt = SAM(resumed.parameters(), torch.optim.AdamW, rho=0.9, lr=0.5, weight_decay=0.05)
        opt.load_state_dict(saved["opt"])
        lr_sched = timm.scheduler.CosineLRScheduler(opt, t_initial=6, warmup_t=2, warmup_lr_init=1e-3,
                                                    t_in_epochs=False)
        rho_sched = RhoScheduler(opt, "cosine", t_initial=6, warmup_t=2, rho_min=0.02, t_in_epochs=False)
        lr_sched.step_update(3)
        rho_sched.step_update(3)
    tail = _run(resumed, opt, lr_sched, rho_sched, data, 3)
    assert head + tail == reference
    for a, b in zip(resumed.parameters(), whole.parameters(), strict=True):
        assert torch.equal(a, b)
    assert len(set(reference)) == 6  # rho moved on every step


def test_state_dict_is_plain_and_survives_deepcopy():
    opt = SAM(mlp().parameters(), rho=0.3, lr=0.1)
    sched = RhoScheduler(opt, "cosine", t_initial=5)
    sd = copy.deepcopy(sched.state_dict())
    assert sd["sched"] == "CosineLRScheduler" and sd["state"]["base_values"] == [0.3]
    assert "optimizer" not in sd["state"]
