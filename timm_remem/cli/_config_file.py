"""``--config FILE``: training settings from a YAML or JSON file, read the way timm's ``train.py --config`` does.

Keys are config field names; a run's own ``OUTPUT/config.json`` is such a file (its ``version`` key is ignored).
Flags given on the command line override the file. A string where the flag takes a number, a JSON object, a list
or a word is read as the flag reads it (``lr: 1e-3``, ``cache_teacher: auto``). The file is untrusted: its size,
nesting and YAML aliases are bounded and values quoted in errors are cut short.

Example:
    >>> import json, pathlib, tempfile
    >>> from timm_remem.train.config import FinetuneConfig
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "run.json"
    >>> _ = path.write_text(json.dumps({"model": "test_vit", "lr": "1e-3", "save_at": [2], "version": "0.1.0"}))
    >>> file_options(str(path), FinetuneConfig)
    {'model': 'test_vit', 'lr': 0.001, 'save_at': [2]}
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import reprlib
import stat
import typing
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from .._validation import describe_type, matches_type, type_options
from ..errors import ConfigError

__all__ = ["read_config_file", "file_options", "IGNORED_KEYS", "YamlMissingError", "MAX_BYTES", "MAX_DEPTH",
           "MAX_ALIASES"]

# Keys a run's config.json carries that are no setting.
IGNORED_KEYS = ("version",)
_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}
#: Limits on an untrusted config file: its size, the nesting of its values, and YAML aliases (``*name``).
MAX_BYTES, MAX_DEPTH, MAX_ALIASES = 1 << 20, 16, 64
# Error messages quote values through this: a few items per container, a few levels, 80 characters in all.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40


class YamlMissingError(ConfigError, ImportError):
    """A YAML ``--config`` file without PyYAML installed (like ``PeftMissingError``: a usage error, exit 2)."""


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping in the YAML (``.yaml``/``.yml``, needs PyYAML) or JSON (``.json``) file ``path``.

    Raises:
        ConfigError: The file is missing, unreadable, of another kind, malformed, or not a mapping.
        YamlMissingError: A YAML file without PyYAML installed (``pip install timm-remem[config]``); also a
            ``ConfigError`` and an ``ImportError``.
    """
    file = Path(path)
    kind = _SUFFIXES.get(file.suffix.lower())
    if kind is None:
        raise ConfigError(f"--config {path}: expected a .yaml, .yml or .json file, got {file.suffix or 'no suffix'!r}")
    try:
        mode = file.stat().st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(mode):  # a device or a FIFO: no end to read, and a FIFO blocks on open
            raise ConfigError(f"--config {path}: not a regular file; pass a .yaml or .json file (e.g. "
                              "RUN/config.json)")
        with open(file, "rb") as f:
            raw = f.read(MAX_BYTES + 1)  # bounded whatever the file's size
        if len(raw) > MAX_BYTES:
            raise ConfigError(f"--config {path}: more than a settings file needs (at most {MAX_BYTES} bytes); pass "
                              "the run's settings file (e.g. RUN/config.json)")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"--config {path}: is a folder; pass a .yaml or .json file (e.g. RUN/config.json)") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--config {path}: cannot be read ({error})") from None
    try:
        data = _parse_yaml(path, text) if kind == "yaml" else _parse_json(path, text)
    except RecursionError:
        raise ConfigError(f"--config {path}: nested more than a settings file can be; at most {MAX_DEPTH} "
                          "levels") from None
    _check_depth(path, data)
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings (batch_size: 32, ...), got "
                          f"{type(data).__name__} {_short(data)}")
    return data


def file_options(
    path: str, cls: type, *, exclude: Collection[str] = (), command: str = "this command",
    convert: Mapping[str, Callable[[str], Any]] | None = None,
) -> dict[str, Any]:
    """The settings of config file ``path`` for config class ``cls``, checked against the fields' types.

    Args:
        exclude: Fields that ``command`` sets itself (an error if the file names them).
        convert: Per field, how its flag reads a string value; by default ``int``/``float``, JSON for dict fields.

    Raises:
        ConfigError: As :func:`read_config_file`; an unknown or excluded key; a value of the wrong type.
    """
    data = read_config_file(path)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names and k not in IGNORED_KEYS]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key).replace("-", "_"), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        others = f" and {len(unknown) - 1} more ({', '.join(map(repr, unknown[1:]))})" if len(unknown) > 1 else ""
        raise ConfigError(f"--config {path}: unknown key {key!r}{hint}{others}; valid keys are config field names: "
                          f"{', '.join(sorted(n for n in names if n not in exclude))}")
    refused = [k for k in data if k in exclude]
    if refused:
        one = len(refused) == 1
        raise ConfigError(f"--config {path}: {', '.join(map(repr, refused))} {'does' if one else 'do'} not apply to "
                          f"{command} ({command} sets {'it' if one else 'them'} itself); remove "
                          f"{'it' if one else 'them'} from the file")
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in IGNORED_KEYS:
            continue
        hint = hints[key]
        if isinstance(value, str) and not matches_type(value, hint):
            value = _from_word(path, key, value, hint, (convert or {}).get(key))
        if not matches_type(value, hint):
            raise ConfigError(f"--config {path}: {key} must be {describe_type(hint)}, got {_short(value)}")
        out[key] = value
    return out


def _parse_yaml(path: str, text: str) -> Any:
    try:
        import yaml
    except ImportError as error:
        raise YamlMissingError(f"--config {path}: reading YAML needs PyYAML: pip install timm-remem[config] (or pass a "
                          ".json file)") from error
    class _BoundedLoader(yaml.SafeLoader):  # PyYAML's safe loader, counting aliases as it composes the document
        aliases = 0

        def compose_node(self, parent, index):
            if self.check_event(yaml.events.AliasEvent):
                type(self).aliases += 1
                if type(self).aliases > MAX_ALIASES:
                    raise ConfigError(f"--config {path}: more than {MAX_ALIASES} YAML aliases (*name); a settings "
                                      "file needs none: write the values out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(k, deep=deep) for k, _ in node.value if isinstance(k, yaml.ScalarNode)]
            _refuse_duplicates(path, keys)
            return super().construct_mapping(node, deep=deep)

    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"--config {path}: not valid YAML{where} ({' '.join(str(problem).split())})") from None


def _refuse_duplicates(path: str, keys: list[Any]) -> None:
    """A key given twice in one mapping: refused (JSON and YAML parsers would keep the last one silently)."""
    seen: set[Any] = set()
    for key in (k for k in keys if isinstance(k, (str, int, float, bool))):
        if key in seen:
            raise ConfigError(f"--config {path}: {_short(key)} is given twice; a setting is written once (the "
                              "parser would silently keep the last value)")
        seen.add(key)


def _parse_json(path: str, text: str) -> Any:
    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        _refuse_duplicates(path, [k for k, _ in pairs])
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError as error:
        raise ConfigError(f"--config {path}: not valid JSON at line {error.lineno}, column {error.colno} "
                          f"({error.msg})") from None


def _from_word(path: str, key: str, text: str, hint: Any, convert: Callable[[str], Any] | None) -> Any:
    """A string value read as the field's flag reads it (``"1e-3"`` -> 0.001); unchanged when no reading applies."""
    options = [typing.get_origin(o) or o for o in type_options(hint) if o is not type(None)]
    if convert is None and len(options) == 1 and options[0] in (int, float, dict):
        convert = _json_object if options[0] is dict else options[0]
    if convert is None:
        return text
    try:
        return convert(text)
    except (ValueError, argparse.ArgumentTypeError) as error:
        why = "" if convert in (int, float) else f" ({error})"  # int()'s own words add nothing
        raise ConfigError(f"--config {path}: {key} must be {describe_type(hint)}, got {_short(text)}{why}") from None


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _check_depth(path: str, data: Any) -> None:
    """Refuse values nested deeper than :data:`MAX_DEPTH`, visiting each container once (YAML aliases share them)."""
    seen: set[int] = set()
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if not isinstance(value, (dict, list)) or id(value) in seen:
            continue
        if depth > MAX_DEPTH:
            raise ConfigError(f"--config {path}: values nested {depth} levels deep; a settings file needs at most "
                              f"{MAX_DEPTH}")
        seen.add(id(value))
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children)


def _short(value: Any) -> str:
    """A bounded repr of an untrusted value: its cost and length do not grow with the value."""
    text = _REPR.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
