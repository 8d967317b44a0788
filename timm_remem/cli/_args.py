"""Argument types shared by every sub-command (one ``--model-kwargs`` parser for all of them).

Example:
    >>> from timm_remem.cli._args import json_dict
    >>> json_dict("--model-kwargs")('{"depth": 6}')
    {'depth': 6}
    >>> comma_list("--lora-targets")("qkv, fc1,")
    ['qkv', 'fc1']
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["json_dict", "comma_list", "deferred_module"]


def json_dict(flag: str) -> Callable[[str], dict[str, Any]]:
    """An argparse ``type`` that parses a JSON object, with an error naming ``flag`` and an example."""

    def parse(text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"{flag} is not valid JSON ({e}): pass e.g. '{{\"depth\": 6}}'") from e
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{flag} must be a JSON object such as '{{\"depth\": 6}}', got {text!r}")
        return value

    parse.__name__ = "JSON object"  # argparse names the type in its error message
    return parse


def comma_list(flag: str) -> Callable[[str], list[str]]:
    """An argparse ``type`` for ``a,b,c`` (spaces and empty items dropped), with an error naming ``flag``."""

    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{flag} needs at least one name, e.g. {flag} qkv,proj,fc1,fc2")
        return items

    parse.__name__ = "comma-separated list"
    return parse


class _DeferredModule:
    """Stands for a module that is imported on the first attribute access (see :func:`deferred_module`)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<deferred module {self._name!r}>"


def deferred_module(name: str) -> Any:
    """Module ``name``, imported on its first attribute access (every access reads the real module).

    The command modules hold their torch-heavy bodies this way, so that ``timm-remem --help`` and argument errors
    answer without importing torch or timm; the body loads when a command runs. (Not a ``LazyLoader`` module in
    ``sys.modules``: tools that walk ``sys.modules``, such as ``inspect.getmodule``, would trigger it mid-import.)

    Example:
        >>> runtime = deferred_module("timm_remem.cli._runtime")
        >>> callable(runtime.run_on_ranks)
        True
    """
    return sys.modules.get(name) or _DeferredModule(name)
