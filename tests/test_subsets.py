"""Seeded training subsets (timm_remem.subsets): counts against hand-computed profiles, the images against the
labels they claim, reproducibility, nesting, and the runs applying them to the training split only."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from PIL import Image

from timm_remem.data import create_dataset, dataset_num_classes
from timm_remem.errors import ConfigError
from timm_remem.subsets import dataset_targets, subset_counts, training_subset
from timm_remem.train import FinetuneConfig
from timm_remem.train.builders import build_data


class _Labelled(torch.utils.data.Dataset):
    """``n_per_class[c]`` samples of class c; sample i is ``(i, label)`` so a subset's items can be checked."""

    def __init__(self, n_per_class):
        self.labels = [c for c, n in enumerate(n_per_class) for _ in range(n)]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.tensor(float(i)), self.labels[i]


def test_per_class_keeps_exactly_n_of_every_class_and_each_item_has_its_own_label():
    ds = _Labelled([7, 12, 5, 9])
    sub = training_subset(ds, per_class=4, seed=3)
    items = [sub[i] for i in range(len(sub))]
    assert Counter(y for _, y in items) == {0: 4, 1: 4, 2: 4, 3: 4}
    assert all(ds.labels[int(x)] == y for x, y in items)  # the label read is the label of the image served
    assert len({int(x) for x, _ in items}) == 16  # no image twice


def test_long_tail_profile_matches_the_cifar_lt_formula_by_hand():
    # 100 * 10 ** (-c / 9), floored: the CIFAR-10-LT profile with imbalance ratio 10, values worked out by hand
    assert subset_counts([120] * 10, per_class=100, imbalance=10) == [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]
    # without per_class the base is the smallest class (here 50)
    assert subset_counts([80, 50, 90], imbalance=4) == [50, 25, 12]
    assert subset_counts([80, 50, 90]) == [50, 50, 50]  # neither option: the smallest class's size for all
    # ratio 1 is a balanced subset; every class keeps at least one image whatever the ratio
    assert subset_counts([10, 10], per_class=6, imbalance=1) == [6, 6]
    assert subset_counts([10, 10, 10], per_class=2, imbalance=1000) == [2, 1, 1]


def test_long_tail_subset_has_the_profile_on_digits_and_skips_empty_class_indices():
    train = create_dataset("digits", split="train", img_size=8)
    counts = Counter(dataset_targets(training_subset(train, per_class=20, imbalance=10, seed=0)))
    assert [counts[c] for c in range(10)] == [20, 15, 11, 9, 7, 5, 4, 3, 2, 2]  # 20 * 10 ** (-c / 9), floored
    gaps = _Labelled([5, 0, 5])  # class 1 has no image: the tail runs over the classes present
    assert Counter(dataset_targets(training_subset(gaps, per_class=4, imbalance=4))) == {0: 4, 2: 1}


def test_the_same_seed_gives_the_same_images_another_seed_others_and_larger_budgets_nest():
    ds = _Labelled([30, 30, 30])
    a = training_subset(ds, per_class=5, seed=1).indices
    assert a == training_subset(ds, per_class=5, seed=1).indices
    assert a != training_subset(ds, per_class=5, seed=2).indices
    assert set(a) < set(training_subset(ds, per_class=9, seed=1).indices)  # 9 per class holds the 5 per class
    assert training_subset(ds) is ds  # no option: the dataset itself


def test_labels_are_read_from_a_folder_reader_without_decoding_images(tmp_path, monkeypatch):
    for split in ("train", "val"):
        for name, n in (("ant", 3), ("bee", 2)):
            for i in range(n):
                path = tmp_path / split / name / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (4, 4)).save(path)
    ds = create_dataset("folder", tmp_path, "train", img_size=4)
    monkeypatch.setattr(type(ds), "__getitem__", lambda self, i: pytest.fail("an image was decoded"))
    assert sorted(dataset_targets(ds)) == [0, 0, 0, 1, 1]
    sub = training_subset(ds, per_class=2, seed=0)
    assert sorted(dataset_targets(sub)) == [0, 0, 1, 1] and dataset_num_classes(sub) == 2


def test_a_run_cuts_only_its_training_split():
    cfg = FinetuneConfig(model="test_vit", dataset="digits", img_size=16, train_per_class=3, subset_seed=4,
                         progress=False, device="cpu")
    model = torch.nn.Linear(1, 1)
    model.pretrained_cfg = {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    train, val, train_loader, _ = build_data(cfg, model, 16)
    assert Counter(dataset_targets(train)) == {c: 3 for c in range(10)}
    assert len(val) == 360  # the whole held-out split
    assert train.indices == training_subset(create_dataset("digits", split="train", img_size=8), per_class=3,
                                            seed=4).indices  # chosen by labels and subset_seed, not by img_size
    assert sum(len(y) for _, y, _ in train_loader) == 30


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(per_class=6), r"train_per_class=6 exceeds the training images of 1 class\(es\) \(class 2: 5\); use "
                        r"train_per_class <= 5"),
    (dict(per_class=0), r"train_per_class must be a positive integer or None, got 0"),
    (dict(imbalance=0.5), r"train_imbalance must be .*got 0\.5"),
    (dict(per_class=2, seed=1.5), r"subset_seed must be an integer"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        training_subset(_Labelled([7, 6, 5]), **kwargs)


def test_non_integer_labels_are_refused_with_the_label_named():
    with pytest.raises(ConfigError, match=r"need integer class labels; list has a label 0\.5"):
        training_subset([(0, 0.5), (1, 1)], per_class=1)
    with pytest.raises(ConfigError, match=r"has a label True"):
        training_subset([(0, True), (1, False)], per_class=1)


def test_train_config_checks_the_subset_settings():
    with pytest.raises(ConfigError, match=r"train_imbalance must be .*got 0\.9"):
        FinetuneConfig(model="m", train_imbalance=0.9)
    with pytest.raises(ConfigError, match=r"train_per_class must be a positive integer or None, got -1"):
        FinetuneConfig(model="m", train_per_class=-1)


def test_multi_column_targets_fall_back_to_the_label_each_sample_yields():
    class _QMNISTLike(_Labelled):  # torchvision's QMNIST keeps [N, 8] targets but yields target[0]
        @property
        def targets(self):
            return torch.tensor([[y, 7, 7, 7] for y in self.labels])

    ds = _QMNISTLike([3, 2])
    assert dataset_targets(ds) == [0, 0, 0, 1, 1]
    assert sorted(dataset_targets(training_subset(ds, per_class=2))) == [0, 0, 1, 1]


def test_the_error_names_the_setting_that_asked_for_the_subset():
    with pytest.raises(ConfigError, match=r"labels_per_class=2 exceeds the training images of 1 class\(es\) "
                                          r"\(class 1: 1\); use labels_per_class <= 1"):
        training_subset(_Labelled([4, 1]), per_class=2, option="labels_per_class")
