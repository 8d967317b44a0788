"""Bad data (the rows of docs/bad-input.md, section "Data: image folders, images and training loaders").

Each refusal case builds a tiny image folder with PIL in ``tmp_path`` and checks that ``create_dataset`` (or reading
an image, or ``create_loader``) raises exactly ``ConfigError`` with the quoted message. Each decoding case checks the
RGB values a model gets from an odd image mode against values computed here.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from timm_remem.data import create_dataset, create_loader
from timm_remem.errors import ConfigError
from timm_remem.subsets import training_subset
from timm_remem.train import DistillConfig

RAW = dict(img_size=4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _png(path: Path, value=(9, 9, 9), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (4, 4), value).save(path)


def _classes(root: Path, names, per_class=2):
    for name in names:
        for i in range(per_class):
            _png(root / name / f"{i}.png")


def _flat(r):
    _classes(r, ("cat", "dog"))
    return create_dataset("folder", r, "val", **RAW)


def _train_and_test_only(r):
    _classes(r / "train", ("cat", "dog"))
    _classes(r / "test", ("cat", "dog"))
    return create_dataset("folder", r, "val", **RAW)


def _val_only(r):
    _classes(r / "val", ("cat", "dog"))
    return create_dataset("folder", r, "train", **RAW)


def _val_classes(names):
    def call(r):
        _classes(r / "train", ("ant", "bee", "cat"))
        _classes(r / "val", names)
        return create_dataset("folder", r, "val", **RAW)
    return call


def _one_class(r):
    _classes(r, ("cat",))
    return create_dataset("folder", r, **RAW)


def _empty_class(r):
    _classes(r, ("cat", "dog"))
    (r / "emu").mkdir()
    return create_dataset("folder", r, **RAW)


def _loose_image(r):
    _classes(r / "train", ("cat", "dog"))
    _png(r / "train" / "stray.png")
    return create_dataset("folder", r, "train", **RAW)


def _class_too_small(r):
    _classes(r, ("cat",), per_class=3)
    _classes(r, ("dog",), per_class=1)
    return create_dataset("folder", r, "val", val_fraction=0.2, **RAW)


def _float_image(r):
    _classes(r, ("cat", "dog"))
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(r / "cat" / "0.png", format="TIFF")
    return create_dataset("folder", r, **RAW)[0]


def _wide_int_image(r):
    _classes(r, ("cat", "dog"))
    Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)).save(r / "cat" / "0.png", format="TIFF")
    return create_dataset("folder", r, **RAW)[0]


def _bomb(r):
    _classes(r, ("cat", "dog"))
    Image.new("RGB", (200, 200)).save(r / "cat" / "0.png")  # 40000 pixels > 2 x 10000
    ds = create_dataset("folder", r, **RAW)
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 10000
    try:
        return ds[0]
    finally:
        Image.MAX_IMAGE_PIXELS = limit


class _Points(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.zeros(3, 4, 4), 0


DATA_CASES = [
    pytest.param(_flat, r"'.*' has no validation folder \(one of \('val', 'valid', 'validation', 'eval', "
                 r"'evaluation'\)\), so validation would run on the training images: lay it out as "
                 r"root/train/<class>/<image> and root/val/<class>/<image> \(the timm-remem commands read that val/ "
                 r"folder\), or, from Python, hold out a seeded stratified split with "
                 r"timm_remem\.data\.create_dataset\(\.\.\., val_fraction=0\.2\)", id="folder-without-val-split"),
    pytest.param(_train_and_test_only, r"has no validation folder .*\(a test/ folder is not used for validation: "
                 r"rename it to val/\)", id="train-and-test-folders-only"),
    pytest.param(_val_only, r"has a validation folder 'val' but no training folder \(one of \('train', "
                 r"'training'\)\)", id="val-folder-without-train"),
    pytest.param(_val_classes(("ant", "cat")), r"the validation folder '.*val' and the training folder '.*train' "
                 r"hold different classes: only in training \['bee'\], only in validation \[\]\. Give both the same "
                 r"class folders \(labels are indices into the sorted training classes, so one missing class shifts "
                 r"the labels\)", id="val-fewer-classes"),
    pytest.param(_val_classes(("ant", "bee", "cat", "dog")), r"hold different classes: only in training \[\], only "
                 r"in validation \['dog'\]", id="val-extra-class"),
    pytest.param(_val_classes(("ant", "bee", "cow")), r"only in training \['cat'\], only in validation \['cow'\]",
                 id="val-other-class-names"),
    pytest.param(_one_class, r"'.*' holds one class \['cat'\]: classification needs at least 2 class folders",
                 id="one-class"),
    pytest.param(_empty_class, r"class folder\(s\) \['emu'\] in '.*' hold no images \(\.png, \.jpg, \.jpeg\): add "
                 r"images or remove the folders", id="empty-class-folder"),
    pytest.param(_loose_image, r"1 image\(s\) lie directly in '.*train', outside any class folder \(e\.g\. "
                 r"'stray\.png'\): move them into .*train/<class>/", id="image-outside-class-folders"),
    pytest.param(_class_too_small, r"class 'dog' in '.*' has 1 image: a held-out validation split needs at least 2 "
                 r"per class", id="held-out-class-too-small"),
    pytest.param(lambda r: create_dataset("digits", split="val", val_fraction=1.5), r"val_fraction must be a "
                 r"finite number in \(0, 1\) or None, got 1\.5; the fraction of images held out",
                 id="val-fraction-1.5"),
    pytest.param(lambda r: (_classes(r, ("a", "b")), create_dataset("folder", r, class_map="x.txt")),
                 r"options \['class_map'\] are not supported for image folders", id="folder-unknown-option"),
    pytest.param(_float_image, r"image '.*cat/0\.png' has 32-bit float pixels \(mode 'F'\), which have no fixed "
                 r"range; save it with 8 or 16 bits per channel", id="float-image"),
    pytest.param(_wide_int_image, r"image '.*cat/0\.png' has 32-bit integer pixels outside 0\.\.65535 "
                 r"\(mode 'I'\)", id="32-bit-int-image"),
    pytest.param(_bomb, r"image '.*cat/0\.png' is too large to decode safely \(Image size \(40000 pixels\) exceeds "
                 r"limit of 20000 pixels.*\); resize it, or raise PIL\.Image\.MAX_IMAGE_PIXELS",
                 id="decompression-bomb"),
    pytest.param(lambda r: create_loader(_Points(1), batch_size=8, shuffle=True), r"the training set has 1 "
                 r"sample\(s\), 1 per process: a training batch needs at least 2 \(BatchNorm cannot train on one "
                 r"sample\); add data or use fewer processes", id="training-set-of-one-sample"),
    pytest.param(lambda r: create_loader(_Points(4), batch_size=2, min_last_batch=0),
                 r"min_last_batch must be a positive integer or None, got 0", id="min-last-batch-zero"),
    pytest.param(lambda r: training_subset(create_dataset("digits", img_size=8), per_class=200),
                 r"train_per_class=200 exceeds the training images of 10 class\(es\) \(class 0: 142, class 1: 146, "
                 r".*\); use train_per_class <= 139", id="subset-larger-than-a-class"),
    pytest.param(lambda r: training_subset(create_dataset("digits", img_size=8), imbalance=0.1),
                 r"train_imbalance must be .*got 0\.1", id="subset-imbalance-below-one"),
    pytest.param(lambda r: training_subset([(0.0, "cat"), (1.0, "dog")], per_class=1),
                 r"training subsets need integer class labels; list has a label 'cat'", id="subset-string-labels"),
    pytest.param(lambda r: DistillConfig(model="test_resnet", labels_per_class=5, mixup=0.8),
                 r"labels_per_class=5 masks the label loss per image, but mixup/cutmix blend labelled with "
                 r"unlabelled images; turn mixup and cutmix off", id="labels-per-class-with-mixup"),
]


@pytest.mark.parametrize(("call", "match"), DATA_CASES)
def test_data_refuses(call, match, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(ConfigError, match=f"(?s){match}") as info:
        call(root)
    assert type(info.value) is ConfigError


def _write(array=None, image=None, fmt="PNG"):
    def write(path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        (image() if image else Image.fromarray(array)).save(path, format=fmt)
    return write


def _palette():
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 200, 30, 90] + [0] * 762)
    img.info["transparency"] = 0
    return img


def _fill(*values):
    a = np.zeros((4, 4, len(values)), dtype=np.uint8)
    a[...] = values
    return a


DECODE_CASES = [
    pytest.param(_write(np.full((4, 4), 40000, dtype=np.uint16)), [40000 / 257] * 3, id="16-bit-grey"),
    pytest.param(_write(image=_palette), [200, 30, 90], id="palette-with-transparency"),
    pytest.param(_write(_fill(10, 120, 250, 7)), [10, 120, 250], id="rgba"),
    pytest.param(_write(_fill(77, 0)), [77, 77, 77], id="grey-with-alpha"),
    pytest.param(_write(image=lambda: Image.new("CMYK", (4, 4), (0, 100, 200, 50)), fmt="JPEG"),
                 [(255 - c) * 205 / 255 for c in (0, 100, 200)], id="cmyk"),  # PIL's formula; JPEG is lossy
    pytest.param(_write(image=lambda: Image.new("1", (4, 4), 1)), [255, 255, 255], id="one-bit"),
]


@pytest.mark.parametrize(("write", "rgb"), DECODE_CASES)
def test_data_decodes(write, rgb, tmp_path):
    write(tmp_path / "a" / "0.png")  # the extension decides what timm lists, the content what PIL reads
    _png(tmp_path / "b" / "0.png")
    image, label = create_dataset("folder", tmp_path, **RAW)[0]
    assert label == 0 and image.shape == (3, 4, 4)
    np.testing.assert_allclose((image[:, 0, 0] * 255).numpy(), rgb, atol=3)  # 8-bit rounding, JPEG


def test_data_truncated_image_is_skipped_naming_the_file(tmp_path, caplog):
    _classes(tmp_path, ("a", "b"), per_class=1)
    bad = tmp_path / "a" / "0.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[:300])
    with caplog.at_level(logging.WARNING):
        _, label = create_dataset("folder", tmp_path, **RAW)[0]
    assert re.search(r"Skipped sample \(index 0\)\. .* \(file .*a/0\.png\)", caplog.text) and label == 1
