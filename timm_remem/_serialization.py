"""Dataclass helpers shared by every config and result: sorted JSON-ready dicts, loading that drops unknown keys
with a warning, and ``documented``, which writes a config's ``Attributes:`` section from its fields' help.
"""

from __future__ import annotations

import dataclasses
import textwrap
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from ._version import __version__

__all__ = ["dataclass_to_dict", "dataclass_from_dict", "known_fields", "documented"]

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


def documented(cls: type[T]) -> type[T]:
    """Append to a dataclass's docstring an ``Attributes:`` section of its own fields, from ``metadata["help"]``.

    Example:
        >>> @documented
        ... @dataclasses.dataclass
        ... class Cfg:
        ...     \"\"\"Settings.\"\"\"
        ...     lr: float = dataclasses.field(default=0.1, metadata={"help": "peak learning rate"})
        >>> print(Cfg.__doc__.rstrip())
        Settings.
        <BLANKLINE>
            Attributes:
                lr: peak learning rate.
    """
    own = cls.__dict__.get("__annotations__", {})
    lines = ["", "    Attributes:"]
    for field in dataclasses.fields(cls):
        if field.name not in own:
            continue
        text = " ".join(str(field.metadata.get("help", "")).split())
        text = text.rstrip(".") + "." if text else ""  # as written: "timm.create_model ..." keeps its case
        lines.extend(textwrap.wrap(f"{field.name}: {text}", width=116, initial_indent=" " * 8,
                                   subsequent_indent=" " * 12, break_on_hyphens=False))
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n" + "\n".join(lines) + "\n"
    return cls

