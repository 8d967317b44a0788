"""Plumbing shared by the analyses that run a model over a loader: batches, progress, input device, sample cap."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .._models import model_device
from .._validation import check_int
from ..errors import ConfigError


class _Renormalised(nn.Module):
    """``model`` fed inputs normalised with ``(src_mean, src_std)`` re-normalised to its own ``(mean, std)``.

    Exposes ``forward_features``/``forward_head`` when the model has them, for penultimate features.
    """

    def __init__(self, model: nn.Module, src_mean, src_std, mean, std) -> None:
        super().__init__()
        self.model = model
        shape = (1, -1, 1, 1)
        self.register_buffer("scale", (torch.tensor(src_std, dtype=torch.float32) /
                                       torch.tensor(std, dtype=torch.float32)).view(shape), persistent=False)
        self.register_buffer("shift", ((torch.tensor(src_mean, dtype=torch.float32) - torch.tensor(
            mean, dtype=torch.float32)) / torch.tensor(std, dtype=torch.float32)).view(shape), persistent=False)
        self.num_classes = getattr(model, "num_classes", None)
        if callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None)):
            self.forward_features = lambda x: model.forward_features(self._renorm(x))
            self.forward_head = model.forward_head

    def _renorm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.scale.shape[1]:
            raise ConfigError(f"cannot re-normalise inputs of shape {tuple(x.shape)} with a "
                              f"{self.scale.shape[1]}-channel mean/std; pass image batches [B, C, H, W]")
        return x * self.scale.to(x.device, x.dtype) + self.shift.to(x.device, x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self._renorm(x))


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(images, labels or None)`` from a loader batch: a tensor, ``(images, labels, ...)`` or a dict."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        img = next((batch[k] for k in ("image", "images", "input", "inputs", "pixel_values") if k in batch), None)
        lab = next((batch[k] for k in ("label", "labels", "target", "targets") if k in batch), None)
        if isinstance(img, torch.Tensor):
            return img, lab if isinstance(lab, torch.Tensor) else None
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        lab = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], lab
    raise ConfigError(
        f"cannot read images from a loader batch of type {type(batch).__name__}; yield a tensor of images, a tuple "
        "(images, labels, ...) or a dict with 'image' and 'label' keys."
    )


def _hard_labels(labels: torch.Tensor) -> torch.Tensor:
    """Class indices from labels: soft / one-hot ``[B, classes]`` float targets become their argmax."""
    return labels.argmax(-1) if labels.dim() == 2 and labels.is_floating_point() else labels


def _input_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """``device`` if given, else the device of the model's parameters."""
    return torch.device(device) if device is not None else model_device(model)


def _progress(iterable: Iterable[Any], progress: bool | None, desc: str) -> Iterable[Any]:
    """A tqdm bar when ``progress`` is True or, when None, on an interactive terminal."""
    show = progress if progress is not None else sys.stderr.isatty()
    return tqdm(iterable, desc=desc, leave=False) if show else iterable


def _check_max_samples(max_samples: int | None) -> int | None:
    return check_int("max_samples", max_samples, low=1, allow_none=True, hint="None uses every sample")
