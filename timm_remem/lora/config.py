"""The LoRA settings and their one check, shared by :func:`~timm_remem.lora.apply_lora` and the training config.

Importing this module never imports peft: the settings are checked with or without peft installed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .._validation import check_float, check_int
from ..errors import ConfigError

__all__ = ["LORA_TARGETS", "check_lora_settings"]

# The Linear layers of a transformer block that get adapters by default: attention in/out, MLP in/out (timm's
# ViT, DeiT, BEiT, EVA-02, Swin, ... all name them so).
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")
_TARGETS_HINT = "lora_targets must be a list of Linear-layer names such as ['qkv', 'fc1'], got "


def check_lora_settings(
    rank: Any, alpha: Any = None, dropout: Any = 0.0, targets: Any = None, *, allow_no_rank: bool = False
) -> tuple[int | None, float | None, float, list[str] | None]:
    """Check the LoRA settings; returns them normalised (``alpha`` and ``targets`` stay None when unset).

    Raises:
        ConfigError: Rank not a positive integer, alpha not > 0, dropout outside [0, 1), targets not a non-empty
            list of names, or (``allow_no_rank=False``) no rank.

    Example:
        >>> check_lora_settings(8, targets=["qkv", "fc1", "qkv"])
        (8, None, 0.0, ['qkv', 'fc1'])
    """
    rank = check_int("lora_rank", rank, low=1, allow_none=allow_no_rank, hint="LoRA ranks are typically 4 to 64")
    alpha = check_float("lora_alpha", alpha, low=0, low_open=True, allow_none=True,
                        hint="peft's default is 8; unset means alpha = rank")
    dropout = check_float("lora_dropout", dropout, low=0, high=1, high_open=True)
    if targets is not None:
        if isinstance(targets, (str, bytes)) or not isinstance(targets, Iterable):
            raise ConfigError(f"{_TARGETS_HINT}{targets!r}")
        targets = list(targets)
        bad = [t for t in targets if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ConfigError(f"{_TARGETS_HINT}{targets!r} (bad entries: {bad!r})")
        if not targets:
            raise ConfigError("lora_targets is empty; name at least one Linear layer (e.g. qkv) or leave it unset")
        targets = list(dict.fromkeys(t.strip() for t in targets))
    return rank, alpha, dropout, targets
