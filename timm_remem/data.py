"""Datasets and loaders for the ReMem pipeline.

Datasets: the offline ``"digits"`` set (scikit-learn's 8x8 digits), checked image folders
(:mod:`timm_remem._image_folder`), and everything ``timm.data.create_dataset`` reads (``torch/cifar100``,
``hfds/<name>``, ...). Loaders are plain ``DataLoader`` objects whose order depends only on ``(seed, epoch)``
(timm's ``create_loader`` draws it from the global RNG), so a resumed run sees exactly the batches an
uninterrupted one would; every batch is ``(images, targets, indices)``, the indices keying the teacher-logit cache.

Example:
    >>> from timm_remem.data import create_dataset, create_loader
    >>> train = create_dataset("digits", split="train", img_size=16)
    >>> images, targets, indices = next(iter(create_loader(train, batch_size=8, shuffle=True, seed=0)))
    >>> tuple(images.shape), train.num_classes
    ((8, 3, 16, 16), 10)
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageDataset, create_transform
from timm.data import create_dataset as timm_create_dataset
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, get_worker_info

from ._image_folder import folder_dataset, unreadable
from ._validation import check_float, check_int
from .errors import ConfigError

__all__ = ["DigitsDataset", "EpochSampler", "IndexedDataset", "create_dataset", "create_loader", "dataset_num_classes",
           "sample_seed"]

IMAGENET_MEAN = tuple(IMAGENET_DEFAULT_MEAN)  # (0.485, 0.456, 0.406)
IMAGENET_STD = tuple(IMAGENET_DEFAULT_STD)  # (0.229, 0.224, 0.225)

_TRAIN_SPLITS = ("train", "training")
_VAL_SPLITS = ("val", "valid", "validation", "eval", "evaluation", "test")
_TORCH_NAMES = (
    "cifar10", "cifar100", "mnist", "kmnist", "fashion_mnist", "qmnist", "inaturalist", "inat", "places365",
    "imagenet", "image_folder", "folder",
)
_FOLDER_NAMES = ("", "folder", "imagefolder", "image_folder")
_TIMM_PREFIXES = ("hfds", "hfids", "tfds", "wds")


def _split_kind(split: str) -> str:
    s = split.lower()
    if s in _TRAIN_SPLITS:
        return "train"
    if s in _VAL_SPLITS:
        return "val"
    raise ConfigError(f"unknown split {split!r}; use one of {_TRAIN_SPLITS + _VAL_SPLITS}")


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[Any, Any]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "the offline 'digits' dataset needs scikit-learn; install it with `pip install timm-remem[demo]`"
        ) from e
    digits = load_digits()
    return digits.images, digits.target


@functools.lru_cache(maxsize=8)
def _digits_split(val_fraction: float, split_seed: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    from sklearn.model_selection import train_test_split

    _, labels = _load_digits()
    train_idx, val_idx = train_test_split(
        list(range(len(labels))), test_size=val_fraction, random_state=split_seed, stratify=labels
    )
    return tuple(sorted(train_idx)), tuple(sorted(val_idx))


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 handwritten digits, upsampled to ``img_size``, in 3 normalised channels (no augmentation).

    Args:
        split: ``"train"`` or ``"val"`` (synonyms such as ``"validation"`` are accepted).
        img_size: Output height and width in pixels (>= 8).
        val_fraction: Fraction of the 1,797 images held out for validation (stratified by class).
        mean: Per-channel normalisation mean (use the model's ``pretrained_cfg`` mean); ``std`` likewise.
        split_seed: Seed of the fixed train/val split.

    Example:
        >>> ds = DigitsDataset("val", img_size=16)
        >>> image, label = ds[0]
        >>> tuple(image.shape), 0 <= label < 10
        ((3, 16, 16), True)
    """

    num_classes = 10

    def __init__(
        self,
        split: str = "train",
        img_size: int = 32,
        *,
        val_fraction: float = 0.2,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        split_seed: int = 0,
    ) -> None:
        kind = _split_kind(split)
        if not isinstance(img_size, int) or img_size < 8:
            raise ConfigError(f"img_size must be an integer >= 8 (the digits are 8x8 pixels), got {img_size!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ConfigError(f"mean and std need 3 values each with std > 0, got mean={mean!r} std={std!r}")
        images, labels = _load_digits()
        train_idx, val_idx = _digits_split(val_fraction, split_seed)
        idx = list(train_idx if kind == "train" else val_idx)
        pixels = torch.as_tensor(images[idx], dtype=torch.float32).unsqueeze(1) / 16.0
        if img_size != 8:
            pixels = F.interpolate(pixels, size=(img_size, img_size), mode="bilinear", align_corners=False)
        pixels = pixels.clamp_(0.0, 1.0).expand(-1, 3, -1, -1)
        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.images = ((pixels - m) / s).contiguous()
        self.targets = torch.as_tensor(labels[idx], dtype=torch.long)
        self.source_indices = idx
        self.split = kind
        self.img_size = img_size
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.classes = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.targets[index])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's random transform in one epoch (63 bits of a hash).

    Example:
        >>> sample_seed(0, 1, 5) == sample_seed(0, 1, 5) != sample_seed(0, 2, 5)
        True
    """
    digest = hashlib.blake2b(f"{int(seed)}:{int(epoch)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class IndexedDataset(Dataset):
    """Wraps a dataset so that items are ``(image, target, index)``; the index keys cached teacher logits.

    With ``seed``, every item is fetched with the torch (CPU), Python and NumPy generators seeded by
    :func:`sample_seed` ``(seed, sampler.epoch, index)``, so its augmentation does not depend on the worker or on
    what was fetched before; in the main process the generators' states are put back afterwards.

    Example:
        >>> import random
        >>> class Draw:
        ...     def __getitem__(self, i): return random.random(), 0
        ...     def __len__(self): return 4
        >>> ds = IndexedDataset(Draw(), seed=3, sampler=EpochSampler(4))
        >>> ds[2][0] == ds[2][0] != ds[1][0]
        True
    """

    def __init__(self, dataset: Dataset, *, seed: int | None = None, sampler: EpochSampler | None = None) -> None:
        self.dataset = dataset
        self.seed = seed
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        if self.seed is None:
            image, target = self.dataset[index]
            return image, target, index
        epoch = self.sampler.epoch if self.sampler is not None else 0
        value = sample_seed(self.seed, epoch, index)
        main = get_worker_info() is None  # a worker's streams serve nothing else: no need to put them back
        if main:
            saved = torch.default_generator.get_state(), random.getstate(), np.random.get_state()
        torch.default_generator.manual_seed(value)  # the CPU generator only: CUDA's serves the model
        random.seed(value)
        np.random.seed(value & 0xFFFFFFFF)
        try:
            image, target = self.dataset[index]
        finally:
            if main:
                torch.default_generator.set_state(saved[0])
                random.setstate(saved[1])
                np.random.set_state(saved[2])
        return image, target, index


class EpochSampler(Sampler[int]):
    """A sampler whose order depends only on ``(seed, epoch)``, resumable in the middle of an epoch.

    Call :meth:`set_epoch` before iterating; ``start_index`` skips the first samples of that epoch. With
    ``num_replicas > 1`` each rank takes every ``num_replicas``-th sample of the shared permutation, padded by
    wrapping. A last batch (per rank) of fewer than ``min_last_batch`` samples (given ``batch_size``) is left out.

    Args:
        length: Number of samples in the dataset.
        shuffle: Draw a new permutation every epoch (seeded with ``seed * 100003 + epoch``).
        seed: Base seed.
        num_replicas: Number of data-parallel processes; ``rank`` is this one's.
        batch_size: Samples per batch of the loader this sampler feeds (only used with ``min_last_batch``).
        min_last_batch: The smallest last batch to keep (1 keeps every sample).

    Example:
        >>> s = EpochSampler(10, shuffle=True, seed=3)
        >>> s.set_epoch(1)
        >>> order = list(s)
        >>> s.set_epoch(1, start_index=4)
        >>> list(s) == order[4:]
        True
        >>> len(EpochSampler(9, batch_size=4, min_last_batch=2))  # 4 + 4, the ninth sample waits for another epoch
        8
    """

    def __init__(self, length: int, *, shuffle: bool = True, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 batch_size: int | None = None, min_last_batch: int = 1):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ConfigError(f"rank must be in [0, num_replicas), got rank={rank} num_replicas={num_replicas}")
        check_int("batch_size", batch_size, low=1, allow_none=True)
        check_int("min_last_batch", min_last_batch, low=1)
        self.length = length
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.start_index = 0
        self.per_replica = math.ceil(length / num_replicas)
        tail = self.per_replica % batch_size if batch_size else 0
        self.num_samples = self.per_replica - tail if tail < min_last_batch else self.per_replica

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Select the epoch whose order to produce and how many of its first samples to skip."""
        self.epoch = epoch
        self.start_index = start_index

    def _order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.per_replica * self.num_replicas
        if total > len(order) and order:
            order += order[: total - len(order)]
        return order[self.rank : total : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self._order()[self.start_index : self.num_samples])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start_index)


class _CheckedImageDataset(ImageDataset):
    """timm's ``ImageDataset`` that names the unreadable files when it gives up (timm skips a few with a warning)."""

    def __getitem__(self, index: int) -> Any:
        try:
            return super().__getitem__(index)
        except RuntimeError as error:
            if "consecutive samples" not in str(error):
                raise
            count = min(self._max_retries, len(self.reader))
            raise unreadable([str(self.reader.filename((index + i) % len(self.reader), absolute=True))
                              for i in range(count)]) from None


def _check_folder(root: str | os.PathLike | None, name: str) -> str:
    if root is None:
        raise ConfigError(f"dataset {name!r} reads images from a folder: pass root (--data-dir) pointing at it")
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ConfigError(
            f"dataset folder {root!r} does not exist or is not a directory; pass the folder that holds the "
            "images as root/<class>/<image> (or root/train/<class>/... and root/val/<class>/...)"
        )
    return root


def create_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    split: str = "train",
    *,
    img_size: int = 32,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    augment: bool = False,
    download: bool = False,
    val_fraction: float | None = None,
    split_seed: int = 0,
    **kwargs: Any,
) -> Dataset:
    """Create a dataset by name: the offline ``"digits"`` set, an image folder, or what timm reads.

    Args:
        name: ``"digits"``, ``"folder"`` (or ``""``) for an image folder, ``"torch/<name>"`` (e.g.
            ``"torch/cifar100"``) or a timm reader prefix such as ``"hfds/<hub dataset id>"``.
        root: Folder holding the data (image folders and torchvision sets); unused by ``"digits"``.
        split: ``"train"`` or ``"val"`` (synonyms accepted; other split strings pass through for ``hfds/``).
        img_size: Image height and width fed to the model.
        mean: Normalisation mean (``timm.data.resolve_model_data_config(model)["mean"]``); ``std`` likewise.
        augment: Use timm's training augmentation (``timm.data.create_transform``) on training splits.
        download: Let torchvision download ``torch/...`` sets (off by default: nothing is fetched silently).
        val_fraction: Held-out fraction. ``"digits"``: 0.2 when None. An image folder without a validation folder
            refuses the validation split unless given a fraction, which holds out a seeded, stratified split.
        split_seed: Seed of the held-out split, independent of the training seed.
        **kwargs: Passed through to ``timm.data.create_dataset`` (not for image folders).

    Returns:
        A map-style dataset of ``(image tensor, int label)``.

    Raises:
        ConfigError: Unknown dataset name, missing folder, empty dataset, a torchvision set that is not on disk, or
            an image folder that fails its checks (see :mod:`timm_remem._image_folder`).

    Example:
        >>> ds = create_dataset("digits", split="val", img_size=16)
        >>> len(ds), dataset_num_classes(ds)
        (360, 10)
    """
    if not isinstance(name, str):
        raise ConfigError(f"dataset name must be a string, got {type(name).__name__}")
    lowered = name.lower()
    val_fraction = check_float("val_fraction", val_fraction, low=0, high=1, low_open=True, high_open=True,
                               allow_none=True, hint="the fraction of images held out for validation, e.g. 0.2")
    check_int("split_seed", split_seed)
    if lowered == "digits":
        return DigitsDataset(split, img_size, val_fraction=0.2 if val_fraction is None else val_fraction, mean=mean,
                             std=std, split_seed=split_seed)

    prefix, sep, rest = name.partition("/")
    prefix = prefix.lower() if sep else ""
    if prefix == "torch":
        if rest.lower() not in _TORCH_NAMES:
            raise ConfigError(
                f"unknown torchvision dataset {name!r}; known: {', '.join('torch/' + n for n in _TORCH_NAMES)}"
            )
        if root is None:
            raise ConfigError(f"dataset {name!r} needs root (--data-dir): the folder torchvision stores it in")
    elif prefix in _TIMM_PREFIXES:
        pass
    elif not (sep == "" and lowered in _FOLDER_NAMES):
        raise ConfigError(
            f"unknown dataset name {name!r}; use 'digits' (offline), 'folder' with root=<image folder>, "
            f"'torch/<name>' (e.g. torch/cifar100) or a timm reader such as 'hfds/<dataset id>'"
        )
    if prefix == "" or (prefix == "torch" and rest.lower() in _FOLDER_NAMES):  # an image folder, checked here
        if kwargs:
            raise ConfigError(f"options {sorted(kwargs)} are not supported for image folders")
        kind = _split_kind(split)
        ds = folder_dataset(_check_folder(root, name or "folder"), kind, val_fraction=val_fraction,
                            split_seed=split_seed, name=name or "folder")
    else:
        kind = _split_kind(split) if split.lower() in _TRAIN_SPLITS + _VAL_SPLITS else None
        timm_split = {"train": "train", "val": "validation"}.get(kind, split)
        try:
            ds = timm_create_dataset(name, root=root, split=timm_split, download=download, **kwargs)
        except RuntimeError as e:
            msg = str(e)
            if "Found 0" in msg:
                raise ConfigError(f"dataset {name or 'folder'!r} at {root!r} is empty: {msg}. Put images in class "
                                  "sub-folders (root/<class>/<image>.jpg)") from e
            if "not found" in msg.lower() or "download=True" in msg:
                raise ConfigError(f"dataset {name!r} is not in {root!r} ({msg}); download it there first or pass "
                                  "download=True (--download)") from e
            raise
        if len(ds) == 0:
            raise ConfigError(f"dataset {name or 'folder'!r} at {root!r} (split {split!r}) has no samples; check the "
                              "path")
        if type(ds) is ImageDataset:
            ds.__class__ = _CheckedImageDataset  # same object, a clearer error when images cannot be read
    ds.transform = create_transform(input_size=img_size, is_training=bool(augment and kind == "train"),
                                    mean=tuple(mean), std=tuple(std), crop_pct=1.0)
    return ds


def dataset_num_classes(dataset: Dataset) -> int:
    """Number of classes of a dataset made by :func:`create_dataset`.

    Raises:
        ConfigError: The count cannot be found; pass ``num_classes`` explicitly.

    Example:
        >>> dataset_num_classes(create_dataset("digits", split="val", img_size=8))
        10
    """
    ds = dataset
    while isinstance(ds, (IndexedDataset, Subset)):  # a training subset keeps its parent's classes
        ds = ds.dataset
    n = getattr(ds, "num_classes", None)
    if isinstance(n, int):
        return n
    reader = getattr(ds, "reader", None)
    class_to_idx = getattr(reader, "class_to_idx", None) or getattr(ds, "class_to_idx", None)
    if class_to_idx:
        return len(class_to_idx)
    classes = getattr(ds, "classes", None)
    if classes:
        return len(classes)
    raise ConfigError(f"cannot tell the number of classes of {type(ds).__name__}; pass num_classes explicitly")


def create_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    pin_memory: bool = False,
    min_last_batch: int | None = None,
    seed_per_sample: bool = False,
) -> DataLoader:
    """A ``DataLoader`` yielding ``(images, targets, indices)`` in an order fixed by ``(seed, epoch)``.

    Call ``loader.sampler.set_epoch(epoch)`` before each epoch. A training loader (``shuffle=True``) never yields a
    last batch of one sample (BatchNorm cannot train on it): that sample, a different one each epoch, is dropped.

    Args:
        dataset: A map-style dataset of ``(image, target)`` pairs.
        batch_size: Samples per batch (per process).
        shuffle: Reshuffle every epoch (deterministically, from ``seed``).
        num_replicas: Data-parallel world size (each ``rank`` gets a disjoint shard).
        min_last_batch: The smallest last batch to yield; None means 2 for a shuffled loader, else 1.
        seed_per_sample: Seed each sample's random transform from ``(seed, epoch, index)`` (see
            :class:`IndexedDataset`): the same augmentation with any ``num_workers`` and after a resume.

    Raises:
        ConfigError: Bad batch size, an empty dataset, or a training set of one sample per process.

    Example:
        >>> loader = create_loader(create_dataset("digits", split="val", img_size=8), batch_size=100)
        >>> len(loader)
        4
        >>> len(create_loader([(float(i), 0) for i in range(9)], batch_size=4, shuffle=True))  # no batch of one
        2
    """
    check_int("batch_size", batch_size, low=1)
    check_int("min_last_batch", min_last_batch, low=1, allow_none=True)
    if len(dataset) == 0:
        raise ConfigError("the dataset is empty; check the dataset name, root folder and split")
    smallest = min(batch_size, (2 if shuffle else 1) if min_last_batch is None else min_last_batch)
    sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, num_replicas=num_replicas, rank=rank,
                           batch_size=batch_size, min_last_batch=smallest)
    if len(sampler) == 0:
        raise ConfigError(
            f"the training set has {len(dataset)} sample(s), {sampler.per_replica} per process: a training batch "
            f"needs at least {smallest} (BatchNorm cannot train on one sample); add data or use fewer processes"
        )
    return DataLoader(
        IndexedDataset(dataset, seed=seed if seed_per_sample else None, sampler=sampler),
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        # a private generator: creating an iterator then draws no number from the global RNG, so a run resumed in
        # the middle of an epoch continues with the same RNG stream as an uninterrupted one
        generator=torch.Generator().manual_seed(seed),
    )
