"""What every file of the hub room shares: the file names of a teacher folder, the paper, and the name checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn

from ..errors import ConfigError, UnsupportedModelError

__all__ = ["WEIGHTS_NAME", "CONFIG_NAME", "CARD_NAME", "REMEM_NAME", "PAPER_TITLE", "PAPER_ARXIV", "CARD_TAGS",
           "REVISION_MAX_LENGTH", "check_repo_id", "check_revision", "check_timm_model"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
REMEM_NAME = "remem.json"  # the factors of a reweighted LoRA teacher published as an adapter alone
PAPER_TITLE = (
    "ReMem: Mutual Information-Aware Fine-tuning of Pretrained Vision Transformers for Effective Knowledge Distillation"
)
PAPER_ARXIV = "2506.23041"
CARD_TAGS = ("remem", "knowledge-distillation", "image-classification", "timm")

# A revision becomes a path in the Hub cache (refs/<revision>): at most one file name's length, and only the
# characters of branch and tag names (git's rules, narrowed), so that it cannot lead anywhere else.
REVISION_MAX_LENGTH = 255
_REVISION_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-/+")


def check_repo_id(repo_id: Any) -> None:
    """Raise :class:`~timm_remem.errors.ConfigError` unless ``repo_id`` is a Hub id ``"namespace/name"``.

    The name rules are huggingface_hub's own (``validate_repo_id``); the namespace is required here.

    Example:
        >>> check_repo_id("alice/vit-remem")
        >>> check_repo_id("vit-remem")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        timm_remem.errors.ConfigError: repo_id must be 'namespace/name' (...), got 'vit-remem'.
    """
    try:
        if not isinstance(repo_id, str) or repo_id.count("/") != 1:
            raise HFValidationError("not namespace/name")
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError(
            f"repo_id must be 'namespace/name' (your user or organisation, then the model name, letters, digits, "
            f"'-', '_' and '.'), got {repo_id!r}."
        ) from None


def _revision_problem(revision: str) -> str | None:
    """What is wrong with ``revision`` as a branch, tag or commit id, in words, or ``None``."""
    if not revision:
        return "is empty"
    if len(revision) > REVISION_MAX_LENGTH:
        return f"is {len(revision)} characters long (at most {REVISION_MAX_LENGTH})"
    control = next((c for c in revision if ord(c) < 32 or ord(c) == 127), None)
    if control is not None:
        return f"contains the control character {control!r}"
    if "\\" in revision:
        return "contains a backslash"
    if revision.startswith("/"):
        return "is an absolute path"
    if ".." in revision:
        return "contains '..'"
    other = next((c for c in revision if c not in _REVISION_CHARACTERS), None)
    if other is not None:
        return f"contains {other!r} (letters, digits, '.', '_', '-', '+' and '/' only)"
    part = next((p for p in revision.split("/") if not p or p.startswith(".") or p.endswith(".lock")), None)
    if part is not None:
        return "has an empty part ('//' or a '/' at the end)" if not part else \
            f"has a part {part!r} (no part starts with '.' or ends with '.lock')"
    return None


def check_revision(revision: Any, name: str = "revision") -> None:
    """Raise :class:`~timm_remem.errors.ConfigError` unless ``revision`` is a branch, tag or commit id (the rules:
    docs/hub.md). huggingface_hub writes it into the cache as a path (``refs/<revision>``) without checking it.

    Example:
        >>> check_revision("refs/pr/1")
        >>> check_revision("../../x")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        timm_remem.errors.ConfigError: revision must be ... got '../../x': it contains '..'. ...
    """
    problem = f"is not a string but {type(revision).__name__}" if not isinstance(revision, str) \
        else _revision_problem(revision)
    if problem is not None:
        shown = f"{revision[:40]!r}... ({len(revision)} characters)" \
            if isinstance(revision, str) and len(revision) > 80 else repr(revision)
        raise ConfigError(
            f"{name} must be a branch, tag or commit id ('main', 'v1.0', 'refs/pr/1' or a 40-character commit "
            f"hash), got {shown}: it {problem}. Give the name the Hub lists for the repository "
            "(huggingface_hub.HfApi().list_repo_refs), or leave it out for 'main'."
        )


def check_timm_model(model: Any) -> None:
    """Raise :class:`~timm_remem.errors.UnsupportedModelError` unless ``model`` was built by timm."""
    if not isinstance(model, nn.Module) or not isinstance(getattr(model, "pretrained_cfg", None), Mapping):
        raise UnsupportedModelError(
            f"expected a timm model (built by timm.create_model, which sets .pretrained_cfg), got "
            f"{type(model).__name__}: only timm models can be saved in timm's Hub format."
        )
