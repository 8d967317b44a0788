"""What every file of the hub room shares: the file names of a teacher folder, the paper, and the name checks.

Example:
    >>> from timm_remem.hub._common import CONFIG_NAME, WEIGHTS_NAME, check_repo_id
    >>> CONFIG_NAME, WEIGHTS_NAME
    ('config.json', 'model.safetensors')
    >>> check_repo_id("alice/vit-remem")
    >>> check_repo_id("vit-remem")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    timm_remem.errors.ConfigError: repo_id must be 'namespace/name' (your user or organisation, ...), got 'vit-remem'.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from ..errors import ConfigError, UnsupportedModelError

__all__ = ["WEIGHTS_NAME", "CONFIG_NAME", "CARD_NAME", "REMEM_NAME", "PAPER_TITLE", "PAPER_ARXIV", "CARD_TAGS",
           "check_repo_id", "check_timm_model"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
REMEM_NAME = "remem.json"  # the factors of a reweighted LoRA teacher published as an adapter alone
PAPER_TITLE = (
    "ReMem: Mutual Information-Aware Fine-tuning of Pretrained Vision Transformers for Effective Knowledge Distillation"
)
PAPER_ARXIV = "2506.23041"
CARD_TAGS = ("remem", "knowledge-distillation", "image-classification", "timm")

_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def check_repo_id(repo_id: Any) -> None:
    """Raise :class:`~timm_remem.errors.ConfigError` unless ``repo_id`` is a Hub id ``"namespace/name"``."""
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id:
        raise ConfigError(
            f"repo_id must be 'namespace/name' (your user or organisation, then the model name, letters, digits, "
            f"'-', '_' and '.'), got {repo_id!r}."
        )


def check_timm_model(model: Any) -> None:
    """Raise :class:`~timm_remem.errors.UnsupportedModelError` unless ``model`` was built by timm."""
    if not isinstance(model, nn.Module) or not isinstance(getattr(model, "pretrained_cfg", None), Mapping):
        raise UnsupportedModelError(
            f"expected a timm model (built by timm.create_model, which sets .pretrained_cfg), got "
            f"{type(model).__name__}: only timm models can be saved in timm's Hub format."
        )
