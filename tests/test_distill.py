"""Tests for timm_remem.distill: every loss against a hand-written reference (numpy, explicit loops)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
from timm.task import LogitDistillationTask, TrainingTask

from timm_remem.distill import (
    DistillationLoss,
    DistillationStudent,
    FeatureDistillation,
    RememDistillationTask,
    Teacher,
    TeacherLogitCache,
    dist_loss,
    kd_loss,
    precompute_teacher_logits,
    spectral_loss,
)
from timm_remem.errors import ConfigError

# ----------------------------------------------------------------------------------------------------------------------
# independent references (numpy, loops)
# ----------------------------------------------------------------------------------------------------------------------


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def ref_kl_batchmean(s: np.ndarray, t: np.ndarray, temperature: float) -> float:
    """sum_i sum_c p_t log(p_t / p_s) / B, at temperature T, times T^2."""
    total = 0.0
    for i in range(s.shape[0]):
        log_ps = np_log_softmax(s[i] / temperature)
        log_pt = np_log_softmax(t[i] / temperature)
        for c in range(s.shape[1]):
            total += np.exp(log_pt[c]) * (log_pt[c] - log_ps[c])
    return temperature**2 * total / s.shape[0]


def ref_pearson(a: np.ndarray, b: np.ndarray) -> float:
    am, bm = a.mean(), b.mean()
    num = sum((x - am) * (y - bm) for x, y in zip(a, b, strict=True))
    den = np.sqrt(sum((x - am) ** 2 for x in a)) * np.sqrt(sum((y - bm) ** 2 for y in b))
    return num / den


def ref_softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(np_log_softmax(z))


def ref_ce(s: np.ndarray, labels: np.ndarray, smoothing: float = 0.0) -> float:
    total = 0.0
    for i in range(s.shape[0]):
        log_p = np_log_softmax(s[i])
        total += (1 - smoothing) * -log_p[labels[i]] + smoothing * np.mean(-log_p)
    return total / s.shape[0]


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=g, dtype=torch.float64) * 2.0
    t = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3.0
    y = torch.randint(0, 5, (6,), generator=g)
    return s, t, y


def vit(num_classes=10, **kw):
    return timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=num_classes, **kw).eval()


def resnet(num_classes=10):
    return timm.create_model("resnet18", pretrained=False, num_classes=num_classes)


class CallCounter:
    """Counts forward calls of a module and remembers the last input it received."""

    def __init__(self, module: nn.Module):
        self.calls = 0
        self.last_input = None
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1
        self.last_input = args[0].detach().clone()


# ----------------------------------------------------------------------------------------------------------------------
# kd_loss
# ----------------------------------------------------------------------------------------------------------------------


def test_kd_loss_matches_manual_kl_at_t1(logits):
    s, t, _ = logits
    assert float(kd_loss(s, t, 1.0)) == pytest.approx(ref_kl_batchmean(s.numpy(), t.numpy(), 1.0), rel=1e-5)


def test_kd_loss_matches_manual_kl_at_t4_including_t_squared(logits):
    s, t, _ = logits
    expected = ref_kl_batchmean(s.numpy(), t.numpy(), 4.0)
    assert float(kd_loss(s, t, 4.0)) == pytest.approx(expected, rel=1e-5)
    # T^2 is there: without it the value would be 16x smaller
    assert float(kd_loss(s, t, 4.0)) > 10 * expected / 16


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "hot"])
def test_kd_loss_rejects_bad_temperature(logits, bad):
    s, t, _ = logits
    with pytest.raises(ConfigError, match="temperature must be a positive finite number"):
        kd_loss(s, t, bad)


def test_kd_loss_rejects_class_count_mismatch():
    with pytest.raises(ConfigError, match="teacher has 7 classes but student has 5"):
        kd_loss(torch.randn(2, 5), torch.randn(2, 7))


def test_kd_loss_rejects_batch_and_rank_mismatch():
    with pytest.raises(ConfigError, match="batch sizes differ"):
        kd_loss(torch.randn(2, 5), torch.randn(3, 5))
    with pytest.raises(ConfigError, match=r"\[batch, num_classes\]"):
        kd_loss(torch.randn(2, 5, 1), torch.randn(2, 5, 1))


def test_losses_equal_timm_logit_distillation_task():
    torch.manual_seed(0)
    student, teacher = vit(), timm.create_model("test_vit2", pretrained=False, img_size=32, num_classes=10).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
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


# ----------------------------------------------------------------------------------------------------------------------
# DistillationLoss variants
# ----------------------------------------------------------------------------------------------------------------------


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
# feature distillation
# ----------------------------------------------------------------------------------------------------------------------


def ref_spectral(s: np.ndarray, t: np.ndarray) -> float:
    diffs = []
    for b in range(s.shape[0]):
        for c in range(s.shape[1]):
            fs, ft = np.fft.rfft2(s[b, c], norm="ortho"), np.fft.rfft2(t[b, c], norm="ortho")
            diffs.append(((fs.real - ft.real) ** 2).ravel())
            diffs.append(((fs.imag - ft.imag) ** 2).ravel())
    return float(np.concatenate(diffs).mean())


def test_spectral_loss_matches_numpy_fft_with_channel_pooling():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(2, 4, 3, 5)), rng.normal(size=(2, 8, 3, 5))
    t_pooled = np.stack([t[:, 2 * k : 2 * k + 2].mean(axis=1) for k in range(4)], axis=1)  # 8 -> 4 channels
    got = spectral_loss(torch.from_numpy(s), torch.from_numpy(t))
    assert float(got) == pytest.approx(ref_spectral(s, t_pooled), rel=1e-5)


def test_spectral_loss_pools_larger_teacher_map_spatially():
    rng = np.random.default_rng(2)
    s, t = rng.normal(size=(2, 3, 3, 3)), rng.normal(size=(2, 3, 6, 6))
    t_small = t.reshape(2, 3, 3, 2, 3, 2).mean(axis=(3, 5))  # 2x2 average pooling
    got = spectral_loss(torch.from_numpy(s), torch.from_numpy(t))
    assert float(got) == pytest.approx(ref_spectral(s, t_small), rel=1e-5)


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


# ----------------------------------------------------------------------------------------------------------------------
# teacher handling
# ----------------------------------------------------------------------------------------------------------------------


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


def test_task_train_keeps_teacher_in_eval():
    task = RememDistillationTask(resnet(), resnet(), verbose=False)
    task.train()
    assert task.get_trainable_module().training
    assert not any(m.training for m in task.teacher.modules())


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


def test_cached_logits_are_returned_without_calling_the_teacher():
    model = vit()
    teacher = Teacher(model, cache=TeacherLogitCache(8))
    counter = CallCounter(model)
    x, idx = torch.randn(4, 3, 32, 32), torch.tensor([5, 1, 7, 2])
    first = teacher(x, indices=idx)
    second = teacher(torch.zeros_like(x), indices=idx)  # different pixels: only the cache can give `first` back
    assert counter.calls == 1
    assert torch.equal(first, second)
    third = teacher(x[:2], indices=torch.tensor([0, 5]))  # index 0 missing -> teacher runs
    assert counter.calls == 2 and third.shape == (2, 10)


def test_precomputed_cache_serves_task_without_teacher_calls():
    student, model = vit(), vit()
    teacher = Teacher(model, student)
    xs, idx = torch.randn(6, 3, 32, 32), torch.arange(6)
    batches = [(xs[:3], torch.zeros(3), idx[:3]), (xs[3:], torch.zeros(3), idx[3:])]
    cache = precompute_teacher_logits(teacher, batches, TeacherLogitCache(6), progress=False)
    assert cache.complete and teacher.cache is cache
    counter = CallCounter(model)
    task = RememDistillationTask(student, teacher, verbose=False)
    out = task(xs[3:], torch.randint(0, 10, (3,)), indices=idx[3:])
    assert counter.calls == 0
    with torch.no_grad():
        np.testing.assert_allclose(out["teacher_logits"].numpy(), model(xs[3:]).numpy(), rtol=1e-5, atol=1e-6)


def test_teacher_logits_argument_skips_teacher_for_sam_second_pass():
    student, model = vit(), vit()
    task = RememDistillationTask(student, model, verbose=False)
    counter = CallCounter(model)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    first = task(x, y)
    second = task(x, y, teacher_logits=first["teacher_logits"])
    assert counter.calls == 1
    assert float(second["kd_loss"]) == pytest.approx(float(first["kd_loss"]), rel=1e-6)


def test_cache_rejects_out_of_range_indices():
    with pytest.raises(ConfigError, match=r"sample indices must lie in \[0, 4\)"):
        TeacherLogitCache(4).put(torch.tensor([4]), torch.zeros(1, 3))


def test_inference_mode_logits_are_usable_in_backward():
    student, model = vit(), vit()
    task = RememDistillationTask(student, Teacher(model, student, use_inference_mode=True), verbose=False)
    out = task(torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))
    out["loss"].backward()
    assert student.head.weight.grad is not None


# ----------------------------------------------------------------------------------------------------------------------
# task
# ----------------------------------------------------------------------------------------------------------------------


def test_task_is_a_timm_training_task_with_student_as_eval_model():
    student = resnet()
    task = RememDistillationTask(student, vit(), DistillationLoss("dist", temperature=4.0), verbose=False)
    assert isinstance(task, TrainingTask)
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,))
    out = task(x, y)
    with torch.no_grad():
        s, t = student(x), task.teacher(x)
    expected = 1.0 * DistillationLoss("kd", distill_weight=0.0).task_loss(s, y) + dist_loss(s, t, 4.0)
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-5)
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
