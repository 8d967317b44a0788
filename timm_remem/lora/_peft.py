"""peft, imported only when a LoRA call is made (the optional extra ``timm-remem[lora]``)."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import ConfigError

__all__ = ["PeftMissingError", "import_peft"]

INSTALL = "pip install timm-remem[lora]"


class PeftMissingError(ConfigError, ImportError):
    """peft is not installed (an ``ImportError`` and a ``ConfigError``: the CLI prints it as one line)."""


def import_peft() -> ModuleType:
    """The ``peft`` module, or :class:`PeftMissingError` naming the extra to install."""
    try:
        return importlib.import_module("peft")
    except ImportError as e:
        raise PeftMissingError(
            f"LoRA fine-tuning (lora_rank / --lora-rank) needs peft, which is not installed: {INSTALL}"
        ) from e
