"""Semi-supervised distillation (``DistillConfig.labels_per_class``): the label loss reads the labels of the chosen
images only, once per image and epoch, with and without a teacher; its value is the mean cross-entropy over the
batch's labelled images (checked against log-softmax by hand)."""

from __future__ import annotations

import pytest
import torch

import timm_remem.train.recipes as recipes
from timm_remem.data import create_dataset
from timm_remem.errors import ConfigError
from timm_remem.subsets import dataset_targets, training_subset
from timm_remem.train import DistillConfig, distill_student

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = dict(model="test_resnet", dataset="digits", img_size=16, epochs=1, batch_size=128, progress=False,
           device="cpu", save_state=False, save_at=[])


def _record_labels(monkeypatch):
    """Every label the recipe's label loss receives (the loss itself unchanged)."""
    seen: list[int] = []
    real = recipes.task_loss

    def recording(logits, target, smoothing=0.0):
        seen.extend(target.tolist())
        return real(logits, target, smoothing)

    monkeypatch.setattr(recipes, "task_loss", recording)
    return seen


@pytest.mark.parametrize("teacher", [None, "test_vit"], ids=["student-alone", "with-teacher"])
def test_only_the_chosen_images_lend_their_labels(monkeypatch, tmp_path, teacher):
    seen = _record_labels(monkeypatch)
    extra = {"teacher": teacher, "teacher_kwargs": {"img_size": 16, "num_classes": 10},
             "teacher_pretrained": False} if teacher else {}
    distill_student(**RUN, **extra, labels_per_class=3, subset_seed=5, output=str(tmp_path / "run"))
    train = create_dataset("digits", split="train", img_size=8)
    chosen = training_subset(train, per_class=3, seed=5).indices
    # one epoch: each of the 30 labelled images once (the loader drops no labelled image here: 1437 = 11 x 128 + 29)
    assert sorted(seen) == sorted(dataset_targets(train)[i] for i in chosen)
    assert len(seen) == 30


def test_without_the_option_every_training_label_is_read(monkeypatch, tmp_path):
    seen = _record_labels(monkeypatch)
    distill_student(**RUN, output=str(tmp_path / "run"))
    assert len(seen) == 1437  # 11 batches of 128 and one of 29


def test_the_label_term_is_the_mean_cross_entropy_of_the_labelled_images():
    cfg = DistillConfig(model="m", labels_per_class=1)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [-1.0, 3.0, 0.0], [0.0, 0.0, 4.0]], requires_grad=True)
    target = torch.tensor([0, 2, 1, 0])
    idx = torch.tensor([7, 1, 4, 9])
    labelled = torch.zeros(10, dtype=torch.bool)
    labelled[[1, 9]] = True  # batch positions 1 and 3
    got = recipes._labelled_task_loss(cfg, logits, target, idx, labelled)
    p = torch.log_softmax(logits.detach(), dim=1)
    assert got.item() == pytest.approx(-(p[1, 2] + p[3, 0]).item() / 2)
    none = recipes._labelled_task_loss(cfg, logits, target, idx, torch.zeros(10, dtype=torch.bool))
    none.backward()
    assert none.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(labels_per_class=0), r"labels_per_class must be a positive integer or None, got 0"),
    (dict(labels_per_class=5, mixup=0.8), r"labels_per_class=5 masks the label loss per image, but mixup/cutmix "
                                           r"blend labelled with unlabelled images; turn mixup and cutmix off"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DistillConfig(model="m", **kwargs)


def test_more_labels_than_a_class_holds_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"labels_per_class=500 exceeds the training images of 10 class\(es\).*"
                                          r"use labels_per_class <= 139"):
        distill_student(**RUN, labels_per_class=500, output=str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
