"""Tests for timm_remem.data: the offline digits dataset, timm dataset wrappers, the resumable sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from timm_remem.data import (
    DigitsDataset,
    EpochSampler,
    create_dataset,
    create_loader,
    dataset_num_classes,
)
from timm_remem.errors import ConfigError

MEAN = (0.5, 0.25, 0.1)
STD = (0.2, 0.4, 0.8)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_digits_split_sizes_cover_all_images_once(digits):
    train = DigitsDataset("train", img_size=8)
    val = DigitsDataset("val", img_size=8)
    assert len(train) + len(val) == len(digits.target) == 1797
    assert len(val) == 360  # ceil(0.2 * 1797)
    assert set(train.source_indices).isdisjoint(val.source_indices)
    assert sorted(train.source_indices + val.source_indices) == list(range(1797))


def test_digits_split_is_stratified(digits):
    val = DigitsDataset("val", img_size=8)
    counts = np.bincount(val.targets.numpy(), minlength=10)
    expected = np.bincount(digits.target, minlength=10) * 0.2
    assert np.all(np.abs(counts - expected) <= 1.0)


def test_digits_split_is_fixed_across_constructions():
    a = DigitsDataset("train", img_size=16)
    b = DigitsDataset("training", img_size=16)
    assert a.source_indices == b.source_indices
    assert torch.equal(a.images, b.images)


def test_digits_pixels_and_labels_match_sklearn_at_native_size(digits):
    val = DigitsDataset("validation", img_size=8, mean=MEAN, std=STD)
    for i in (0, 17, 359):
        src = val.source_indices[i]
        image, label = val[i]
        assert label == digits.target[src]
        for c in range(3):
            ref = (digits.images[src] / 16.0 - MEAN[c]) / STD[c]
            np.testing.assert_allclose(image[c].numpy(), ref, rtol=0, atol=1e-6)


def test_digits_upsampled_shape_three_equal_channels_before_normalisation():
    ds = DigitsDataset("train", img_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    image, _ = ds[5]
    assert image.shape == (3, 32, 32)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0


def test_digits_upsampling_preserves_mean_intensity(digits):
    # a bilinear 4x upsample keeps the image's average brightness close to the original 8x8 average
    ds = DigitsDataset("train", img_size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    src = ds.source_indices[3]
    assert abs(float(ds[3][0][0].mean()) - digits.images[src].mean() / 16.0) < 0.03


def test_digits_rejects_too_small_image():
    with pytest.raises(ConfigError, match="img_size must be an integer >= 8"):
        DigitsDataset("train", img_size=4)


def test_digits_rejects_unknown_split():
    with pytest.raises(ConfigError, match="unknown split 'holdout'"):
        create_dataset("digits", split="holdout")


def test_create_dataset_digits_and_num_classes():
    ds = create_dataset("DIGITS", split="val", img_size=16)
    assert isinstance(ds, DigitsDataset) and len(ds) == 360 and dataset_num_classes(ds) == 10


def test_create_dataset_unknown_name():
    with pytest.raises(ConfigError, match="unknown dataset name 'imagenette'"):
        create_dataset("imagenette", root=".")


def test_create_dataset_unknown_torchvision_name():
    with pytest.raises(ConfigError, match="unknown torchvision dataset 'torch/cifar1000'"):
        create_dataset("torch/cifar1000", root=".")


def test_create_dataset_torchvision_not_downloaded(tmp_path):
    with pytest.raises(ConfigError, match="download=True"):
        create_dataset("torch/cifar100", root=tmp_path, split="train")


def test_create_dataset_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="does not exist"):
        create_dataset("folder", root=missing)


def test_create_dataset_folder_needs_root():
    with pytest.raises(ConfigError, match="pass root"):
        create_dataset("folder")


def test_create_dataset_empty_folder(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(ConfigError, match="is empty"):
        create_dataset("folder", root=tmp_path)


def _write_image_folder(root, classes=("a", "b", "c"), per_class=2, size=12):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")


def test_create_dataset_image_folder(tmp_path):
    _write_image_folder(tmp_path)
    ds = create_dataset("folder", root=tmp_path, img_size=16)
    image, label = ds[0]
    assert len(ds) == 6 and dataset_num_classes(ds) == 3
    assert image.shape == (3, 16, 16) and label in (0, 1, 2)


def test_epoch_sampler_same_seed_and_epoch_same_order():
    a, b = EpochSampler(50, seed=7), EpochSampler(50, seed=7)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) and sorted(a) == list(range(50))


def test_epoch_sampler_epochs_differ():
    s = EpochSampler(50, seed=7)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first


def test_epoch_sampler_start_index_skips_consumed_samples():
    s = EpochSampler(20, seed=1)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_index=8)
    assert list(s) == full[8:] and len(s) == 12


def test_epoch_sampler_without_shuffle_keeps_order():
    s = EpochSampler(5, shuffle=False)
    assert list(s) == [0, 1, 2, 3, 4]


def test_epoch_sampler_replicas_partition_the_data():
    shards = []
    for rank in range(2):
        s = EpochSampler(10, seed=3, num_replicas=2, rank=rank)
        s.set_epoch(4)
        shards.append(list(s))
    assert len(shards[0]) == len(shards[1]) == 5
    assert sorted(shards[0] + shards[1]) == list(range(10))


def test_loader_batches_carry_dataset_indices():
    ds = create_dataset("digits", split="val", img_size=8)
    loader = create_loader(ds, batch_size=32, shuffle=True, seed=0)
    loader.sampler.set_epoch(0)
    images, targets, indices = next(iter(loader))
    for k in (0, 31):
        ref_image, ref_label = ds[int(indices[k])]
        assert torch.equal(images[k], ref_image) and int(targets[k]) == ref_label


def test_loader_rejects_bad_batch_size():
    with pytest.raises(ConfigError, match="batch_size must be a positive integer, got 0"):
        create_loader(create_dataset("digits", split="val", img_size=8), batch_size=0)
