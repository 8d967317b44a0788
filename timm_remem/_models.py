"""What every room needs to know about a timm model: how to create one with clear errors, its input size and
preprocessing.

Example:
    >>> from timm_remem._models import create_timm_model, model_input_size
    >>> model = create_timm_model("test_vit", pretrained=False, img_size=32, num_classes=5)
    >>> model_input_size(model)
    (3, 32, 32)
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import timm
import timm.models
import torch
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
from timm.data import resolve_model_data_config
from timm.utils import unwrap_model
from torch import nn

from .errors import ConfigError, HubError

__all__ = ["create_timm_model", "model_input_size", "model_input_config", "fixed_img_size", "data_config",
           "model_device", "SOURCE_PREFIXES"]


SOURCE_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


def create_timm_model(
    name: str, *, pretrained: bool, num_classes: int | None = None, img_size: int | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """``timm.create_model`` with clear errors; ``num_classes=None`` keeps the model's own head, and ``img_size`` is
    passed only to models that take it (CNNs accept any size).

    Raises:
        ConfigError: ``name`` is not a timm model (checked with ``timm.is_model``), or timm rejects an argument.
    """
    if not isinstance(name, str) or not name:
        raise ConfigError(f"model must be a timm model name such as 'vit_tiny_patch16_224', got {name!r}")
    if not name.startswith(SOURCE_PREFIXES) and not timm.is_model(name):
        raise ConfigError(
            f"unknown timm model {name!r}; list names with timm.list_models('*vit*') (or use "
            "'hf-hub:org/name' or 'local-dir:/path')"
        )
    args = dict(kwargs or {})
    if num_classes is not None:
        args.setdefault("num_classes", num_classes)
    attempts = [args]
    if img_size is not None and "img_size" not in args:
        attempts.insert(0, {**args, "img_size": img_size})
    for i, attempt in enumerate(attempts):
        try:
            return timm.create_model(name, pretrained=pretrained, **attempt)
        except TypeError as e:
            if i + 1 < len(attempts) and "img_size" in str(e):
                continue  # a model without an img_size argument (a CNN): it takes any input size
            raise ConfigError(f"timm.create_model({name!r}, **{attempt!r}) rejected an argument: {e}") from e
        except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise HubError(
                f"the pretrained weights of {name!r} could not be had ({type(e).__name__}: {reason}). Fetch them "
                "once with network access (they stay in the Hugging Face cache, HF_HOME), point at a local copy "
                "with 'local-dir:/path', or start from random weights (pretrained=False: leave out --pretrained; "
                "for a teacher --no-teacher-pretrained)"
            ) from e
    raise AssertionError("unreachable")  # pragma: no cover


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model with neither)."""
    t = next(itertools.chain(model.parameters(), model.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def _cfg(model: nn.Module) -> Any:
    return getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}


def _cfg_input_size(cfg: Any) -> Any:
    return cfg.get("input_size") if isinstance(cfg, dict) else getattr(cfg, "input_size", None)


def _first_conv_chans(module: nn.Module) -> int | None:
    conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else None


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """Best guess of a model's input ``(C, H, W)``: its patch embedding's image size, else its pretrained cfg."""
    model = unwrap_model(model)
    size = _cfg_input_size(_cfg(model))
    chans = getattr(model, "in_chans", None)
    chans = chans if isinstance(chans, int) and not isinstance(chans, bool) else None
    for mod in model.modules():
        img = getattr(mod, "img_size", None)
        if isinstance(img, int) and not isinstance(img, bool):
            img = (img, img)
        if isinstance(img, (tuple, list)) and len(img) == 2 and all(isinstance(v, int) for v in img):
            chans = chans if chans is not None else _first_conv_chans(mod)
            return (chans or (int(size[0]) if size else 3), int(img[0]), int(img[1]))
    chans = chans if chans is not None else _first_conv_chans(model)
    if size:
        return (chans or int(size[0]), int(size[1]), int(size[2]))
    return (chans or 3, 224, 224)


def model_input_config(model: nn.Module) -> tuple[int, int, int]:
    """The model's current input ``(C, H, W)`` as timm reports it (``timm.models.get_model_input_config``)."""
    return tuple(int(v) for v in timm.models.get_model_input_config(unwrap_model(model))["input_size"])


def fixed_img_size(model: nn.Module) -> tuple[int, int] | None:
    """The input size a model insists on (ViT-style strict patch embedding), or ``None`` if any size works."""
    pe = getattr(unwrap_model(model), "patch_embed", None)
    if pe is None or getattr(model, "dynamic_img_size", False) or getattr(pe, "dynamic_img_size", False):
        return None
    if getattr(pe, "strict_img_size", False) and getattr(pe, "img_size", None) is not None:
        return tuple(int(v) for v in pe.img_size)
    return None


def data_config(model: nn.Module) -> dict[str, Any]:
    """timm's resolved data config (input size, mean, std, interpolation, crop) of the unwrapped model."""
    return resolve_model_data_config(unwrap_model(model))
