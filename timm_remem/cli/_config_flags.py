"""Command-line flags generated from the training config dataclasses: a flag, its default and its help written once.

Field ``batch_size`` becomes ``--batch-size`` (a switch ``x`` on by default: ``--no-x``), typed by its annotation,
its help and default shown in --help; the exceptions are in :data:`SPECIAL`. An absent flag is absent from the
namespace, so :func:`config_options` returns only what the user typed; :func:`command_options` puts the ``--config``
file under it and checks the result.

Example:
    >>> import argparse
    >>> from timm_remem.train import FinetuneConfig
    >>> parser = argparse.ArgumentParser()
    >>> add_config_flags(parser, FinetuneConfig)
    >>> args = parser.parse_args(["--model", "test_vit", "--opt", "sgd", "--no-progress"])
    >>> config_options(args, FinetuneConfig)
    {'model': 'test_vit', 'optimizer': 'sgd', 'progress': False}
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from collections.abc import Callable, Collection, Mapping
from typing import Any

from .._validation import type_options
from ..errors import ConfigError
from ..train.config import DistillConfig, FinetuneConfig, TrainConfig
from ._args import comma_list, json_dict
from ._config_file import file_options

__all__ = ["SPECIAL", "add_config_command", "add_config_flags", "command_options", "config_options", "flag_name"]

# The exceptions to "field foo_bar is flag --foo-bar, typed by its annotation": ``flag``, ``choices`` (a tuple, or a
# dict from command-line word to config value), ``help``, or any add_argument keyword. ``None``: the field has no flag.
SPECIAL: dict[str, dict[str, Any] | None] = {
    "model": {"required": True},  # on the command line or in the --config file
    "optimizer": {"flag": "--opt"},
    "label_smoothing": {"flag": "--smoothing"},
    "num_workers": {"flag": "--workers"},
    "save_state": None,  # always on for finetune/distill runs; select turns it off itself
    "resume": {"nargs": "?", "const": True, "type": str, "metavar": "CHECKPOINT",
               "help": "resume from OUTPUT/train-state (or from CHECKPOINT); 'auto': resume if OUTPUT holds a "
                       "checkpoint, else start afresh (restarted jobs, torchrun --max-restarts)"},
    "lora_targets": {"type": comma_list("--lora-targets"), "metavar": "NAME[,NAME...]"},
    "log": {"nargs": "+", "metavar": "TRACKER"},
    "cache_teacher": {"choices": {"auto": None, "on": True, "off": False},
                      "help": "cache teacher logits across epochs (auto: when inputs are deterministic, i.e. no "
                              "augmentation, mixup or cutmix)"},
}

# --help groups: TrainConfig fields by name ("training" when not listed), subclass fields by their class.
_GROUPS = {
    **dict.fromkeys(("model", "model_kwargs", "pretrained", "dataset", "data_dir", "download", "img_size",
                     "num_classes", "output"), "model and data"),
    **dict.fromkeys(("save_at", "save_state", "checkpoint_every", "keep_last", "resume"), "checkpoints"),
}
_CLASS_GROUPS = {FinetuneConfig: "ReMem reweighting", DistillConfig: "distillation"}


def flag_name(field: dataclasses.Field) -> str | None:
    """The option string of a config field (None: no flag).

    Example:
        >>> from timm_remem.train import DistillConfig
        >>> fields = {f.name: f for f in dataclasses.fields(DistillConfig)}
        >>> flag_name(fields["batch_size"]), flag_name(fields["optimizer"]), flag_name(fields["teacher_pretrained"])
        ('--batch-size', '--opt', '--no-teacher-pretrained')
    """
    if field.name in SPECIAL and SPECIAL[field.name] is None:
        return None
    special = SPECIAL.get(field.name) or {}
    if "flag" in special:
        return special["flag"]
    on_by_default = _default(field) is True and "choices" not in special
    return ("--no-" if on_by_default else "--") + field.name.replace("_", "-")


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    exclude: Collection[str] = (),
    defaults: Mapping[str, Any] | None = None,
    help: Mapping[str, str] | None = None,
) -> None:
    """Add one flag per field of the config dataclass ``cls`` to ``parser``, in field order, in --help groups.

    Args:
        exclude: Fields that get no flag.
        defaults: Defaults to show instead of the dataclass's (``select`` runs 3 epochs); an absent flag is still
            left out.
        help: Help to use instead of the field's, by field name.
    """
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}  # argparse argument groups by title
    for field in dataclasses.fields(cls):
        flag = flag_name(field)
        if flag is None or field.name in exclude:
            continue
        special = {k: v for k, v in (SPECIAL.get(field.name) or {}).items() if k not in ("flag", "help")}
        default = (defaults or {}).get(field.name, _default(field))
        kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS}
        choices = special.pop("choices", field.metadata.get("choices"))
        if choices is not None:
            kwargs["choices"] = list(choices)
        elif "type" not in special:
            kwargs.update(_from_annotation(field.name, hints[field.name], flag, default))
        kwargs.update(special)
        required = kwargs.pop("required", False)  # checked by command_options: a --config file may set it
        text = ((help or {}).get(field.name) or (SPECIAL.get(field.name) or {}).get("help")
                or field.metadata.get("help", ""))
        if kwargs.get("action") == "store_false":
            text = f"turn off: {text}" if text else "turn off"
        shown = "required" if required else "default: " + _shown(default, choices, kwargs.get("action"))
        kwargs["help"] = _with_note(text, shown)
        name = _group(cls, field.name)
        if name not in groups:
            groups[name] = parser.add_argument_group(name)
        groups[name].add_argument(flag, **kwargs)


def config_options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The config fields given on the command line, as config values (``--cache-teacher off`` -> False).

    Example:
        >>> from timm_remem.train import DistillConfig
        >>> config_options(argparse.Namespace(model="resnet18", cache_teacher="off", func=print), DistillConfig)
        {'model': 'resnet18', 'cache_teacher': False}
    """
    given = vars(args)
    out: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if field.name in given:
            choices = (SPECIAL.get(field.name) or {}).get("choices")
            out[field.name] = choices[given[field.name]] if isinstance(choices, Mapping) else given[field.name]
    return out


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _from_annotation(name: str, hint: Any, flag: str, default: Any) -> dict[str, Any]:
    """argparse ``action``/``type``/``nargs`` from a field's annotation (``X | None`` counts as ``X``)."""
    options = [a for a in type_options(hint) if a is not type(None)]
    hint = options[0] if len(options) == 1 else hint  # a union of several types falls through to the TypeError
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return {"action": "store_false" if default is True else "store_true"}
    if hint in (int, float):
        return {"type": hint}
    if hint is str:
        return {}
    if hint is dict or origin is dict:
        return {"type": json_dict(flag), "metavar": "JSON"}
    if origin is list and args and args[0] in (int, float, str):
        return {"type": args[0], "nargs": "*"}
    raise TypeError(f"config field {name!r} ({hint}) needs an entry in cli._config_flags.SPECIAL")


def _shown(default: Any, choices: Any, action: str | None) -> str:
    """How --help writes a default: the command-line word, 'on'/'off' for switches, 'unset' for None."""
    if isinstance(choices, Mapping):
        return next(word for word, value in choices.items() if value == default and type(value) is type(default))
    if action in ("store_true", "store_false"):
        return "on" if default else "off"
    if default is None:
        return "unset"
    if isinstance(default, (list, tuple)):
        return " ".join(map(str, default)) or "none"
    return str(default)


def _with_note(text: str, note: str) -> str:
    """``text (note)``, a final full stop dropped (not an ellipsis), ``%`` escaped (argparse %-formats help)."""
    text = text.rstrip()
    if text.endswith(".") and not text.endswith("..."):
        text = text[:-1]
    return f"{text} ({note})".lstrip().replace("%", "%%")


def _group(cls: type, name: str) -> str:
    """The --help group of field ``name``: the class that first declares it, or a TrainConfig group."""
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base) and name in {f.name for f in dataclasses.fields(base)}:
            return _GROUPS.get(name, "training") if base is TrainConfig else _CLASS_GROUPS.get(base, "options")
    return "options"


def add_config_command(
    subparsers: argparse._SubParsersAction, name: str, cls: type, run: Callable[[argparse.Namespace], int], *,
    help: str, description: str, model_help: str, exclude: Collection[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> argparse.ArgumentParser:
    """Add sub-command ``name`` with ``--config FILE`` and a flag per field of ``cls``; returns its parser."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="read settings from a YAML or JSON file (keys: config field names, e.g. batch_size; "
                        "a run's OUTPUT/config.json works); flags given here override it (default: none)")
    add_config_flags(parser, cls, exclude=exclude, defaults=defaults, help={"model": model_help})
    parser.set_defaults(func=run)
    return parser


def command_options(
    args: argparse.Namespace, cls: type, *, command: str, exclude: Collection[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The settings a command passes to the library: its ``--config`` file's, overridden by the flags given.

    Checked by building ``cls`` (with ``defaults``, the library function's own), naming the flag or file key of a
    bad value.

    Raises:
        ConfigError: A bad ``--config`` file, a required setting missing, or a value the config class refuses.

    Example:
        >>> from timm_remem.train import FinetuneConfig
        >>> command_options(argparse.Namespace(model="test_vit", epochs=0), FinetuneConfig, command="finetune")
        Traceback (most recent call last):
        ...
        timm_remem.errors.ConfigError: epochs must be ... got 0 (set by --epochs)
    """
    given = config_options(args, cls)
    path = getattr(args, "config", None)
    from_file = file_options(path, cls, exclude=exclude, command=command, convert=_word_readers(cls)) if path else {}
    options = {**from_file, **given}
    for name, special in SPECIAL.items():
        if special and special.get("required") and name not in options and name not in exclude:
            raise ConfigError(f"the following arguments are required: --{name.replace('_', '-')} (on the command "
                              f"line or as '{name}' in a --config file)")
    try:
        cls(**{**(defaults or {}), **options})
    except ConfigError as error:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        named = [n for n in options if re.search(rf"(?<![\w-]){re.escape(n)}(?!\w)", str(error))]
        sources = [flag_name(fields[n]) if n in given else f"{n!r} in {path}" for n in named]
        raise ConfigError(f"{error} (set by {'; '.join(sources)})" if sources else str(error)) from None
    return options


def _word_readers(cls: type) -> dict[str, Callable[[str], Any]]:
    """How the flags read a word, for string values in a --config file (``cache_teacher: auto`` -> None)."""
    readers: dict[str, Callable[[str], Any]] = {}
    for field in dataclasses.fields(cls):
        special = SPECIAL.get(field.name) or {}
        choices = special.get("choices")
        if isinstance(choices, Mapping):
            readers[field.name] = _word_of(dict(choices))
        elif callable(special.get("type")) and special.get("type") is not str:
            readers[field.name] = special["type"]
    return readers


def _word_of(choices: dict[str, Any]) -> Callable[[str], Any]:
    def read(word: str) -> Any:
        if word not in choices:
            raise ValueError(f"choose from {', '.join(choices)}")
        return choices[word]

    return read
