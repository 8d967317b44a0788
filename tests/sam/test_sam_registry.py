"""Tests for timm_remem.sam.registry: timm's factory names build the one-pass SAM around the right base; create_sam
builds the exact SAM on timm's parameter groups; every name keeps timm's optimizer contract (the properties timm's
own tests/test_optim.py checks for every registered name, restated here with references of our own)."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import logging
import warnings

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from sam_reference import mlp
from timm.optim._optim_factory import default_registry  # timm's registry has no public handle
from timm.scheduler import CosineLRScheduler

import timm_remem.sam as sam_module
from timm_remem.sam import SAM, OnePassSAM, create_sam, register_with_timm

NAMES = ["sam", "samsgd", "sammomentum", "samadam", "samadamw"]


# ---------------------------------------------------------------------- timm factory
@pytest.mark.parametrize(
    ("name", "base_cls", "nesterov"),
    [("sam", torch.optim.SGD, True), ("samsgd", torch.optim.SGD, True), ("sammomentum", torch.optim.SGD, False),
     ("samadam", torch.optim.Adam, None), ("samadamw", torch.optim.AdamW, None)],
)
def test_timm_factory_names_build_one_pass_sam_with_the_right_base(name, base_cls, nesterov):
    assert name in timm.optim.list_optimizers()
    opt = timm.optim.create_optimizer_v2(mlp(), name, lr=0.01, weight_decay=0.01, rho=0.1)
    assert isinstance(opt, OnePassSAM)
    assert type(opt.base_optimizer) is base_cls
    assert all(g["rho"] == 0.1 for g in opt.param_groups)
    if nesterov is not None:  # mirrors timm's 'sgd' (Nesterov) and 'momentum' (classical), momentum 0.9
        assert all(g["nesterov"] is nesterov and g["momentum"] == 0.9 for g in opt.param_groups)


def test_create_sam_layer_decay_and_no_weight_decay_groups():
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3)
    opt = create_sam(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75, rho=0.1, adaptive=True,
                     sam_kwargs={"every": 2})
    assert type(opt) is SAM and type(opt.base_optimizer) is torch.optim.AdamW
    assert opt.every == 2
    groups = opt.base_optimizer.param_groups
    assert len({g["lr_scale"] for g in groups}) > 2  # layer decay reached the shared groups
    assert {g["weight_decay"] for g in groups} == {0.0, 0.05}  # timm's no-weight-decay groups
    assert all(g["rho"] == 0.1 and g["adaptive"] is True for g in groups)
    # the rho keyword is SAM's, not the base optimizer's
    assert "rho" not in opt.base_optimizer.defaults
    sched = CosineLRScheduler(opt, t_initial=10)
    sched.step(1)
    assert groups[-1]["lr"] < 1e-3 * groups[-1]["lr_scale"]


def test_timm_registration_is_idempotent(caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.WARNING):
            importlib.reload(sam_module)
            importlib.reload(sam_module)
    assert "already registered" not in caplog.text
    opt = timm.optim.create_optimizer_v2(mlp(), "samadamw", lr=1e-3)
    assert type(opt) is sam_module.OnePassSAMAdamW
    assert isinstance(opt, sam_module.OnePassSAM)


def test_samadamw_trains_test_vit():
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0])
    opt = timm.optim.create_optimizer_v2(model, "samadamw", lr=3e-3, weight_decay=0.05, rho=0.1)
    losses = []
    for _ in range(4):  # timm's loop: backward, step() without a closure, zero_grad
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert opt.stats.perturbed and opt.stats.perturbation_norm == pytest.approx(0.1)


def test_a_stale_copy_of_sam_left_by_a_reload_is_replaced_quietly(caplog):
    info = timm.optim.get_optimizer_info("samadam")
    cls = info.opt_class
    stale = type(cls.__name__, (cls,), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})  # a reload's
    default_registry.register(dataclasses.replace(info, opt_class=stale))
    caplog.clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with caplog.at_level(logging.WARNING):
                register_with_timm()
        assert "already registered" not in caplog.text
        assert timm.optim.get_optimizer_info("samadam").opt_class is cls
    finally:
        default_registry.register(info)


def test_a_name_timm_gives_to_another_optimizer_is_left_to_it_with_a_warning():
    info = timm.optim.get_optimizer_info("samsgd")
    default_registry.register(dataclasses.replace(info, opt_class=torch.optim.SGD))
    try:
        with pytest.warns(UserWarning, match=r"timm already has an optimizer named 'samsgd'.*leaves it in place"):
            register_with_timm()
        assert timm.optim.get_optimizer_info("samsgd").opt_class is torch.optim.SGD
    finally:
        default_registry.register(info)
    assert timm.optim.get_optimizer_info("samsgd").opt_class is sam_module.OnePassSAMSGD


# ---------------------------------------------------------------------- timm's optimizer contract
def _params(dtype=torch.float32):
    return [torch.nn.Parameter(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)).to(dtype)),
            torch.nn.Parameter(torch.randn(8, generator=torch.Generator().manual_seed(1)).to(dtype))]


def _grads(params, step):
    return [torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i)).to(p.dtype)
            for i, p in enumerate(params)]


def _run(params, opt, steps, lr_fn=None):
    for step in steps:
        if lr_fn is not None:
            lr_fn(step)
        for p, g in zip(params, _grads(params, step), strict=True):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("name", NAMES)
def test_optim_info_flags_match_the_keywords_the_class_takes(name):
    import inspect

    info = timm.optim.get_optimizer_info(name)
    args = inspect.signature(info.opt_class.__init__).parameters
    assert (info.has_eps, info.has_betas, info.has_momentum) == ("eps" in args, "betas" in args, "momentum" in args)
    opt = timm.optim.create_optimizer_v2(_params(), name, lr=1e-3, eps=1e-6, betas=(0.5, 0.6), momentum=0.5)
    group = opt.param_groups[0]
    assert group.get("momentum", 0.5) == 0.5 and tuple(group.get("betas", (0.5, 0.6))) == (0.5, 0.6)
    assert group.get("eps", 1e-6) == 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_a_step_without_gradients_changes_nothing(name):
    params = _params()
    opt = timm.optim.create_optimizer_v2(params, name, lr=1e-2, weight_decay=0.01)
    before = [p.detach().clone() for p in params]
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_and_zero_lr_and_grads_untouched(name, dtype):
    params = _params(dtype)
    opt = timm.optim.create_optimizer_v2(params, name, lr=1e-2, weight_decay=0.01)
    _run(params, opt, range(3))
    sd = copy.deepcopy(opt.state_dict())
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    expected = _run(params, opt, range(3, 6))
    ropt = timm.optim.create_optimizer_v2(resumed, name, lr=1e-2, weight_decay=0.01)
    ropt.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(_run(resumed, ropt, range(3, 6)), expected, strict=True))
    for group in opt.param_groups:
        group["lr"] = 0.0
    grads = _grads(params, 9)
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    before = [p.detach().clone() for p in params]
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_are_independent(name):
    other = torch.nn.Parameter(torch.randn(16, 8, generator=torch.Generator().manual_seed(0)))
    weight = torch.nn.Parameter(torch.randn(16, 8, generator=torch.Generator().manual_seed(1)))
    alone = torch.nn.Parameter(weight.detach().clone())
    opt = timm.optim.create_optimizer_v2([other], name, lr=1e-2)
    opt.add_param_group({"params": [weight], "lr": 1e-4})
    opt_alone = timm.optim.create_optimizer_v2([alone], name, lr=1e-4)
    for step in range(6):
        other.grad, weight.grad = _grads([other, weight], step)
        alone.grad = weight.grad.clone()
        opt.step()
        opt_alone.step()
    assert torch.equal(weight, alone)
