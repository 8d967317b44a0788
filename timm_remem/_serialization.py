"""Dataclass (de)serialisation shared by every config and result: sorted JSON-ready dicts stamped with the version,
and loading that drops unknown keys with a warning (a newer timm-remem may have written them).

Example:
    >>> from dataclasses import dataclass
    >>> from timm_remem._serialization import dataclass_from_dict, dataclass_to_dict
    >>> @dataclass
    ... class Cfg:
    ...     b: int = 1
    ...     a: str = "x"
    >>> dataclass_to_dict(Cfg())
    {'a': 'x', 'b': 1}
    >>> dataclass_from_dict(Cfg, {"a": "y", "version": "0.1.0"}, ignore=("version",))
    Cfg(b=1, a='y')
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from ._version import __version__

__all__ = ["dataclass_to_dict", "dataclass_from_dict", "known_fields"]

T = TypeVar("T")


def known_fields(cls: type) -> set[str]:
    """Names of the init fields of dataclass ``cls``."""
    return {f.name for f in dataclasses.fields(cls) if f.init}


def dataclass_to_dict(obj: Any, *, stamp_version: bool = False) -> dict[str, Any]:
    """``dataclasses.asdict(obj)`` with sorted keys; ``stamp_version`` adds ``"version"``."""
    data = dataclasses.asdict(obj)
    if stamp_version:
        data["version"] = __version__
    return dict(sorted(data.items()))


def dataclass_from_dict(cls: type[T], data: Mapping[str, Any], *, ignore: Iterable[str] = (), stacklevel: int = 3) -> T:
    """Build ``cls`` from ``data``; keys that are not fields (other than ``ignore``) are dropped with a warning."""
    known = known_fields(cls)
    unknown = sorted(set(data) - known - set(ignore))
    if unknown:
        warnings.warn(f"{cls.__name__}: ignoring unknown keys {unknown}", stacklevel=stacklevel)
    return cls(**{k: v for k, v in data.items() if k in known})
