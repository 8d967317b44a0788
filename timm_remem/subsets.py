"""Seeded training subsets: few labels per class and long-tailed profiles (:func:`training_subset`).

``per_class=N`` keeps ``N`` images of every class; ``imbalance=r`` keeps ``floor(n * r ** (-c / (C - 1)))``
images (at least one) of class ``c`` of ``C``, ``n`` being ``per_class`` or else the smallest class's size (the
CIFAR-LT profile). The choice depends only on the labels and ``seed``, and a larger ``N`` keeps every image of a
smaller one.

Example:
    >>> from timm_remem.data import create_dataset
    >>> train = create_dataset("digits", split="train", img_size=8)
    >>> few = training_subset(train, per_class=5, seed=0)
    >>> len(few), sorted(set(dataset_targets(few)))[:3]
    (50, [0, 1, 2])
    >>> tail = training_subset(train, per_class=20, imbalance=10, seed=0)
    >>> [dataset_targets(tail).count(c) for c in (0, 9)]
    [20, 2]
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset, Subset

from ._validation import check_float, check_int
from .errors import ConfigError

__all__ = ["dataset_targets", "training_subset", "subset_counts"]

_logger = logging.getLogger(__name__)


def dataset_targets(dataset: Dataset) -> list[int]:
    """The integer class label of every sample, read without loading images where the dataset allows it.

    Raises:
        ConfigError: A label is not an integer class index.

    Example:
        >>> dataset_targets([(0.0, 1), (1.0, 0)])
        [1, 0]
    """
    if isinstance(dataset, Subset):
        parent = dataset_targets(dataset.dataset)
        return [parent[int(i)] for i in dataset.indices]
    found = getattr(dataset, "targets", None)
    if isinstance(found, torch.Tensor) and found.dim() != 1:
        found = None  # e.g. QMNIST's [N, 8] targets: the label a sample yields is what counts
    if found is None:
        samples = getattr(getattr(dataset, "reader", None), "samples", None)
        if isinstance(samples, Sequence) and samples and isinstance(samples[0], (tuple, list)):
            found = [s[1] for s in samples]
    if found is None:
        _logger.info("reading the labels of %d samples one by one (the dataset exposes no targets)", len(dataset))
        found = [dataset[i][1] for i in range(len(dataset))]
    if isinstance(found, torch.Tensor):
        found = found.tolist()
    labels = []
    for t in found:
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            t = t.item()
        try:
            if isinstance(t, bool):
                raise TypeError
            labels.append(operator.index(t))
        except TypeError:
            raise ConfigError(f"training subsets need integer class labels; {type(dataset).__name__} has a label "
                              f"{t!r}. Use a classification dataset or leave train_per_class/train_imbalance "
                              "unset") from None
    return labels


def subset_counts(counts: Sequence[int], *, per_class: int | None = None, imbalance: float | None = None,
                  option: str = "train_per_class") -> list[int]:
    """How many images of each class a subset keeps, given the class sizes ``counts`` (see the module docstring).

    Raises:
        ConfigError: Bad ``per_class``/``imbalance``, or a class with fewer images than ``per_class``.

    Example:
        >>> subset_counts([50, 40, 30], imbalance=4)
        [30, 15, 7]
    """
    check_int(option, per_class, low=1, allow_none=True)
    check_float("train_imbalance", imbalance, low=1, allow_none=True,
                hint="the ratio of the largest class to the smallest, e.g. 10 or 100")
    present = [c for c, n in enumerate(counts) if n > 0]
    if per_class is not None:
        short = {c: counts[c] for c in present if counts[c] < per_class}
        if short:
            shown = ", ".join(f"class {c}: {n}" for c, n in list(short.items())[:5])
            raise ConfigError(f"{option}={per_class} exceeds the training images of {len(short)} class(es) "
                              f"({shown}); use {option} <= {min(counts[c] for c in present)}")
    base = per_class if per_class is not None else min(counts[c] for c in present)
    if imbalance is None or len(present) < 2:
        return [base if n > 0 else 0 for n in counts]
    keep = [0] * len(counts)
    last = len(present) - 1
    for rank, c in enumerate(present):
        # the small epsilon keeps exact products (e.g. 100 * 10**-1 = 10) from flooring one below
        keep[c] = max(1, math.floor(base * float(imbalance) ** (-rank / last) + 1e-9))
    return keep


def training_subset(dataset: Dataset, *, per_class: int | None = None, imbalance: float | None = None,
                    seed: int = 0, option: str = "train_per_class") -> Dataset:
    """A seeded subset of a training set with ``per_class`` images per class and/or a long-tailed ``imbalance``.

    Returns ``dataset`` itself when both are None.

    Args:
        dataset: A map-style dataset of ``(image, label)`` pairs with integer labels.
        per_class: Images kept per class (every class must have that many).
        imbalance: Ratio (>= 1) of the most frequent class's kept images to the rarest's.
        seed: Seed of the choice of images (independent of the training seed).
        option: The setting's name in error messages (``"labels_per_class"`` for semi-supervised runs).

    Raises:
        ConfigError: Bad settings, non-integer labels, or a class smaller than ``per_class``.

    Example:
        >>> ds = [(float(i), i % 2) for i in range(10)]
        >>> sub = training_subset(ds, per_class=2, seed=0)
        >>> len(sub), sorted(dataset_targets(sub))
        (4, [0, 0, 1, 1])
    """
    check_int("subset_seed", seed)
    if per_class is None and imbalance is None:
        return dataset
    labels = dataset_targets(dataset)
    if not labels:
        raise ConfigError("the training set is empty; a subset of it cannot be taken")
    if min(labels) < 0:
        raise ConfigError(f"training subsets need class indices >= 0, found label {min(labels)}")
    by_class: list[list[int]] = [[] for _ in range(max(labels) + 1)]
    for i, y in enumerate(labels):
        by_class[y].append(i)
    keep = subset_counts([len(ix) for ix in by_class], per_class=per_class, imbalance=imbalance, option=option)
    chosen: list[int] = []
    for c, ix in enumerate(by_class):
        if not ix:
            continue
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + c)  # one stream per class: prefixes nest
        order = torch.randperm(len(ix), generator=g).tolist()
        chosen.extend(ix[j] for j in order[:keep[c]])
    chosen.sort()
    _logger.info("training subset: %d of %d images (%s per class, seed %d)", len(chosen), len(labels),
                 "/".join(str(k) for k in keep if k) if imbalance is not None else keep[labels[0]], seed)
    return Subset(dataset, chosen)
