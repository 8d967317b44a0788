"""One tested way to check the numbers, flags and choices that reach public functions and configs.

Every checker raises :class:`~timm_remem.errors.ConfigError` naming the value and what was expected, and returns the
value normalised. ``bool`` is never accepted as a number.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import sys
import types
import typing
from collections.abc import Iterable
from typing import Any

from .errors import ConfigError

__all__ = ["check_int", "check_float", "check_bool", "check_choice", "check_class_count", "describe_range",
           "check_fields", "paths_as_strings", "matches_type", "describe_type", "type_options"]


def describe_range(kind: str, low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """Words for what a checker expects, e.g. ``"a positive integer"``, ``"a finite number in [0, 1)"``."""
    if kind == "integer" and low == 1 and high is None and not low_open:
        return "a positive integer"
    article = "an" if kind == "integer" else "a"
    if low is not None and high is not None:
        left, right = ("(" if low_open else "["), (")" if high_open else "]")
        return f"{article} {kind} in {left}{low:g}, {high:g}{right}"
    if low is not None:
        return f"{article} {kind} {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{article} {kind} {'<' if high_open else '<='} {high:g}"
    return f"{article} {kind}"


def _fail(name: str, expected: str, value: Any, hint: str) -> ConfigError:
    return ConfigError(f"{name} must be {expected}, got {value!r}{'; ' + hint if hint else ''}")


def _in_range(v: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    if low is not None and (v <= low if low_open else v < low):
        return False
    return not (high is not None and (v >= high if high_open else v > high))


def _check_number(name: str, value: Any, kind: type, words: str, low: Any, high: Any, low_open: bool,
                  high_open: bool, allow_none: bool, hint: str) -> Any:
    if value is None and allow_none:
        return None
    if not isinstance(value, bool) and isinstance(value, kind):
        v = int(value) if kind is numbers.Integral else float(value)
        if (kind is numbers.Integral or math.isfinite(v)) and _in_range(v, low, high, low_open, high_open):
            return v
    expected = describe_range(words, low, high, low_open, high_open) + (" or None" if allow_none else "")
    raise _fail(name, expected, value, hint)


def check_int(
    name: str, value: Any, *, low: int | None = None, high: int | None = None, allow_none: bool = False,
    hint: str = "",
) -> int | None:
    """Check an integer (``bool`` refused) in ``[low, high]``; ``None`` passes through when ``allow_none``."""
    return _check_number(name, value, numbers.Integral, "integer", low, high, False, False, allow_none, hint)


def check_float(
    name: str, value: Any, *, low: float | None = None, high: float | None = None, low_open: bool = False,
    high_open: bool = False, allow_none: bool = False, hint: str = "",
) -> float | None:
    """Check a finite real number (``bool`` refused) in the given range; open ends with ``low_open``/``high_open``."""
    return _check_number(name, value, numbers.Real, "finite number", low, high, low_open, high_open, allow_none,
                         hint)


def check_bool(name: str, value: Any, *, hint: str = "") -> bool:
    """Check a real ``bool`` (``0``/``1``/strings refused, so a typo cannot silently mean True)."""
    if not isinstance(value, bool):
        raise _fail(name, "True or False", value, hint)
    return value


def check_choice(name: str, value: Any, choices: Iterable[str], *, hint: str = "") -> str:
    """Check that ``value`` is one of ``choices`` (exact match)."""
    options = tuple(choices)
    if not isinstance(value, str) or value not in options:
        raise _fail(name, "one of " + ", ".join(repr(c) for c in options), value, hint)
    return value


def check_class_count(
    teacher_classes: Any, other_classes: Any, *, teacher: str = "teacher", other: str = "student", fix: str = "",
    template: str = "",
) -> None:
    """The one teacher/student (or teacher/dataset) class-count check; ``None`` on either side is not checked.

    ``template`` rewords the message (fields ``{teacher}``, ``{other}``, ``{teacher_classes}``, ``{other_classes}``,
    ``{fix}``).

    Example:
        >>> check_class_count(10, 5, template="{teacher} num_classes={teacher_classes} differs; {fix}", fix="retrain")
        Traceback (most recent call last):
        ...
        timm_remem.errors.ConfigError: teacher num_classes=10 differs; retrain
    """
    if teacher_classes is None or other_classes is None or int(teacher_classes) == int(other_classes):
        return
    fix = fix or (
        f"distillation needs the same label space: create the {other.split()[0]} with num_classes equal to the "
        "teacher's, or fine-tune the teacher on this dataset first (timm-remem finetune)"
    )
    template = template or "{teacher} has {teacher_classes} classes but {other} has {other_classes}; {fix}"
    raise ConfigError(template.format(teacher=teacher, other=other, teacher_classes=int(teacher_classes),
                                      other_classes=int(other_classes), fix=fix))


# ------------------------------------------------------------------ the declared types of config fields

def type_options(hint: Any) -> list[Any]:
    """The alternatives of a union annotation (``int | None`` -> ``[int, NoneType]``), else ``[hint]``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return list(typing.get_args(hint))
    return [hint]


def matches_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type (``bool`` is no ``int``; an ``int`` is a ``float``)."""
    for option in type_options(hint):
        origin = typing.get_origin(option) or option
        if option is type(None):
            ok = value is None
        elif option is bool:
            ok = isinstance(value, bool)
        elif option is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif option is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif origin is list:  # a tuple too: what Python callers pass for a list setting
            args = typing.get_args(option)
            ok = isinstance(value, (list, tuple)) and (not args or all(matches_type(v, args[0]) for v in value))
        elif isinstance(origin, type):
            ok = isinstance(value, origin)
        else:  # pragma: no cover - an annotation without a rule: the config class checks it
            ok = True
        if ok:
            return True
    return False


def describe_type(hint: Any) -> str:
    """Words for an annotation in messages: ``int | None`` -> ``"an integer or null"``."""
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
             type(None): "null"}
    parts = []
    for option in type_options(hint):
        if typing.get_origin(option) is list:
            inner = typing.get_args(option)[0] if typing.get_args(option) else None
            parts.append("a list" + (f" of {words[inner].removeprefix('an ').removeprefix('a ')}s" if inner in
                                     (int, float, str) else ""))
        else:
            parts.append(words.get(typing.get_origin(option) or option, str(option)))
    return " or ".join(parts)


def check_fields(config: Any) -> None:
    """Check every field of a config dataclass against its annotation (:func:`matches_type`; ints fit a C long).

    Ranges and choices stay with each config's own checks.

    Example:
        >>> import dataclasses
        >>> @dataclasses.dataclass
        ... class C:
        ...     ema: bool = False
        >>> check_fields(C(ema="false"))
        Traceback (most recent call last):
        ...
        timm_remem.errors.ConfigError: ema must be true or false, got 'false'
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        if not matches_type(value, hint):
            raise ConfigError(f"{f.name} must be {describe_type(hint)}, got {value!r}")
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, int) and not isinstance(item, bool) and abs(item) > sys.maxsize:
                digits = int(item.bit_length() * math.log10(2)) + 1  # str() of a huge int raises itself
                raise ConfigError(f"{f.name} is out of range: an integer of about {digits} digits (at most "
                                  f"{sys.maxsize})")


def paths_as_strings(config: Any) -> None:
    """Turn ``os.PathLike`` values of string fields into strings, in place (settings are recorded as JSON).

    Example:
        >>> import dataclasses, pathlib
        >>> @dataclasses.dataclass
        ... class C:
        ...     output: str = "runs"
        >>> c = C(output=pathlib.Path("runs/a"))
        >>> paths_as_strings(c); c.output
        'runs/a'
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, os.PathLike) and str in type_options(hints[f.name]):
            setattr(config, f.name, os.fspath(value))
