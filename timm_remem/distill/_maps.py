"""Block outputs (NCHW maps) from ``forward_intermediates`` and the resizing that pairs two of them (private)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import unwrap_model

from ..errors import UnsupportedModelError

__all__ = ["match_spatial", "pool_channels", "standardize_channels", "forward_with_intermediates"]


def match_spatial(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize an NCHW map to ``size``: average pooling when shrinking both sides, bilinear otherwise."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if h >= size[0] and w >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def pool_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Average-pool the channel axis of an NCHW map to ``channels`` (adaptive bins, like adaptive_avg_pool1d)."""
    if x.shape[1] == channels:
        return x
    return F.adaptive_avg_pool3d(x.unsqueeze(1), (channels, x.shape[2], x.shape[3])).squeeze(1)


def standardize_channels(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-channel standardisation over (B, H, W) with batch statistics (BatchNorm without affine/running stats)."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def forward_with_intermediates(
    model: nn.Module, x: torch.Tensor, indices: Sequence[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and NCHW block outputs at ``indices`` (non-negative) from one ``forward_intermediates`` pass."""
    inner = unwrap_model(model)
    unique = sorted(set(indices))
    kwargs: dict[str, Any] = {"indices": unique, "intermediates_only": False}
    if "output_fmt" in inspect.signature(inner.forward_intermediates).parameters:
        kwargs["output_fmt"] = "NCHW"
    final, intermediates = model.forward_intermediates(x, **kwargs)
    logits = model.forward_head(final)
    if len(intermediates) != len(unique):
        raise UnsupportedModelError(
            f"{type(inner).__name__}.forward_intermediates returned {len(intermediates)} maps for indices {unique}."
        )
    by_index = dict(zip(unique, intermediates, strict=True))
    feats = [by_index[i] for i in indices]
    for i, f in zip(indices, feats, strict=True):
        if f.ndim != 4:
            raise UnsupportedModelError(
                f"{type(inner).__name__} block {i} output has shape {tuple(f.shape)}, not NCHW; feature distillation "
                "needs spatial maps (ViTs with patch tokens and CNNs qualify)."
            )
    return logits, feats
