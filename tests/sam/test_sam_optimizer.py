"""Tests for timm_remem.sam.optimizer: every update is checked against the independent reference in sam_reference.

Covers the SAM / ASAM update, the API shape, argument errors, LR and rho schedulers, checkpoints, AMP, clipping,
accumulation, non-finite steps, in-place restore without allocation, ``every > 1``, the diagnostics, and that an
exception in either pass leaves the weights exactly at ``w``.
"""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from sam_reference import (
    assert_params_close,
    assert_params_differ,
    batches,
    loss_fn,
    make_closure,
    mlp,
    ref_groups,
    reference_perturbation,
    reference_sam_step,
    sam_two_step,
    two_groups,
)
from timm.scheduler import CosineLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from timm_remem.errors import ConfigError, RememError
from timm_remem.sam import SAM, _tensors


# ---------------------------------------------------------------------- update == reference
def test_sgd_base_matches_reference_with_per_group_rho():
    model, ref = mlp(), mlp()
    opt = SAM(two_groups(model), torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3)
    ref_opt = torch.optim.SGD(two_groups(ref), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for x, y in batches(5):
        sam_two_step(model, opt, x, y)
        reference_sam_step(ref, ref_opt, ref_groups(ref), x, y)
    assert_params_close(model, ref)
    assert_params_differ(model, mlp())  # it did move


def test_adamw_base_matches_reference_in_closure_usage():
    model, ref = mlp(), mlp()
    opt = SAM(two_groups(model, 0.1, 0.5), torch.optim.AdamW, lr=0.01, weight_decay=0.05)
    ref_opt = torch.optim.AdamW(two_groups(ref, 0.1, 0.5), lr=0.01, weight_decay=0.05)
    for x, y in batches(5):
        opt.step(make_closure(model, x, y))
        reference_sam_step(ref, ref_opt, ref_groups(ref, 0.1, 0.5), x, y)
    assert_params_close(model, ref)


@pytest.mark.parametrize("eta", [0.01, 0.0])
def test_adaptive_matches_asam_reference(eta):
    model, ref = mlp(), mlp()
    opt = SAM(two_groups(model, 0.5, 1.5), torch.optim.SGD, adaptive=True, eta=eta, lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(two_groups(ref, 0.5, 1.5), lr=0.1, momentum=0.9)
    for x, y in batches(4):
        sam_two_step(model, opt, x, y)
        reference_sam_step(ref, ref_opt, ref_groups(ref, 0.5, 1.5, adaptive=True, eta=eta), x, y)
    assert_params_close(model, ref)


def test_mixed_adaptive_groups_share_one_global_norm():
    model, ref = mlp(), mlp()
    params = list(model.parameters())
    groups = [{"params": params[:2], "adaptive": True, "rho": 1.0}, {"params": params[2:], "rho": 0.1}]
    opt = SAM(groups, torch.optim.SGD, lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    rp = list(ref.parameters())
    rgroups = [
        {"params": rp[:2], "rho": 1.0, "adaptive": True, "eta": 0.01},
        {"params": rp[2:], "rho": 0.1, "adaptive": False, "eta": 0.01},
    ]
    for x, y in batches(3):
        sam_two_step(model, opt, x, y)
        reference_sam_step(ref, ref_opt, rgroups, x, y)
    assert_params_close(model, ref)


def test_float32_model_matches_reference():
    model, ref = mlp(dtype=torch.float32), mlp(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    rg = [{"params": list(ref.parameters()), "rho": 0.2, "adaptive": False, "eta": 0.01}]
    for x, y in batches(4, dtype=torch.float32):
        sam_two_step(model, opt, x, y)
        reference_sam_step(ref, ref_opt, rg, x, y)
    assert_params_close(model, ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- API shape
def test_base_optimizer_shares_param_groups_and_state():
    model = mlp()
    opt = SAM(two_groups(model), torch.optim.AdamW, lr=1e-3)
    assert isinstance(opt.base_optimizer, torch.optim.AdamW)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert [g["rho"] for g in opt.param_groups] == [0.05, 0.3]
    opt.param_groups[1]["lr"] = 0.5
    assert opt.base_optimizer.param_groups[1]["lr"] == 0.5
    x, y = batches(1)[0]
    opt.step(make_closure(model, x, y))
    assert opt.state is opt.base_optimizer.state
    assert set(opt.state[model[0].weight]) == {"step", "exp_avg", "exp_avg_sq"}


def test_add_param_group_reaches_base_optimizer_with_sam_defaults():
    model = mlp()
    params = list(model.parameters())
    opt = SAM(params[:2], torch.optim.SGD, rho=0.2, lr=0.1)
    opt.add_param_group({"params": params[2:], "adaptive": True})
    assert len(opt.base_optimizer.param_groups) == 2
    assert opt.param_groups[1]["rho"] == 0.2 and opt.param_groups[1]["adaptive"] is True
    assert opt.param_groups[1]["lr"] == 0.1


def test_step_without_closure_raises_showing_both_usages():
    opt = SAM(mlp().parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"(?s)needs a closure.*opt\.step\(closure\).*first_step.*second_step"):
        opt.step()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rho": -0.1}, r"rho must be a finite number >= 0.*-0\.1"),
        ({"rho": float("nan")}, r"rho must be a finite number"),
        ({"eta": -1.0}, r"eta must be a finite number >= 0"),
        ({"every": 0}, r"every must be an integer >= 1.*got 0"),
        ({"adaptive": "yes"}, r"adaptive must be True or False"),
        ({"replay_rng": 1}, r"replay_rng must be True or False"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SAM(mlp().parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_base_optimizer_instance_is_rejected_with_fix():
    model = mlp()
    with pytest.raises(ConfigError, match=r"got an instance of SGD.*Pass the class"):
        SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1))


def test_group_rho_written_by_a_scheduler_is_validated():
    model = mlp()
    opt = SAM(model.parameters(), lr=0.1)
    opt.param_groups[0]["rho"] = -1.0
    loss_fn(model, *batches(1)[0]).backward()
    with pytest.raises(ConfigError, match=r"param group rho must be"):
        opt.first_step()


def test_second_step_without_first_step_raises():
    model = mlp()
    opt = SAM(model.parameters(), lr=0.1)
    loss_fn(model, *batches(1)[0]).backward()
    with pytest.raises(RememError, match=r"second_step\(\) was called without first_step\(\)"):
        opt.second_step()


def test_first_step_without_gradients_raises():
    opt = SAM(mlp().parameters(), lr=0.1)
    with pytest.raises(RememError, match=r"found no gradients: run loss.backward\(\)"):
        opt.first_step()


def test_bad_max_grad_norm_raises():
    model = mlp()
    opt = SAM(model.parameters(), lr=0.1)
    x, y = batches(1)[0]
    with pytest.raises(ConfigError, match=r"max_grad_norm must be a finite number > 0.*-1"):
        opt.step(make_closure(model, x, y), max_grad_norm=-1)


# ---------------------------------------------------------------------- schedulers
@pytest.mark.parametrize("usage", ["closure", "two_step"])
@pytest.mark.parametrize("kind", ["step", "cosine", "timm"])
def test_lr_schedulers_attach_without_warning(kind, usage):
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if kind == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        elif kind == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
        else:
            sched = CosineLRScheduler(opt, t_initial=4)
        for i, (x, y) in enumerate(batches(2)):
            if usage == "closure":
                opt.step(make_closure(model, x, y))
            else:
                sam_two_step(model, opt, x, y)
            sched.step(i + 1) if kind == "timm" else sched.step()
    expected = {"step": 0.1 * 0.25, "cosine": 0.1 * (1 + math.cos(math.pi * 2 / 4)) / 2,
                "timm": 0.1 * (1 + math.cos(math.pi * 2 / 4)) / 2}[kind]
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(expected)


class _LinearRho(Scheduler):
    """A timm scheduler driving the ``rho`` group field: rho_t = rho_0 * (1 + t)."""

    def __init__(self, optimizer):
        super().__init__(optimizer, param_group_field="rho", t_in_epochs=False)

    def _get_lr(self, t):
        return [v * (1 + t) for v in self.base_values]


def test_rho_is_a_group_field_a_scheduler_can_drive():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    sched = _LinearRho(opt)
    seen = []
    for i, (x, y) in enumerate(batches(3)):
        opt.step(make_closure(model, x, y))
        seen.append(opt.stats.perturbation_norm)
        sched.step_update(i + 1)
    assert seen == pytest.approx([0.05, 0.10, 0.15], rel=1e-9)


# ---------------------------------------------------------------------- checkpoints
def test_state_dict_holds_base_state_and_settings_but_no_perturbation():
    model = mlp()
    opt = SAM(two_groups(model), torch.optim.AdamW, lr=1e-3, adaptive=True, every=3)
    for x, y in batches(2):
        opt.step(make_closure(model, x, y))
    x, y = batches(1, seed=5)[0]
    loss_fn(model, x, y).backward()
    opt.first_step(zero_grad=True)  # a pending perturbation must not leak into the checkpoint
    sd = opt.state_dict()
    opt.second_step()
    assert set(sd) == {"state", "param_groups", "sam"}
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in sd["state"].values())
    assert len(sd["state"]) == len(list(model.parameters()))
    assert [g["rho"] for g in sd["param_groups"]] == [0.05, 0.3]
    assert all(g["adaptive"] is True and g["eta"] == 0.01 for g in sd["param_groups"])
    assert sd["sam"]["step"] == 2 and sd["sam"]["every"] == 3
    bare = torch.optim.AdamW(two_groups(mlp()), lr=1e-3)
    bare.load_state_dict(sd)  # the base optimizer's own format
    torch.testing.assert_close(bare.state_dict()["state"][0]["exp_avg"], sd["state"][0]["exp_avg"])


def test_plain_base_optimizer_checkpoint_loads_with_sam_defaults():
    model = mlp()
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn(model, *batches(1)[0]).backward()
    plain.step()
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.2, adaptive=True, lr=1e-3)
    opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["rho"] == 0.2 and opt.param_groups[0]["adaptive"] is True
    assert torch.equal(opt.state[model[0].weight]["exp_avg"], plain.state[model[0].weight]["exp_avg"])


def test_deepcopy_gives_an_independent_working_optimizer():
    model = mlp()
    opt = SAM(two_groups(model), torch.optim.AdamW, lr=1e-2, every=2)
    x, y = batches(1)[0]
    opt.step(make_closure(model, x, y))
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.param_groups is opt2.base_optimizer.param_groups and opt2.state is opt2.base_optimizer.state
    assert opt2.every == 2 and opt2.is_sam_step is False
    opt.step(make_closure(model, x, y))
    opt2.step(make_closure(model2, x, y))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True))


def _run(model, opt, steps, start):
    for i in range(start, start + steps):
        torch.manual_seed(100 + i)  # dropout masks depend only on the step index
        x, y = batches(1, seed=10 + i)[0]
        opt.step(make_closure(model, x, y))


def test_resume_from_state_dict_is_bit_exact():
    def build():
        model = mlp(dropout=0.2)
        return model, SAM(two_groups(model, 0.1, 0.4), torch.optim.AdamW, lr=0.01, weight_decay=0.05, every=2)

    model_a, opt_a = build()
    _run(model_a, opt_a, 7, 0)

    model_b, opt_b = build()
    _run(model_b, opt_b, 3, 0)
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_c, opt_c = build()
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    assert opt_c.param_groups is opt_c.base_optimizer.param_groups
    assert opt_c.state is opt_c.base_optimizer.state
    _run(model_c, opt_c, 4, 3)
    for pa, pc in zip(model_a.parameters(), model_c.parameters(), strict=True):
        assert torch.equal(pa, pc)


# ---------------------------------------------------------------------- AMP
def _amp_closure(model, scaler, x, y, inject_at=None, calls=None):
    calls = [] if calls is None else calls

    def closure():
        calls.append(1)
        loss = loss_fn(model, x, y)
        scaled = scaler.scale(loss)
        if len(calls) == inject_at:
            scaled = scaled * float("inf")
        scaled.backward()
        return loss

    return closure


@pytest.mark.parametrize("usage", ["closure", "two_step"])
def test_grad_scaler_recipe_matches_unscaled_reference(usage):
    model, ref = mlp(dtype=torch.float32), mlp(dtype=torch.float32)
    opt = SAM(two_groups(model), torch.optim.SGD, lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(two_groups(ref), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    for x, y in batches(4, dtype=torch.float32):
        if usage == "closure":
            opt.step(_amp_closure(model, scaler, x, y), scaler=scaler, max_grad_norm=10.0)
        else:
            scaler.scale(loss_fn(model, x, y)).backward()
            if opt.first_step(zero_grad=True, scaler=scaler):
                scaler.scale(loss_fn(model, x, y)).backward()
            opt.second_step(zero_grad=True, scaler=scaler, max_grad_norm=10.0)
        reference_sam_step(ref, ref_opt, ref_groups(ref), x, y, max_grad_norm=10.0)
    assert scaler.get_scale() == 2.0**12  # no overflow: the scale never backed off
    assert_params_close(model, ref, rtol=1e-5, atol=1e-6)


def test_grad_scaler_updates_exactly_once_per_step_under_autocast():
    model = mlp(dtype=torch.float32, dropout=0.1)
    opt = SAM(model.parameters(), torch.optim.AdamW, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1)
    for x, y in batches(3, dtype=torch.float32):

        def closure(x=x, y=y):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn(model, x, y)
            scaler.scale(loss).backward()
            return loss

        opt.step(closure, scaler=scaler)
    assert scaler.get_scale() == 2.0**4 * 2.0**3  # one growth per step, not two
    with pytest.raises(AssertionError, match="No inf checks were recorded"):
        scaler.update()  # SAM already called update(); a second call is caught by torch


@pytest.mark.parametrize(("inject_at", "closure_calls"), [(1, 1), (2, 2)])
def test_non_finite_pass_skips_whole_step_under_grad_scaler(inject_at, closure_calls):
    model = mlp(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.AdamW, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    x, y = batches(1, dtype=torch.float32)[0]
    opt.step(_amp_closure(model, scaler, x, y), scaler=scaler)
    before = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(opt.state_dict()["state"])
    calls = []
    opt.step(_amp_closure(model, scaler, x, y, inject_at=inject_at, calls=calls), scaler=scaler)
    assert len(calls) == closure_calls  # an overflow in pass 1 does not even run pass 2
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, s in opt.state_dict()["state"].items():
        assert all(torch.equal(s[n], state_before[k][n]) for n in s)
    assert scaler.get_scale() == 2.0**9  # backed off exactly once
    assert opt.skipped_steps == 1 and opt.stats.skipped


def test_grad_scaler_step_with_positional_closure_raises():
    model = mlp(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y = batches(1, dtype=torch.float32)[0]
    closure = _amp_closure(model, scaler, x, y)
    closure()  # the first pass by hand, then the pattern that silently steps with scaled gradients elsewhere
    with pytest.raises(ConfigError, match=r"(?s)GradScaler\.step\(sam, \.\.\.\) cannot drive SAM.*scaler=scaler"):
        scaler.step(opt, closure)
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")
    opt.step(closure, scaler=scaler)  # the supported recipe still works afterwards
    assert opt.stats.sam_step


def test_second_step_rejects_a_different_scaler():
    model = mlp(dtype=torch.float32)
    opt = SAM(model.parameters(), lr=0.1)
    s1, s2 = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    x, y = batches(1, dtype=torch.float32)[0]
    s1.scale(loss_fn(model, x, y)).backward()
    opt.first_step(zero_grad=True, scaler=s1)
    s1.scale(loss_fn(model, x, y)).backward()
    with pytest.raises(ConfigError, match="different GradScaler"):
        opt.second_step(scaler=s2)


# ---------------------------------------------------------------------- clipping, accumulation, non-finite
def test_max_grad_norm_clips_the_final_gradient():
    model, ref = mlp(), mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    rg = [{"params": list(ref.parameters()), "rho": 0.2, "adaptive": False, "eta": 0.01}]
    for x, y in batches(3):
        opt.step(make_closure(model, x, y), max_grad_norm=0.05)
        assert opt.stats.final_grad_norm > 0.05  # clipping was active
        reference_sam_step(ref, ref_opt, rg, x, y, max_grad_norm=0.05)
    assert_params_close(model, ref)


def test_gradient_accumulation_over_micro_batches_equals_full_batch():
    model, ref = mlp(), mlp()
    opt = SAM(two_groups(model), torch.optim.SGD, lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(two_groups(ref), lr=0.1, momentum=0.9)
    for x, y in batches(3, size=8):
        micro = [(x[:4], y[:4]), (x[4:], y[4:])]
        for xm, ym in micro:
            (loss_fn(model, xm, ym) / 2).backward()
        assert opt.first_step(zero_grad=True)
        for xm, ym in micro:
            (loss_fn(model, xm, ym) / 2).backward()
        opt.second_step(zero_grad=True)
        reference_sam_step(ref, ref_opt, ref_groups(ref), x, y)
    assert_params_close(model, ref)


@pytest.mark.parametrize("bad_pass", [1, 2])
def test_non_finite_gradient_skips_step_and_counts(bad_pass):
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x, y = batches(1)[0]
    opt.step(make_closure(model, x, y))
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        loss = loss_fn(model, x, y)
        (loss * (float("nan") if len(calls) == bad_pass else 1.0)).backward()
        return loss

    opt.step(closure)
    assert opt.skipped_steps == 1 and opt.stats.skipped
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(model.parameters(), momentum,
                                                                                strict=True))
    opt.step(make_closure(model, x, y))  # training goes on
    assert opt.skipped_steps == 1 and not opt.stats.skipped


# ---------------------------------------------------------------------- in place, no allocation
def test_restore_is_in_place():
    model = mlp()
    aliases = [p.detach() for p in model.parameters()]  # share storage with the parameters
    ptrs = [p.data_ptr() for p in model.parameters()]
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1)
    for x, y in batches(3):
        opt.step(make_closure(model, x, y))
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert all(torch.equal(a, p) for a, p in zip(aliases, model.parameters(), strict=True))


@pytest.mark.parametrize("adaptive", [False, True])
def test_no_parameter_sized_allocation_per_step(adaptive):
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8))
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, adaptive=adaptive)
    x, y = torch.randn(4, 64), torch.randint(0, 8, (4,))
    smallest_weight = 128 * 8 * 4

    def iteration(profiled):
        loss_fn(model, x, y).backward()
        ctx = profile(activities=[ProfilerActivity.CPU], profile_memory=True) if profiled else None
        with ctx if ctx else torch.no_grad():
            opt.first_step(zero_grad=True)
        events = list(ctx.events()) if ctx else []
        loss_fn(model, x, y).backward()
        ctx = profile(activities=[ProfilerActivity.CPU], profile_memory=True) if profiled else None
        with ctx if ctx else torch.no_grad():
            opt.second_step(zero_grad=False)
        return events + (list(ctx.events()) if ctx else [])

    iteration(False)  # buffers and momentum are allocated once, here
    opt.zero_grad()
    events = iteration(True)
    big = [(e.name, e.cpu_memory_usage) for e in events if e.cpu_memory_usage >= smallest_weight]
    assert big == []


# ---------------------------------------------------------------------- every k, diagnostics
def test_every_k_runs_second_pass_only_on_sam_steps():
    model, ref = mlp(), mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9, every=2)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    rg = [{"params": list(ref.parameters()), "rho": 0.2, "adaptive": False, "eta": 0.01}]
    calls = []
    for i, (x, y) in enumerate(batches(4)):
        closure = make_closure(model, x, y)
        opt.step(lambda closure=closure: calls.append(1) or closure())
        assert opt.stats.sam_step == (i % 2 == 0)
        if i % 2 == 0:
            reference_sam_step(ref, ref_opt, rg, x, y)
        else:  # a plain base step
            ref_opt.zero_grad()
            loss_fn(ref, x, y).backward()
            ref_opt.step()
    assert len(calls) == 2 + 1 + 2 + 1
    assert_params_close(model, ref)


def test_every_k_two_step_usage_keeps_first_pass_gradient_on_plain_steps():
    model, ref = mlp(), mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, every=2)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    data = batches(2)
    sam_two_step(model, opt, *data[0])
    reference_sam_step(ref, ref_opt, [{"params": list(ref.parameters()), "rho": 0.05, "adaptive": False,
                                       "eta": 0.01}], *data[0])
    loss_fn(model, *data[1]).backward()
    assert opt.first_step(zero_grad=True) is False  # plain step: no second pass, gradients kept
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    opt.second_step(zero_grad=True)
    ref_opt.zero_grad()
    loss_fn(ref, *data[1]).backward()
    ref_opt.step()
    assert_params_close(model, ref)


def test_diagnostics_match_reference_quantities():
    model, ref = mlp(), mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = batches(1)[0]
    opt.step(make_closure(model, x, y))
    rg = [{"params": list(ref.parameters()), "rho": 0.2, "adaptive": False, "eta": 0.01}]
    loss, loss2, norm = reference_sam_step(ref, ref_opt, rg, x, y)
    final_norm = math.sqrt(sum(float((p.grad**2).sum()) for p in ref.parameters()))
    s = opt.stats
    assert s.sam_step and not s.skipped and s.step == 0
    assert s.grad_norm == pytest.approx(norm, rel=1e-12)
    assert s.perturbation_norm == pytest.approx(0.2, rel=1e-9)
    assert s.final_grad_norm == pytest.approx(final_norm, rel=1e-12)
    assert s.loss == pytest.approx(loss, rel=1e-12) and s.perturbed_loss == pytest.approx(loss2, rel=1e-12)
    assert s.loss_increase == pytest.approx(loss2 - loss, rel=1e-9)
    assert s.loss_increase > 0


def test_adaptive_perturbation_norm_matches_reference():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=1.0, adaptive=True, lr=0.1)
    x, y = batches(1)[0]
    ref = mlp()
    loss_fn(ref, x, y).backward()
    with torch.no_grad():
        ps = list(ref.parameters())
        tg = math.sqrt(sum(float((((p.abs() + 0.01) * p.grad) ** 2).sum()) for p in ps))
        e = math.sqrt(sum(float((((p.abs() + 0.01) ** 2 * p.grad / tg) ** 2).sum()) for p in ps))
    opt.step(make_closure(model, x, y))
    assert opt.stats.grad_norm == pytest.approx(tg, rel=1e-10)
    assert opt.stats.perturbation_norm == pytest.approx(e, rel=1e-8)


def test_bad_max_grad_norm_in_second_step_restores_the_weights_and_leaves_sam_usable():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    x = torch.randn(4, 3)
    model(x).square().mean().backward()
    assert opt.first_step(zero_grad=True)
    model(x).square().mean().backward()
    with pytest.raises(ConfigError, match=r"max_grad_norm must be a finite number > 0 or None, got -1"):
        opt.second_step(zero_grad=True, max_grad_norm=-1)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # back at w, not w + e
    model(x).square().mean().backward()
    assert opt.first_step(zero_grad=True)  # not stuck between the two steps


# ---------------------------------------------------------------------- an error in either pass leaves w
class _Boom(RuntimeError):
    pass


def _failing_closure(model, x, y, fail_at, scaler=None):
    calls = []

    def closure():
        calls.append(1)
        loss = loss_fn(model, x, y)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if len(calls) == fail_at:
            raise _Boom(f"closure failed in pass {fail_at}")
        return loss

    return closure


def _snapshot(model, opt):
    weights = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    return weights, state


def _assert_unchanged(model, opt, snapshot):
    weights, state = snapshot
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))  # exactly w, not w + e
    for k, s in opt.state_dict()["state"].items():
        assert all(torch.equal(s[n], state[k][n]) for n in s)


@pytest.mark.parametrize("fail_at", [1, 2])
def test_closure_raising_in_either_pass_leaves_w_and_the_next_step_is_exact(fail_at):
    # The twin never sees the failed step: after one more step both must be bit-identical.
    (model, twin), data = (mlp(), mlp()), batches(3)
    opt = SAM(two_groups(model), torch.optim.SGD, lr=0.1, momentum=0.9)
    twin_opt = SAM(two_groups(twin), torch.optim.SGD, lr=0.1, momentum=0.9)
    opt.step(make_closure(model, *data[0]))
    twin_opt.step(make_closure(twin, *data[0]))
    before = _snapshot(model, opt)
    with pytest.raises(_Boom, match=f"pass {fail_at}"):
        opt.step(_failing_closure(model, *data[1], fail_at))
    _assert_unchanged(model, opt, before)
    opt.step(make_closure(model, *data[2]))  # not stuck between first_step and second_step
    twin_opt.step(make_closure(twin, *data[2]))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(), strict=True))
    assert opt.state_dict()["sam"] == twin_opt.state_dict()["sam"]


def test_error_inside_second_pass_context_leaves_w_in_the_two_step_usage():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.5, lr=1e-2)
    x, y = batches(1)[0]
    sam_two_step(model, opt, x, y)
    before = _snapshot(model, opt)
    loss_fn(model, x, y).backward()
    assert opt.first_step(zero_grad=True)
    assert not all(torch.equal(p, w) for p, w in zip(model.parameters(), before[0], strict=True))  # at w + e
    with pytest.raises(_Boom):
        with opt.second_pass(model):
            loss_fn(model, x, y).backward()
            raise _Boom("perturbed pass failed")
    _assert_unchanged(model, opt, before)
    opt.zero_grad()
    sam_two_step(model, opt, x, y)  # first_step does not complain that it was called twice
    assert opt.stats.sam_step


def test_closure_raising_under_grad_scaler_leaves_w_and_the_scaler_usable():
    model = mlp(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    x, y = batches(1, dtype=torch.float32)[0]
    opt.step(_failing_closure(model, x, y, fail_at=0, scaler=scaler), scaler=scaler)
    before = _snapshot(model, opt)
    with pytest.raises(_Boom):
        opt.step(_failing_closure(model, x, y, fail_at=2, scaler=scaler), scaler=scaler)
    _assert_unchanged(model, opt, before)
    opt.step(_failing_closure(model, x, y, fail_at=0, scaler=scaler), scaler=scaler)  # no "unscale_() already"
    assert opt.stats.sam_step and not opt.stats.skipped and scaler.get_scale() == 2.0**10


class _HalfDoneSGD(torch.optim.SGD):
    """Moves the weights, then fails: a base step that breaks half-way."""

    fail = True

    def step(self, closure=None):
        if self.fail:
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.add_(1.0)
            raise _Boom("base step failed")
        return super().step(closure)


def test_base_step_raising_half_way_leaves_w():
    model, twin = mlp(), mlp()
    opt = SAM(model.parameters(), _HalfDoneSGD, lr=0.1, momentum=0.9)
    twin_opt = SAM(twin.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    x, y = batches(1)[0]
    before = _snapshot(model, opt)
    with pytest.raises(_Boom, match="base step failed"):
        opt.step(make_closure(model, x, y))
    _assert_unchanged(model, opt, before)
    opt.base_optimizer.fail = False
    opt.step(make_closure(model, x, y))
    twin_opt.step(make_closure(twin, x, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(), strict=True))


# ---------------------------------------------------------------------- one buffer, the perturbation, exact restore
def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


@pytest.mark.parametrize("adaptive", [True, False], ids=["asam", "sam"])
def test_buffers_are_one_copy_of_the_trainable_weights(adaptive):
    model = mlp(dtype=torch.float32)
    model[0].bias.requires_grad_(False)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, adaptive=adaptive, lr=0.1, momentum=0.9)
    for x, y in batches(2, dtype=torch.float32):
        opt.step(make_closure(model, x, y))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert opt.buffer_nbytes == _nbytes(trainable)  # 1.00x, ASAM included


def test_mixed_adaptive_and_plain_groups_hold_one_copy_of_the_weights():
    model = mlp()
    params = list(model.parameters())
    opt = SAM([{"params": params[:2], "adaptive": True, "rho": 1.0}, {"params": params[2:]}], torch.optim.AdamW,
              lr=1e-3)
    x, y = batches(1)[0]
    opt.step(make_closure(model, x, y))
    assert opt.buffer_nbytes == _nbytes(params)


def _asam_model_and_groups(eta):
    model = mlp()
    params = list(model.parameters())
    groups = [
        {"params": params[:2], "rho": 0.5, "adaptive": True, "eta": eta},
        {"params": params[2:3], "rho": 1.5, "adaptive": True, "eta": 0.1},
        {"params": params[3:], "rho": 0.05, "adaptive": False, "eta": eta},  # in the same global norm
    ]
    return model, params, groups


@pytest.mark.parametrize("runs", ["one_run", "run_per_tensor"])
@pytest.mark.parametrize("eta", [0.01, 0.0])
def test_adaptive_perturbation_equals_float64_reference(eta, runs, monkeypatch):
    if runs == "run_per_tensor":  # the CPU passes run over runs of tensors: one tensor per run here
        monkeypatch.setattr(_tensors, "CPU_RUN_BYTES", 1)
    model, params, groups = _asam_model_and_groups(eta)
    opt = SAM([dict(g) for g in groups], torch.optim.SGD, lr=0.1)
    x, y = batches(1)[0]
    loss_fn(model, x, y).backward()
    w = [p.detach().clone() for p in params]
    e = reference_perturbation(groups)  # rho T^2 g / ||T g||, T = |w| + eta, written independently
    assert opt.first_step()
    for p, w0, e0 in zip(params, w, e, strict=True):
        torch.testing.assert_close(p.detach(), w0 + e0, rtol=1e-13, atol=1e-16)
    norm_e = math.sqrt(sum(float((t**2).sum()) for t in e))
    loss_fn(model, x, y).backward()
    opt.second_step()
    assert opt.stats.perturbation_norm == pytest.approx(norm_e, rel=1e-12)


@pytest.mark.parametrize("usage", ["closure", "two_step"])
@pytest.mark.parametrize("adaptive", [True, False], ids=["asam", "sam"])
def test_base_step_starts_from_w_bit_exactly(adaptive, usage):
    seen = []

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            seen.append([p.detach().clone() for g in self.param_groups for p in g["params"]])
            return super().step(closure)

    model = mlp(dtype=torch.float32)
    opt = SAM(two_groups(model, 0.5, 1.5), RecordingSGD, adaptive=adaptive, lr=0.1, momentum=0.9)
    for x, y in batches(3, dtype=torch.float32):
        w = [p.detach().clone() for p in model.parameters()]
        if usage == "closure":
            opt.step(make_closure(model, x, y))
        else:
            sam_two_step(model, opt, x, y)
        assert opt.stats.sam_step
        assert all(torch.equal(a, b) for a, b in zip(seen[-1], w, strict=True))  # restored bit-exactly


@pytest.mark.parametrize("adaptive", [True, False], ids=["asam", "sam"])
def test_weights_are_w_bit_exactly_after_second_step_with_a_zero_learning_rate(adaptive):
    model = mlp(dtype=torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=2.0, adaptive=adaptive, lr=0.0)
    w = [p.detach().clone() for p in model.parameters()]
    for x, y in batches(3, dtype=torch.float32):
        loss_fn(model, x, y).backward()
        assert opt.first_step(zero_grad=True)
        assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), w, strict=True))  # at w + e
        with opt.second_pass(model):
            loss_fn(model, x, y).backward()
        opt.second_step(zero_grad=True)
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), w, strict=True))


@pytest.mark.parametrize("where", ["closure", "context"])
def test_adaptive_error_in_the_second_pass_leaves_w_bit_exactly(where):
    model = mlp()
    opt = SAM(two_groups(model, 0.5, 1.5), torch.optim.SGD, adaptive=True, lr=0.1, momentum=0.9)
    x, y = batches(1)[0]
    opt.step(make_closure(model, x, y))
    before = _snapshot(model, opt)
    with pytest.raises(_Boom):
        if where == "closure":
            opt.step(_failing_closure(model, x, y, fail_at=2))
        else:
            loss_fn(model, x, y).backward()
            assert opt.first_step(zero_grad=True)
            with opt.second_pass(model):
                raise _Boom("perturbed pass failed")
    _assert_unchanged(model, opt, before)
    opt.zero_grad()
    opt.step(make_closure(model, x, y))  # ready for the next step
    assert opt.stats.sam_step


@pytest.mark.parametrize("fail_at_run", [0, 2])
def test_adaptive_error_while_building_the_direction_leaves_w_bit_exactly(fail_at_run, monkeypatch):
    # The direction is built in the weights themselves, run by run: an error half-way puts every saved run back.
    monkeypatch.setattr(_tensors, "CPU_RUN_BYTES", 1)
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=1.0, adaptive=True, lr=0.1)
    x, y = batches(1)[0]
    opt.step(make_closure(model, x, y))
    before = _snapshot(model, opt)
    calls, dots = [], _tensors.dots

    def failing_dots(a, b):
        calls.append(1)
        if len(calls) > fail_at_run:
            raise _Boom("interrupted")
        return dots(a, b)

    monkeypatch.setattr(_tensors, "dots", failing_dots)
    loss_fn(model, x, y).backward()
    with pytest.raises(_Boom):
        opt.first_step(zero_grad=True)
    _assert_unchanged(model, opt, before)
    monkeypatch.setattr(_tensors, "dots", dots)
    opt.zero_grad()
    opt.step(make_closure(model, x, y))
    assert opt.stats.sam_step


def test_adaptive_non_finite_gradient_leaves_w_bit_exactly():
    model = mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=1.0, adaptive=True, lr=0.1, momentum=0.9)
    x, y = batches(1)[0]
    opt.step(make_closure(model, x, y))
    before = _snapshot(model, opt)
    (loss_fn(model, x, y) * float("inf")).backward()
    assert opt.first_step(zero_grad=True) is False  # the direction was built, then w put back
    _assert_unchanged(model, opt, before)
    opt.second_step(zero_grad=True)
    assert opt.stats.skipped
    _assert_unchanged(model, opt, before)


@pytest.mark.parametrize("adaptive", [True, False], ids=["asam", "sam"])
def test_splitting_the_passes_into_runs_changes_no_bit(adaptive, monkeypatch):
    (model, twin), data = (mlp(dtype=torch.float32), mlp(dtype=torch.float32)), batches(3, dtype=torch.float32)
    opt = SAM(two_groups(model, 0.5, 1.5), torch.optim.SGD, adaptive=adaptive, lr=0.1, momentum=0.9)
    twin_opt = SAM(two_groups(twin, 0.5, 1.5), torch.optim.SGD, adaptive=adaptive, lr=0.1, momentum=0.9)
    for x, y in data:
        monkeypatch.setattr(_tensors, "CPU_RUN_BYTES", 1)
        opt.step(make_closure(model, x, y))
        monkeypatch.setattr(_tensors, "CPU_RUN_BYTES", 1 << 40)
        twin_opt.step(make_closure(twin, x, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(), strict=True))
