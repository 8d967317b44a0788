"""Tests for timm_remem.distill.features: FeatureDistillation pairs, projectors and warnings."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import timm
import torch
from distill_refs import (
    resnet,
    vit,
)

from timm_remem.distill import (
    FeatureDistillation,
    RememDistillationTask,
)
from timm_remem.errors import ConfigError


def test_projector_loss_matches_manual_reference():
    torch.manual_seed(0)
    fd = FeatureDistillation(vit(), timm.create_model("test_vit2", pretrained=False, img_size=32), kind="projector")
    proj = fd.projectors[0]
    rng = np.random.default_rng(3)
    c_s, c_t = proj.proj.in_features, proj.proj.out_features
    w, b = rng.normal(size=(c_t, c_s)) * 0.3, rng.normal(size=c_t)
    with torch.no_grad():
        proj.proj.weight.copy_(torch.from_numpy(w))
        proj.proj.bias.copy_(torch.from_numpy(b))
    s, t = rng.normal(size=(3, c_s, 2, 2)), rng.normal(size=(3, c_t, 2, 2)) * 2 + 1
    p = np.einsum("oc,bchw->bohw", w, s) + b[None, :, None, None]

    def standardize(a):
        mean = a.mean(axis=(0, 2, 3), keepdims=True)
        var = ((a - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
        return (a - mean) / np.sqrt(var + 1e-5)

    expected = float(((standardize(p) - standardize(t)) ** 2).mean())
    fd.train()
    got = fd([torch.from_numpy(s).float()], [torch.from_numpy(t).float()])
    assert float(got.detach()) == pytest.approx(expected, rel=1e-4)


def test_projector_receives_gradients_and_is_exposed_for_the_optimizer():
    torch.manual_seed(0)
    student, teacher = vit(), timm.create_model("test_vit2", pretrained=False, img_size=32, num_classes=10)
    fd = FeatureDistillation(student, teacher, kind="projector")
    task = RememDistillationTask(student, teacher, features=fd, verbose=False).train()
    trainable = {id(p) for p in task.get_trainable_module().parameters()}
    assert all(id(p) in trainable for p in fd.parameters())
    out = task(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    out["loss"].backward()
    grad = fd.projectors[0].proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert float(out["feature_loss"]) > 0
    assert "features" in task.get_task_state()


def test_late_layer_pair_logs_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="timm_remem.distill"):
        FeatureDistillation(vit(), vit(), pairs=[(0, -1)])
    messages = [r.getMessage() for r in caplog.records if r.name == "timm_remem.distill"]
    assert len(messages) == 1
    assert "teacher block 5" in messages[0] and "compress" in messages[0] and "late" in messages[0]


def test_default_early_pairs_are_silent(caplog):
    with caplog.at_level(logging.DEBUG, logger="timm_remem.distill"):
        fd = FeatureDistillation(vit(), vit())
    assert fd.pairs == [(0, 0)]
    assert not [r for r in caplog.records if r.name == "timm_remem.distill" and r.levelno >= logging.WARNING]


def test_cnn_student_with_vit_teacher_spectral_loss_backpropagates():
    torch.manual_seed(0)
    student, teacher = resnet(), vit()
    fd = FeatureDistillation(student, teacher, pairs=[(1, 0)], kind="spectral")
    task = RememDistillationTask(student, teacher, features=fd, verbose=False).train()
    out = task(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))
    assert out["teacher_features"][0].shape[-2:] == (2, 2)  # ViT patch grid; resnet layer1 is 8x8
    out["loss"].backward()
    assert student.conv1.weight.grad.abs().sum() > 0  # stem, below the aligned stage (layer1)


@pytest.mark.parametrize("pairs,kind,match", [([(0, 9)], "spectral", "teacher block index 9 is out of range"),
                                              (None, "fft", "kind must be one of")])
def test_feature_distillation_rejects_bad_config(pairs, kind, match):
    with pytest.raises(ConfigError, match=match):
        FeatureDistillation(vit(), vit(), pairs=pairs, kind=kind)
