"""Tests for timm_remem.distill.teacher: the frozen Teacher (eval mode, renormalisation, resizing, class check)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
from distill_refs import (
    CallCounter,
    resnet,
    vit,
)
from timm.task import DistillationTeacher

from timm_remem.distill import (
    RememDistillationTask,
    Teacher,
    TeacherLogitCache,
)
from timm_remem.errors import ConfigError


def test_teacher_never_updates_batchnorm_stats_and_stays_in_eval():
    model = resnet()
    running = model.bn1.running_mean.clone()
    teacher = Teacher(model, resnet())
    parent = nn.ModuleDict({"teacher": teacher, "other": nn.Linear(2, 2)})
    parent.train()
    model.apply(lambda m: m.train())  # even a direct .train() on the inner model is undone at forward
    teacher(torch.randn(4, 3, 32, 32) * 3 + 1)
    assert torch.equal(model.bn1.running_mean, running)
    assert not any(m.training for m in model.modules())
    assert not teacher.training
    assert not any(p.requires_grad for p in model.parameters())


def test_renormalisation_math_by_hand():
    student, teacher_model = vit(), resnet()  # student mean/std 0.5/0.5; teacher ImageNet
    teacher = Teacher(teacher_model, student)
    counter = CallCounter(teacher_model)
    x = torch.randn(2, 3, 32, 32)
    teacher(x)
    mean_s, std_s = np.array([0.5, 0.5, 0.5]), np.array([0.5, 0.5, 0.5])
    mean_t, std_t = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = np.empty(x.shape)
    for c in range(3):
        expected[:, c] = (x.numpy()[:, c] * std_s[c] + mean_s[c] - mean_t[c]) / std_t[c]
    np.testing.assert_allclose(counter.last_input.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_input_resized_to_fixed_teacher_size():
    teacher_model = vit(dynamic_img_size=False)  # strict 32x32 patch embedding
    teacher = Teacher(teacher_model, resnet())
    counter = CallCounter(teacher_model)
    levels = torch.tensor([0.1, -0.4, 0.7]).view(1, 3, 1, 1)
    teacher(levels.expand(2, 3, 48, 48).contiguous())  # a constant image stays constant under any resize
    assert counter.last_input.shape == (2, 3, 32, 32)
    imagenet_mean, imagenet_std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    for c in range(3):
        expected = (float(levels[0, c]) * imagenet_std[c] + imagenet_mean[c] - 0.5) / 0.5
        np.testing.assert_allclose(counter.last_input[:, c].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_num_classes_mismatch_raises_with_message():
    with pytest.raises(ConfigError, match="teacher num_classes=10 differs from student num_classes=5"):
        Teacher(vit(num_classes=10), vit(num_classes=5))
    with pytest.raises(ConfigError, match="teacher num_classes=10 differs from student num_classes=5"):
        RememDistillationTask(vit(num_classes=5), vit(num_classes=10), verbose=False)


def test_inference_mode_logits_are_usable_in_backward():
    student, model = vit(), vit()
    task = RememDistillationTask(student, Teacher(model, student, use_inference_mode=True), verbose=False)
    out = task(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))
    out["loss"].backward()
    assert student.head.weight.grad is not None


def test_teacher_is_a_timm_distillation_teacher_and_renormalises_like_it():
    student, model = vit(), resnet()  # student mean/std 0.5/0.5; teacher ImageNet
    teacher = Teacher(model, student)
    assert isinstance(teacher, DistillationTeacher)
    assert teacher.mean is teacher.mean_kd and teacher.std is teacher.std_kd
    reference = DistillationTeacher(resnet())  # timm's own wrapper: ImageNet mean/std from the pretrained cfg
    x = torch.randn(2, 3, 32, 32)
    s_mean, s_std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.5)
    assert torch.equal(teacher.prepare_input(x), reference.normalize_input(x, s_mean, s_std))


def test_public_logits_bypass_the_cache():
    model = vit()
    teacher = Teacher(model, cache=TeacherLogitCache(4))
    x = torch.randn(2, 3, 32, 32)
    got = teacher.logits(x)
    assert len(teacher.cache) == 0 and not got.requires_grad
    with torch.no_grad():
        assert torch.equal(got, model(x))
    assert torch.equal(teacher(x, indices=torch.tensor([0, 1])), got) and len(teacher.cache) == 2
