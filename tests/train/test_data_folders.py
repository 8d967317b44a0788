"""Image folders in timm_remem.data: validation is never silently the training set, labels follow the training
classes, and every image mode decodes to the right RGB values (references computed here with numpy)."""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
from PIL import Image

from timm_remem._image_folder import open_rgb
from timm_remem.data import create_dataset, dataset_num_classes
from timm_remem.errors import ConfigError

RAW = dict(img_size=4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # tensors are pixel / 255


def _png(path, value, size=4, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), value).save(path)


def _folder(root, counts, shade=None):
    """``root/<class>/<i>.png`` with ``counts[class]`` images; pixel value encodes (class index, image index)."""
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            v = shade(c, i) if shade else 10 * c + i
            _png(root / name / f"{i:02d}.png", (v, v, v))
    return root


def _labels_and_values(ds):
    return [(int(t), round(float(x[0, 0, 0]) * 255)) for x, t in (ds[i] for i in range(len(ds)))]


# ------------------------------------------------------------------------------------------------ splits


def test_flat_folder_is_refused_as_validation(tmp_path):
    _folder(tmp_path, {"cat": 3, "dog": 3})
    assert len(create_dataset("folder", tmp_path, "train", **RAW)) == 6  # the training split is the whole folder
    with pytest.raises(ConfigError, match=r"has no validation folder .* so validation would run on the training "
                                          r"images: .*val_fraction=0\.2"):
        create_dataset("folder", tmp_path, "val", **RAW)


def test_train_folder_without_val_folder_is_refused(tmp_path):
    _folder(tmp_path / "train", {"cat": 2, "dog": 2})
    (tmp_path / "test").mkdir()
    with pytest.raises(ConfigError, match=r"has no validation folder .*rename it to val/"):
        create_dataset("folder", tmp_path, "val", **RAW)


def test_held_out_split_is_stratified_seeded_and_disjoint(tmp_path, caplog):
    counts = {"a": 10, "b": 5, "c": 3}
    _folder(tmp_path, counts)
    with caplog.at_level(logging.WARNING):
        val = create_dataset("folder", tmp_path, "val", val_fraction=0.25, **RAW)
    train = create_dataset("folder", tmp_path, "train", val_fraction=0.25, **RAW)
    # int(0.25 * n + 0.5), at least 1: a 10 -> 3, b 5 -> 1, c 3 -> 1
    expected = {0: 3, 1: 1, 2: 1}
    assert {c: sum(1 for t, _ in _labels_and_values(val) if t == c) for c in range(3)} == expected
    vals, trains = _labels_and_values(val), _labels_and_values(train)
    assert len(vals) + len(trains) == 18 and not set(vals) & set(trains)
    assert sorted(vals + trains) == sorted((c, 10 * c + i) for c, n in enumerate(counts.values()) for i in range(n))
    assert all(v // 10 == t for t, v in vals + trains)  # every label is its image's class
    assert re.search(r"holding out 5 of its 18 images for validation \(val_fraction=0\.25, stratified by class, "
                     r"split_seed=0\); training uses the other 13", caplog.text)
    again = create_dataset("folder", tmp_path, "val", val_fraction=0.25, **RAW)
    assert _labels_and_values(again) == vals  # the same seed, the same split
    other = [_labels_and_values(create_dataset("folder", tmp_path, "val", val_fraction=0.25, split_seed=s, **RAW))
             for s in (1, 2, 3)]
    assert any(o != vals for o in other)


def test_held_out_split_follows_the_documented_permutation(tmp_path):
    _folder(tmp_path, {"a": 6, "b": 4})
    val = create_dataset("folder", tmp_path, "val", val_fraction=0.5, split_seed=7, **RAW)
    g = torch.Generator().manual_seed(7)  # the recipe of the docstring, per class in index order
    held_a = sorted(torch.randperm(6, generator=g)[:3].tolist())
    held_b = sorted(torch.randperm(4, generator=g)[:2].tolist())
    assert _labels_and_values(val) == [(0, i) for i in held_a] + [(1, 10 + i) for i in held_b]


def test_val_folder_labels_follow_the_training_classes(tmp_path):
    _folder(tmp_path / "train", {"ant": 1, "bee": 1, "cat": 1}, shade=lambda c, i: 50 * c)
    _folder(tmp_path / "val", {"ant": 1, "bee": 1, "cat": 1}, shade=lambda c, i: 50 * c + 1)
    val = create_dataset("folder", tmp_path, "validation", **RAW)
    assert sorted(_labels_and_values(val)) == [(0, 1), (1, 51), (2, 101)]
    assert dataset_num_classes(val) == 3


@pytest.mark.parametrize(("val_classes", "match"), [
    pytest.param(("ant", "cat"), r"only in training \['bee'\], only in validation \[\]", id="fewer"),
    pytest.param(("ant", "bee", "cat", "dog"), r"only in training \[\], only in validation \['dog'\]", id="more"),
    pytest.param(("ant", "bee", "cow"), r"only in training \['cat'\], only in validation \['cow'\]", id="renamed"),
])
def test_val_folder_with_other_classes_is_refused(tmp_path, val_classes, match):
    _folder(tmp_path / "train", dict.fromkeys(("ant", "bee", "cat"), 1))
    _folder(tmp_path / "val", dict.fromkeys(val_classes, 1))
    with pytest.raises(ConfigError, match=r"hold different classes: " + match):
        create_dataset("folder", tmp_path, "val", **RAW)


def test_one_class_and_empty_classes_and_loose_images_are_refused(tmp_path):
    _folder(tmp_path / "one", {"cat": 2})
    with pytest.raises(ConfigError, match=r"holds one class \['cat'\]: classification needs at least 2"):
        create_dataset("folder", tmp_path / "one", **RAW)
    _folder(tmp_path / "empty", {"cat": 2, "dog": 2})
    (tmp_path / "empty" / "emu").mkdir()
    with pytest.raises(ConfigError, match=r"class folder\(s\) \['emu'\] in .* hold no images"):
        create_dataset("folder", tmp_path / "empty", **RAW)
    _folder(tmp_path / "loose", {"cat": 2, "dog": 2})
    _png(tmp_path / "loose" / "stray.png", (0, 0, 0))
    with pytest.raises(ConfigError, match=r"1 image\(s\) lie directly in .*outside any class folder .*'stray\.png'"):
        create_dataset("folder", tmp_path / "loose", **RAW)


# ------------------------------------------------------------------------------------------------ images


def _single(tmp_path, write):
    """A two-class folder whose first image is written by ``write(path)``; returns its RGB values (0..255)."""
    write(tmp_path / "a" / "0.png")
    _png(tmp_path / "b" / "0.png", (0, 0, 0))
    ds = create_dataset("folder", tmp_path, **RAW)
    return (ds[0][0][:, 0, 0] * 255).round().tolist()


def _save(array, mode=None, fmt="PNG"):
    def write(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
        img.save(path, format=fmt)
    return write


def test_16_bit_grey_is_scaled_not_clipped(tmp_path):
    # 40000 / 65535 of full scale: 156 of 255 (timm's convert("RGB") clips every value over 255 to white)
    value = _single(tmp_path, _save(np.full((4, 4), 40000, dtype=np.uint16)))
    assert value == [round(40000 / 257)] * 3


def test_palette_image_keeps_its_colours(tmp_path):
    def write(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        img = Image.new("P", (4, 4), 1)
        img.putpalette([0, 0, 0, 200, 30, 90] + [0] * 762)
        img.save(path)
    assert _single(tmp_path, write) == [200, 30, 90]


def test_rgba_and_grey_alpha_drop_the_alpha_channel(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[...] = (10, 120, 250, 7)
    assert _single(tmp_path / "rgba", _save(rgba)) == [10, 120, 250]
    la = np.zeros((4, 4, 2), dtype=np.uint8)
    la[...] = (77, 0)
    assert _single(tmp_path / "la", _save(la)) == [77, 77, 77]


def test_cmyk_jpeg_is_converted_to_rgb(tmp_path):
    def write(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("CMYK", (8, 8), (0, 100, 200, 50)).save(path.with_suffix(".jpg"), quality=100)
    # PIL's CMYK -> RGB: (255 - channel) * (255 - K) / 255
    reference = [(255 - c) * (255 - 50) / 255 for c in (0, 100, 200)]
    assert np.allclose(_single(tmp_path, write), reference, atol=3)


def test_float_images_are_refused_naming_the_file(tmp_path):
    path = tmp_path / "depth.png"  # TIFF bytes behind a .png name: PIL reads by content
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(path, format="TIFF")
    with pytest.raises(ConfigError, match=r"image '.*depth\.png' has 32-bit float pixels \(mode 'F'\)"):
        open_rgb(path)


def test_decompression_bomb_is_refused_naming_the_file(tmp_path, monkeypatch):
    _folder(tmp_path, {"a": 1, "b": 1})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4)  # 16 pixels > 2 x 4: PIL's bomb error
    ds = create_dataset("folder", tmp_path, **RAW)
    with pytest.raises(ConfigError, match=r"image '.*a/00\.png' is too large to decode safely .*MAX_IMAGE_PIXELS"):
        ds[0]


def test_truncated_image_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    _folder(tmp_path, {"a": 2, "b": 1})
    bad = tmp_path / "a" / "00.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[:200])
    ds = create_dataset("folder", tmp_path, **RAW)
    with caplog.at_level(logging.WARNING):
        image, label = ds[0]
    assert re.search(r"Skipped sample \(index 0\)\. .*\(file .*a/00\.png\)", caplog.text)
    assert (label, round(float(image[0, 0, 0]) * 255)) == (0, 1)  # the next image of the folder took its place
