"""Tests for timm_remem.sam.registry: the names in timm's optimizer factory build SAM around the right base."""

from __future__ import annotations

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
from timm_remem.sam import SAM, register_with_timm


# ---------------------------------------------------------------------- timm factory
@pytest.mark.parametrize(
    ("name", "base_cls", "nesterov"),
    [("sam", torch.optim.SGD, True), ("samsgd", torch.optim.SGD, True), ("sammomentum", torch.optim.SGD, False),
     ("samadam", torch.optim.Adam, None), ("samadamw", torch.optim.AdamW, None)],
)
def test_timm_factory_names_build_sam_with_the_right_base(name, base_cls, nesterov):
    assert name in timm.optim.list_optimizers()
    opt = timm.optim.create_optimizer_v2(mlp(), name, lr=0.01, weight_decay=0.01, rho=0.1)
    assert isinstance(opt, SAM)
    assert type(opt.base_optimizer) is base_cls
    assert all(g["rho"] == 0.1 for g in opt.param_groups)
    if nesterov is not None:  # mirrors timm's 'sgd' (Nesterov) and 'momentum' (classical), momentum 0.9
        assert all(g["nesterov"] is nesterov and g["momentum"] == 0.9 for g in opt.param_groups)


def test_timm_factory_layer_decay_and_no_weight_decay_groups():
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3)
    opt = timm.optim.create_optimizer_v2(
        model, "samadamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75, rho=0.1, adaptive=True, every=2
    )
    assert type(opt.base_optimizer) is torch.optim.AdamW
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
    assert type(opt) is sam_module.SAM  # (was: __module__ == "timm_remem.sam", the file before the package)
    assert isinstance(opt, sam_module.SAM)


def test_samadamw_trains_test_vit():
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0])
    opt = timm.optim.create_optimizer_v2(model, "samadamw", lr=3e-3, weight_decay=0.05, rho=0.1)

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(4)]
    assert losses[-1] < losses[0]
    assert opt.stats.loss_increase > 0  # SAM's ascent step increases the loss


def test_a_stale_copy_of_sam_left_by_a_reload_is_replaced_quietly(caplog):
    info = timm.optim.get_optimizer_info("samadam")
    stale = type("SAM", (SAM,), {"__module__": SAM.__module__, "__qualname__": "SAM"})  # what a reload leaves
    default_registry.register(dataclasses.replace(info, opt_class=stale))
    caplog.clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with caplog.at_level(logging.WARNING):
                register_with_timm()
        assert "already registered" not in caplog.text
        assert timm.optim.get_optimizer_info("samadam").opt_class is SAM
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
    assert timm.optim.get_optimizer_info("samsgd").opt_class is SAM
