"""Bad input to SAM's radius schedule (``RhoScheduler``) and to SAM over frozen parameters: one error each.

Each case checks the exception's exact type and the quoted part of its message; "kept" cases also check that the
groups' rho, the scheduler's state or the weights are what they were before the failure.
"""

from __future__ import annotations

import pytest
import timm.scheduler
import torch

from timm_remem import CheckpointError, ConfigError
from timm_remem.sam import SAM, RhoScheduler


def _raises(error, match, call, *args, **kwargs):
    with pytest.raises(error, match=f"(?s){match}") as info:
        call(*args, **kwargs)
    assert type(info.value) is error, f"expected exactly {error.__name__}, got {type(info.value).__name__}"
    return info.value


def _sam(rho=0.2):
    torch.manual_seed(0)
    return SAM(torch.nn.Linear(3, 2).parameters(), torch.optim.SGD, rho=rho, lr=0.1)


# ---------------------------------------------------------------------- building a RhoScheduler
_BUILD = [
    pytest.param(lambda: (torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()), "cosine", {"t_initial": 5}),
                 r"param group 0 of AdamW has no 'rho': pass the SAM optimizer", id="not-a-sam-optimizer"),
    pytest.param(lambda: (_sam(), "cosin", {"t_initial": 5}),
                 r"unknown rho schedule 'cosin': use one of cosine, tanh, step, multistep, poly", id="unknown-shape"),
    pytest.param(lambda: (_sam(), "plateau", {}),
                 r"sched='plateau' cannot drive rho: it follows a validation metric", id="plateau"),
    pytest.param(lambda: (_sam(), torch.optim.lr_scheduler.StepLR, {"step_size": 1}),
                 r"sched must be a schedule name .* or a timm Scheduler subclass, got <class "
                 r"'torch.optim.lr_scheduler.StepLR'>", id="torch-scheduler-class"),
    pytest.param(lambda: (_sam(), "cosine", {"t_intial": 5}),
                 r"CosineLRScheduler has no argument t_intial; it takes t_initial, lr_min", id="misspelt-keyword"),
    pytest.param(lambda: (_sam(), "cosine", {}),
                 r"CosineLRScheduler needs t_initial", id="missing-t-initial"),
    pytest.param(lambda: (_sam(), "cosine", {"t_initial": 0}),
                 r"t_initial must be a positive integer, got 0", id="t-initial-zero"),
    pytest.param(lambda: (_sam(), "cosine", {"t_initial": 5, "rho_min": -0.01}),
                 r"rho_min must be a finite number >= 0, got -0.01", id="rho-min-negative"),
    pytest.param(lambda: (_sam(), "cosine", {"t_initial": 5, "rho_min": 0.01, "lr_min": 0.01}),
                 r"got both rho_min and lr_min \(the same setting\): give one", id="rho-min-and-lr-min"),
    pytest.param(lambda: (_sam(), "cosine", {"t_initial": 5, "param_group_field": "rho"}),
                 r"RhoScheduler sets param_group_field itself .*: drop param_group_field=", id="param-group-field"),
    pytest.param(lambda: (_sam(), "constant", {"decay_rate": 0.5}),
                 r"the 'constant' rho schedule does not decay: drop decay_rate= or use sched='step'",
                 id="constant-with-decay"),
]


@pytest.mark.parametrize(("build", "match"), _BUILD)
def test_sam_rho_schedule_rejects(build, match):
    optimizer, sched, kwargs = build()
    rho = [g.get("rho") for g in optimizer.param_groups]
    _raises(ConfigError, match, RhoScheduler, optimizer, sched, **kwargs)
    assert [g.get("rho") for g in optimizer.param_groups] == rho  # kept: nothing was written


# ---------------------------------------------------------------------- stepping and resuming
def _step_negative(opt, sched):
    sched.step(-1)


def _step_string(opt, sched):
    sched.step_update("3")


def _group_added(opt, sched):
    opt.add_param_group({"params": torch.nn.Linear(2, 2).parameters()})
    sched.step(1)


def _load_other_shape(opt, sched):
    other = RhoScheduler(_sam(), "step", decay_t=2)
    sched.load_state_dict(other.state_dict())


def _load_other_groups(opt, sched):
    model = torch.nn.Linear(2, 2)
    two = SAM([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.1)
    sched.load_state_dict(RhoScheduler(two, "cosine", t_initial=5).state_dict())


def _load_lr_scheduler_state(opt, sched):
    sched.load_state_dict(timm.scheduler.CosineLRScheduler(_sam(), t_initial=5).state_dict())


_USE = [
    pytest.param(_step_negative, ConfigError, r"RhoScheduler.step epoch must be a finite number >= 0, got -1",
                 id="step-negative-epoch"),
    pytest.param(_step_string, ConfigError, r"RhoScheduler.step_update num_updates must be a finite number >= 0, "
                 r"got '3'", id="step-update-string"),
    pytest.param(_group_added, ConfigError, r"the optimizer now has 2 param groups, but this RhoScheduler was built "
                 r"for 1: build the RhoScheduler after the last add_param_group\(\)", id="group-added-later"),
    pytest.param(_load_other_shape, CheckpointError, r"saved from a StepLRScheduler but this RhoScheduler follows "
                 r"CosineLRScheduler", id="load-other-shape"),
    pytest.param(_load_other_groups, CheckpointError, r"saved for 2 param groups but the optimizer has 1: resume "
                 r"with the same parameter groups", id="load-other-group-count"),
    pytest.param(_load_lr_scheduler_state, CheckpointError, r"expects the dict returned by "
                 r"RhoScheduler.state_dict\(\) \(keys 'sched', 'state'\), got keys \[", id="load-lr-scheduler-state"),
]


@pytest.mark.parametrize(("use", "error", "match"), _USE)
def test_sam_rho_schedule_use_rejects(use, error, match):
    opt = _sam(rho=0.4)
    sched = RhoScheduler(opt, "cosine", t_initial=5)
    sched.step(2)
    rho, state = opt.param_groups[0]["rho"], sched.state_dict()
    _raises(error, match, use, opt, sched)
    assert opt.param_groups[0]["rho"] == rho and sched.state_dict() == state  # kept


# ---------------------------------------------------------------------- SAM over frozen parameters
def _frozen_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    return model.requires_grad_(False)


def _empty_after_filter(model):
    SAM([p for p in model.parameters() if p.requires_grad], torch.optim.SGD, lr=0.1)


def _closure_on_frozen(model):
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    opt.step(lambda: model(torch.ones(2, 3)).sum().backward())


def _first_step_on_frozen(model):
    SAM(model.parameters(), torch.optim.SGD, lr=0.1).first_step()


def _set_of_params(model):
    SAM(set(model.parameters()), torch.optim.SGD, lr=0.1)


_FROZEN = [
    pytest.param(_empty_after_filter, r"SAM got no parameters \(an empty list\): .* nothing in the model is "
                 r"trainable", id="empty-after-requires-grad-filter"),
    pytest.param(_closure_on_frozen, r"SAM has nothing to train: none of the 4 parameters given to it requires "
                 r"grad \(all frozen\)", id="step-on-frozen-model"),
    pytest.param(_first_step_on_frozen, r"SAM has nothing to train: none of the 4 parameters", id="first-step-on-"
                 "frozen-model"),
    pytest.param(_set_of_params, r"SAM got the parameters as a set, whose order varies between runs: pass a list",
                 id="params-as-set"),
]


@pytest.mark.parametrize(("call", "match"), _FROZEN)
def test_sam_frozen_rejects(call, match):
    model = _frozen_model()
    before = [p.clone() for p in model.parameters()]
    _raises(ConfigError, match, call, model)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))  # kept


# ---------------------------------------------------------------------- a state dict from another base optimizer
def _state_dict_of(base):
    model = torch.nn.Linear(3, 2)
    opt = SAM(model.parameters(), base, lr=0.1)
    opt.step(lambda: model(torch.ones(2, 3)).sum().backward())
    return opt.state_dict()


def _plain_sgd_state_dict():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, 3)).sum().backward()
    opt.step()
    return opt.state_dict()


@pytest.mark.parametrize(("make", "state_dict", "match"), [
    pytest.param(lambda p: SAM(p, torch.optim.AdamW, lr=0.1), lambda: _state_dict_of(torch.optim.SGD),
                 r"SAM.load_state_dict\(\): the state dict was written by a SGD optimizer, and this one's base "
                 r"optimizer is AdamW: their states do not mix \(nothing was loaded\)", id="sam-sgd-into-adamw"),
    pytest.param(lambda p: SAM(p, torch.optim.AdamW, lr=0.1), _plain_sgd_state_dict,
                 r"written by an optimizer without amsgrad, betas, eps", id="sam-plain-sgd-into-adamw"),
    pytest.param(lambda p: __import__("timm_remem").sam.OnePassSAM(p, torch.optim.AdamW, lr=0.1),
                 lambda: _state_dict_of(torch.optim.SGD), r"OnePassSAM.load_state_dict\(\): .* SGD .* AdamW",
                 id="onepass-sgd-into-adamw"),
])
def test_sam_state_dict_from_another_base_rejects(make, state_dict, match):
    model = torch.nn.Linear(3, 2)
    opt = make(model.parameters())
    opt.step(lambda: model(torch.ones(2, 3)).sum().backward()) if isinstance(opt, SAM) else None
    before = {k: v.clone() for k, v in opt.state_dict()["state"].get(0, {}).items()}
    _raises(ConfigError, match, opt.load_state_dict, state_dict())
    after = opt.state_dict()["state"].get(0, {})  # kept: nothing was loaded, the optimizer still steps
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    model(torch.ones(2, 3)).sum().backward()
    opt.step(lambda: model(torch.ones(2, 3)).sum().backward()) if isinstance(opt, SAM) else opt.step()
