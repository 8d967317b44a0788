"""Tests for timm_remem.distill.task: RememDistillationTask as a timm TrainingTask."""

from __future__ import annotations

import pytest
import torch
from distill_refs import (
    CallCounter,
    resnet,
    vit,
)
from timm.task import TrainingTask

from timm_remem.distill import (
    DistillationLoss,
    DistillationStudent,
    FeatureDistillation,
    RememDistillationTask,
    dist_loss,
)
from timm_remem.errors import ConfigError


def test_task_train_keeps_teacher_in_eval():
    task = RememDistillationTask(resnet(), resnet(), verbose=False)
    task.train()
    assert task.get_trainable_module().training
    assert not any(m.training for m in task.teacher.modules())


def test_teacher_logits_argument_skips_teacher_for_sam_second_pass():
    student, model = vit(), vit()
    task = RememDistillationTask(student, model, verbose=False)
    counter = CallCounter(model)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    first = task(x, y)
    second = task(x, y, teacher_logits=first["teacher_logits"])
    assert counter.calls == 1
    assert float(second["kd_loss"]) == pytest.approx(float(first["kd_loss"]), rel=1e-6)


def test_task_is_a_timm_training_task_with_student_as_eval_model():
    student = resnet()
    task = RememDistillationTask(student, vit(), DistillationLoss("dist", temperature=4.0), verbose=False)
    assert isinstance(task, TrainingTask)
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,))
    out = task(x, y)
    with torch.no_grad():
        s, t = student(x), task.teacher(x)
    expected = 1.0 * DistillationLoss("kd", distill_weight=0.0).task_loss(s, y) + dist_loss(s, t, 4.0)
    assert float(out["loss"].detach()) == pytest.approx(float(expected), rel=1e-5)
    assert task.get_eval_model() is student


def test_task_with_features_exposes_student_for_eval_and_ema():
    student, teacher = vit(), vit()
    task = RememDistillationTask(student, teacher, features=FeatureDistillation(student, teacher), verbose=False)
    assert isinstance(task.get_trainable_module(), DistillationStudent)
    assert task.get_eval_model() is student
    task.setup_ema(decay=0.5)
    task.update_ema()
    assert type(task.get_eval_model(ema=True)) is type(student)


def test_consistent_flag_controls_teacher_view():
    student, model = vit(), vit()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    with pytest.raises(ConfigError, match="consistent=True: the teacher sees the student's own input"):
        RememDistillationTask(student, model, verbose=False)(x, y, teacher_input=x)
    task = RememDistillationTask(student, model, consistent=False, verbose=False)
    with pytest.raises(ConfigError, match="consistent=False needs teacher_input"):
        task(x, y)
    counter = CallCounter(model)
    other = torch.randn(2, 3, 32, 32)
    task(x, y, teacher_input=other)
    assert torch.equal(counter.last_input, other)  # same mean/std and size: passed through unchanged
