"""Image folders that cannot silently mislead: the splits, the class mapping and the images are all checked.

A folder is ``root/train/<class>/<image>`` plus ``root/val/<class>/<image>`` (timm's split names), or
``root/<class>/<image>``. Validation is never the training set: a validation folder must hold exactly the training
classes (and is labelled by the training mapping); without one, the validation split is refused unless
``val_fraction`` holds out a seeded, stratified split. Undecodable files are skipped with a warning (as timm does).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import ImageDataset
from timm.data.readers import create_reader, get_img_extensions
from timm.utils import natural_key

from .errors import ConfigError

__all__ = ["SPLIT_FOLDERS", "FolderImageDataset", "folder_dataset", "open_rgb", "unreadable"]

_log = logging.getLogger(__name__)

SPLIT_FOLDERS = {"train": ("train", "training"), "val": ("val", "valid", "validation", "eval", "evaluation")}
_FIX_LAYOUT = "lay it out as root/train/<class>/<image> and root/val/<class>/<image>"


def _names(names: list[str], limit: int = 10) -> str:
    shown = sorted(names, key=natural_key)
    return repr(shown[:limit])[:-1] + (f", ... ({len(shown)} in all)]" if len(shown) > limit else "]")


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file to RGB (16-bit grey scaled to 8 bits, alpha dropped).

    Raises:
        ConfigError: A float image, an image over PIL's decompression-bomb limit, or a mode PIL cannot convert.
        OSError: The file is not an image or is truncated (PIL's error).

    Example:
        >>> import tempfile, os, numpy as np
        >>> path = os.path.join(tempfile.mkdtemp(), "deep.png")
        >>> Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16)).save(path)
        >>> open_rgb(path).getpixel((0, 0))
        (255, 255, 255)
    """
    path = str(path)
    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode == "I" or mode.startswith("I;16"):
                pixels = np.asarray(img)
                if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
                    raise ConfigError(f"image {path!r} has 32-bit integer pixels outside 0..65535 (mode {mode!r}); "
                                      "save it with 8 or 16 bits per channel")
                img = Image.fromarray(np.floor(pixels.astype(np.float64) / 257.0 + 0.5).astype(np.uint8))
            elif mode == "F":
                raise ConfigError(f"image {path!r} has 32-bit float pixels (mode 'F'), which have no fixed range; "
                                  "save it with 8 or 16 bits per channel")
            elif mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            try:
                return img.convert("RGB")
            except ValueError as e:
                raise ConfigError(f"image {path!r} has mode {mode!r}, which PIL cannot convert to RGB ({e}); save "
                                  "it as RGB") from None
    except Image.DecompressionBombError as e:
        raise ConfigError(f"image {path!r} is too large to decode safely ({e}); resize it, or raise "
                          "PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from None


def unreadable(names: list[str]) -> ConfigError:
    """The error for images that could not be read in a row."""
    return ConfigError(
        f"cannot read {len(names)} images in a row ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): they "
        "are corrupt or not images. Delete or replace them (timm skips fewer bad files with a warning)."
    )


class FolderImageDataset(ImageDataset):
    """timm's ``ImageDataset`` over a checked image folder, decoding with :func:`open_rgb`."""

    def __getitem__(self, index: int) -> tuple[Any, int]:
        start = index
        for _ in range(self._max_retries):
            path, target = self.reader.samples[index]
            try:
                img = open_rgb(path)
                break
            except OSError as e:
                _log.warning("Skipped sample (index %d). %s (file %s)", index, e, path)
                index = (index + 1) % len(self.reader)
        else:
            count = min(self._max_retries, len(self.reader))
            raise unreadable([str(self.reader.samples[(start + i) % len(self.reader)][0]) for i in range(count)])
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def _scan(folder: str, name: str) -> Any:
    """timm's folder reader for ``folder``, after checking loose images, empty classes and the class count."""
    try:
        reader = create_reader("", root=folder)
    except RuntimeError as e:
        if "Found 0" not in str(e):
            raise
        raise ConfigError(f"dataset {name!r} at {folder!r} is empty: {e}. Put images in class sub-folders "
                          "(root/<class>/<image>.jpg)") from None
    rel = [os.path.relpath(p, folder) for p, _ in reader.samples]
    loose = [r for r in rel if os.sep not in r]
    if loose:
        raise ConfigError(f"{len(loose)} image(s) lie directly in {folder!r}, outside any class folder (e.g. "
                          f"{loose[0]!r}): move them into {folder}/<class>/ (the folder name is the class)")
    used = {r.split(os.sep)[0] for r in rel}
    empty = [d.name for d in Path(folder).iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in used]
    if empty:
        raise ConfigError(f"class folder(s) {_names(empty)} in {folder!r} hold no images "
                          f"({', '.join(get_img_extensions())}): add images or remove the folders (a class with no "
                          "images is a label the model never sees)")
    if len(reader.class_to_idx) < 2:
        raise ConfigError(f"{folder!r} holds one class {_names(list(reader.class_to_idx))}: classification needs at "
                          "least 2 class folders (root/<class>/<image>)")
    return reader


def _match_classes(val: Any, train: Any, val_dir: str, train_dir: str) -> None:
    """Refuse differing class sets; relabel ``val`` through the training set's name-to-index mapping."""
    a, b = set(train.class_to_idx), set(val.class_to_idx)
    if a != b:
        raise ConfigError(
            f"the validation folder {val_dir!r} and the training folder {train_dir!r} hold different classes: only "
            f"in training {_names(list(a - b))}, only in validation {_names(list(b - a))}. Give both the same class "
            "folders (labels are indices into the sorted training classes, so one missing class shifts the labels)"
        )
    names = {i: c for c, i in val.class_to_idx.items()}
    val.samples = [(p, train.class_to_idx[names[t]]) for p, t in val.samples]
    val.class_to_idx = dict(train.class_to_idx)


def _hold_out(reader: Any, fraction: float, seed: int, folder: str) -> set[str]:
    """The held-out paths: per class, the first ``int(fraction * n + 0.5)`` (1..n-1) of a seeded permutation."""
    by_class: dict[int, list[str]] = {}
    for path, target in reader.samples:
        by_class.setdefault(target, []).append(path)
    names = {i: c for c, i in reader.class_to_idx.items()}
    g = torch.Generator().manual_seed(seed)
    held: set[str] = set()
    for target in sorted(by_class):
        paths = by_class[target]
        if len(paths) < 2:
            raise ConfigError(f"class {names[target]!r} in {folder!r} has {len(paths)} image: a held-out validation "
                              "split needs at least 2 per class; add images or give a val/ folder")
        k = min(len(paths) - 1, max(1, int(fraction * len(paths) + 0.5)))
        held.update(paths[i] for i in torch.randperm(len(paths), generator=g)[:k].tolist())
    return held


def folder_dataset(root: str | os.PathLike, kind: str, *, val_fraction: float | None = None, split_seed: int = 0,
                   name: str = "folder") -> FolderImageDataset:
    """The ``kind`` (``"train"`` or ``"val"``) split of an image folder, checked as the module docstring says.

    The validation call logs a held-out split it makes; with a validation folder ``val_fraction`` is ignored.

    Raises:
        ConfigError: No validation split (and no ``val_fraction``), differing class sets, one class, empty class
            folders, loose images, a class too small to split, or an empty folder.
    """
    root = os.fspath(root)
    train_dir, val_dir = (next((os.path.join(root, s) for s in SPLIT_FOLDERS[k] if os.path.isdir(os.path.join(
        root, s))), None) for k in ("train", "val"))
    if val_dir is not None and train_dir is None:
        raise ConfigError(f"{root!r} has a validation folder {os.path.basename(val_dir)!r} but no training folder "
                          f"(one of {SPLIT_FOLDERS['train']}): {_FIX_LAYOUT}")
    train_dir = train_dir or root
    if val_dir is not None and os.path.samefile(val_dir, train_dir):
        raise ConfigError(f"the validation folder {val_dir!r} is the training folder {train_dir!r}: {_FIX_LAYOUT}")
    train = _scan(train_dir, name)
    if val_dir is not None:
        if val_fraction is not None:
            _log.warning("val_fraction=%g is ignored: %r has its own validation folder", val_fraction, val_dir)
        reader = train
        if kind == "val":
            reader = _scan(val_dir, name)
            _match_classes(reader, train, val_dir, train_dir)
        return FolderImageDataset(root, reader=reader)
    if val_fraction is None:
        if kind == "train":
            return FolderImageDataset(root, reader=train)
        test = " (a test/ folder is not used for validation: rename it to val/)" if os.path.isdir(
            os.path.join(root, "test")) else ""
        raise ConfigError(
            f"{root!r} has no validation folder (one of {SPLIT_FOLDERS['val']}){test}, so validation would run on "
            f"the training images: {_FIX_LAYOUT} (the timm-remem commands read that val/ folder), or, from Python, "
            "hold out a seeded stratified split with timm_remem.data.create_dataset(..., val_fraction=0.2)"
        )
    held = _hold_out(train, val_fraction, split_seed, train_dir)
    total = len(train.samples)
    train.samples = [s for s in train.samples if (s[0] in held) == (kind == "val")]
    if kind == "val":
        _log.warning("no validation folder in %r: holding out %d of its %d images for validation (val_fraction=%g, "
                     "stratified by class, split_seed=%d); training uses the other %d", root, len(held), total,
                     val_fraction, split_seed, total - len(held))
    return FolderImageDataset(root, reader=train)
