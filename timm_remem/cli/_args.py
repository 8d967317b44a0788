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
import json
from collections.abc import Callable
from typing import Any

__all__ = ["json_dict", "comma_list"]


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
