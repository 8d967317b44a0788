"""Tests for timm_remem.distill.losses: task_loss and DistillationLoss against hand-written references and timm."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from distill_refs import (
    make_logits,
    np_log_softmax,
    ref_ce,
    ref_kl_batchmean,
    ref_pearson,
    ref_softmax,
    vit,
)
from timm.task import LogitDistillationTask

from timm_remem.distill import (
    DistillationLoss,
    dist_loss,
    kd_loss,
    task_loss,
)
from timm_remem.errors import ConfigError


@pytest.fixture
def logits():
    return make_logits()


def test_losses_equal_timm_logit_distillation_task():
    # In float64: timm's float32 kl_div of these small logits (std 0.14, T=3) is itself 4e-5 off the exact value,
    # which kd_loss's float32 value is within 1e-7 of (tests/distill/test_distill_accuracy.py).
    torch.manual_seed(0)
    student, teacher = vit(), timm.create_model("test_vit2", pretrained=False, img_size=32, num_classes=10).eval()
    student, teacher = student.double(), teacher.double()
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (4,))
    timm_task = LogitDistillationTask(
        student, teacher, criterion=nn.CrossEntropyLoss(), distill_loss_weight=0.7, task_loss_weight=0.3,
        temperature=3.0, verbose=False,
    ).eval()
    ref = timm_task(x, y)
    with torch.no_grad():
        s, t = student(x), teacher(x)
    assert float(kd_loss(s, t, 3.0)) == pytest.approx(float(ref["kd_loss"].detach()), rel=1e-5)
    ours = DistillationLoss("kd", task_weight=0.3, distill_weight=0.7, temperature=3.0)(s, t, y)
    assert float(ours) == pytest.approx(float(ref["loss"].detach()), rel=1e-5)


@pytest.mark.parametrize("temperature,beta,gamma", [(1.0, 1.0, 1.0), (4.0, 2.0, 0.5)])
def test_dist_matches_loop_pearson_reference(logits, temperature, beta, gamma):
    s, t, _ = logits
    ys, yt = ref_softmax(s.numpy() / temperature), ref_softmax(t.numpy() / temperature)
    inter = 1 - np.mean([ref_pearson(ys[i], yt[i]) for i in range(ys.shape[0])])
    intra = 1 - np.mean([ref_pearson(ys[:, j], yt[:, j]) for j in range(ys.shape[1])])
    expected = temperature**2 * (beta * inter + gamma * intra)
    loss = DistillationLoss("dist", task_weight=0.0, temperature=temperature, dist_beta=beta, dist_gamma=gamma)
    assert float(loss(s, t)) == pytest.approx(expected, rel=1e-5)
    assert float(dist_loss(s, t, temperature, beta, gamma)) == pytest.approx(expected, rel=1e-5)


def test_hard_label_distillation_is_ce_against_teacher_argmax(logits):
    s, t, _ = logits
    teacher_labels = np.array([int(np.argmax(row)) for row in t.numpy()])
    loss = DistillationLoss("hard", task_weight=0.0, distill_weight=1.0, temperature=4.0)
    assert float(loss(s, t)) == pytest.approx(ref_ce(s.numpy(), teacher_labels), rel=1e-6)


def test_label_smoothing_task_loss_matches_manual(logits):
    s, t, y = logits
    loss = DistillationLoss("kd", task_weight=1.0, distill_weight=0.0, label_smoothing=0.2)
    assert float(loss(s, t, y)) == pytest.approx(ref_ce(s.numpy(), y.numpy(), smoothing=0.2), rel=1e-6)


def test_soft_target_task_loss_matches_manual(logits):
    s, t, _ = logits
    a, b, lam = np.array([0, 1, 2, 3, 4, 0]), np.array([4, 3, 2, 1, 0, 1]), 0.7
    soft = np.zeros((6, 5))
    for i in range(6):
        soft[i, a[i]] += lam
        soft[i, b[i]] += 1 - lam
    expected = np.mean([-(soft[i] * np_log_softmax(s.numpy()[i])).sum() for i in range(6)])
    loss = DistillationLoss("kd", task_weight=1.0, distill_weight=0.0, label_smoothing=0.1)  # no double smoothing
    assert float(loss(s, t, torch.from_numpy(soft))) == pytest.approx(expected, rel=1e-6)


def test_task_weight_zero_keeps_t_squared(logits):
    s, t, y = logits
    loss = DistillationLoss("kd", task_weight=0.0, distill_weight=1.0, temperature=4.0)
    assert float(loss(s, t, y)) == pytest.approx(ref_kl_batchmean(s.numpy(), t.numpy(), 4.0), rel=1e-5)


def test_weights_combine_without_dividing_by_num_classes(logits):
    s, t, y = logits
    loss = DistillationLoss("kd", task_weight=0.3, distill_weight=0.9, temperature=2.0)
    expected = 0.3 * ref_ce(s.numpy(), y.numpy()) + 0.9 * ref_kl_batchmean(s.numpy(), t.numpy(), 2.0)
    assert float(loss(s, t, y)) == pytest.approx(expected, rel=1e-5)


def test_parts_are_returned_and_remembered(logits):
    s, t, y = logits
    loss = DistillationLoss("kd", task_weight=0.5, distill_weight=2.0, temperature=2.0)
    total, parts = loss(s, t, y, return_parts=True)
    assert float(parts["task_loss"]) == pytest.approx(ref_ce(s.numpy(), y.numpy()), rel=1e-6)
    assert float(parts["kd_loss"]) == pytest.approx(ref_kl_batchmean(s.numpy(), t.numpy(), 2.0), rel=1e-5)
    assert float(parts["loss"]) == pytest.approx(float(total))
    assert set(loss.last_parts) == {"loss", "task_loss", "kd_loss"}


def test_missing_target_with_task_weight_raises(logits):
    s, t, _ = logits
    with pytest.raises(ConfigError, match="target is None but task_weight=1.0"):
        DistillationLoss()(s, t)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="fitnet"), "method must be one of"),
        (dict(task_weight=0.0, distill_weight=0.0), "both 0"),
        (dict(label_smoothing=1.0), "label_smoothing must be in"),
        (dict(distill_weight=-1.0), "distill_weight must be a finite number >= 0"),
    ],
)
def test_distillation_loss_rejects_bad_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DistillationLoss(**kwargs)


def test_bad_soft_target_shape_raises(logits):
    s, t, _ = logits
    with pytest.raises(ConfigError, match="soft targets must have the logits' shape"):
        DistillationLoss()(s, t, torch.rand(6, 4))


def test_function_matching_is_pure_kl():
    loss = DistillationLoss.function_matching()
    assert (loss.method, loss.task_weight, loss.distill_weight, loss.temperature) == ("kd", 0.0, 1.0, 1.0)


# ----------------------------------------------------------------------------------------------------------------------
# task_loss (the one task loss: the trainer's and DistillationLoss's)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_task_loss_matches_manual_cross_entropy_with_smoothing(logits, smoothing):
    s, _, y = logits
    assert float(task_loss(s, y, smoothing)) == pytest.approx(ref_ce(s.numpy(), y.numpy(), smoothing), rel=1e-6)


def test_task_loss_soft_targets_are_not_smoothed_again(logits):
    s, _, _ = logits
    soft = torch.softmax(torch.randn(6, 5, generator=torch.Generator().manual_seed(4)), dim=-1)
    expected = np.mean([-(soft.numpy()[i] * np_log_softmax(s.numpy()[i])).sum() for i in range(6)])
    assert float(task_loss(s, soft, label_smoothing=0.3)) == pytest.approx(expected, rel=1e-6)


def test_task_loss_gives_the_numbers_of_the_trainer_formula():
    """Bit-identical to the trainer's former private loss: F.cross_entropy on float32 logits, or soft-target CE."""
    g = torch.Generator().manual_seed(5)
    z, y = torch.randn(8, 7, generator=g), torch.randint(0, 7, (8,), generator=g)
    soft = torch.softmax(torch.randn(8, 7, generator=g), dim=-1)
    assert torch.equal(task_loss(z, y, 0.1), torch.nn.functional.cross_entropy(z.float(), y, label_smoothing=0.1))
    former_soft = torch.sum(-soft * torch.nn.functional.log_softmax(z.float(), dim=-1), dim=-1).mean()
    assert torch.equal(task_loss(z, soft, 0.1), former_soft)


def test_distillation_loss_task_term_is_task_loss(logits):
    s, _, y = logits
    assert torch.equal(DistillationLoss(label_smoothing=0.2).task_loss(s, y), task_loss(s, y, label_smoothing=0.2))


@pytest.mark.parametrize(
    "target,smoothing,match",
    [
        (torch.tensor([0, 1]), 0.0, r"integer targets must be class labels shaped \[6\], got \(2,\)"),
        (torch.rand(6, 4), 0.0, "soft targets must have the logits' shape"),
        (torch.tensor([0, 1, 2, 3, 4, 0]), 1.0, r"label_smoothing must be in \[0, 1\), got 1\.0"),
    ],
)
def test_task_loss_rejects_bad_targets_and_smoothing(logits, target, smoothing, match):
    s, _, _ = logits
    with pytest.raises(ConfigError, match=match):
        task_loss(s, target, smoothing)
