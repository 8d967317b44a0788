"""Teacher sources: the one place that turns what a user names as a teacher (or a collection of teacher
checkpoints) into a model, so training, analysis and the CLI accept the same things and fail the same way.

Example:
    >>> import tempfile, timm, timm_remem
    >>> from timm_remem.teachers import list_exports, load_teacher_model
    >>> root = tempfile.mkdtemp()
    >>> model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=4)
    >>> _ = timm_remem.save_pretrained(model, f"{root}/checkpoints/epoch-002")
    >>> _ = timm_remem.save_pretrained(model, f"{root}/checkpoints/epoch-010")
    >>> [p.name for p in list_exports(root)]
    ['epoch-002', 'epoch-010']
    >>> load_teacher_model(list_exports(root)[0], num_classes=4).num_classes
    4
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from timm.utils import natural_key
from torch import nn

from ._models import SOURCE_PREFIXES, create_timm_model
from ._validation import check_class_count
from .errors import CheckpointError, ConfigError, HubError
from .hub import load_teacher

__all__ = ["EXPORT_DIR", "NoCheckpointsError", "is_export", "list_exports", "load_teacher_model"]

EXPORT_DIR = "checkpoints"  # where a finetune run writes its exports
_EXPORT_FILES = ("config.json", "model.safetensors")


class NoCheckpointsError(ConfigError, CheckpointError):
    """A folder that should hold teacher checkpoints holds none (or does not exist)."""


def is_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete checkpoint folder (``config.json`` and ``model.safetensors``, not hidden)."""
    path = Path(path)
    return path.is_dir() and not path.name.startswith(".") and all((path / f).is_file() for f in _EXPORT_FILES)


def list_exports(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Teacher checkpoint folders named by ``source``, in natural order (``epoch-2`` before ``epoch-10``).

    Args:
        source: A checkpoint folder (a list of one), a folder of checkpoint folders, a ``finetune`` run folder (its
            ``checkpoints/``), or an explicit sequence of checkpoint folders (kept in the given order).

    Raises:
        NoCheckpointsError: The folder does not exist or holds no complete checkpoint folder, or the sequence is
            empty or names a folder that is not a checkpoint.
    """
    if isinstance(source, (str, os.PathLike)):
        root = Path(source).expanduser()
        if not root.is_dir():
            raise NoCheckpointsError(
                f"teacher checkpoint folder {str(root)!r} does not exist; pass the checkpoints/ folder of a finetune "
                "run, the run folder itself, or a list of checkpoint folders"
            )
        if is_export(root):
            return [root]
        dirs = [p for p in root.iterdir() if is_export(p)]
        if not dirs and (root / EXPORT_DIR).is_dir():
            dirs = [p for p in (root / EXPORT_DIR).iterdir() if is_export(p)]
        if not dirs:
            raise NoCheckpointsError(
                f"{str(root)!r} holds no teacher checkpoints (no checkpoint folders: sub-folders with config.json "
                "and model.safetensors); run timm-remem finetune with --save-at, or write them with "
                "timm_remem.save_pretrained"
            )
        return sorted(dirs, key=lambda p: natural_key(p.name))
    if isinstance(source, (bytes, nn.Module)) or not isinstance(source, Sequence):
        raise ConfigError(
            f"teacher checkpoints must be a folder or a list of checkpoint folders, got {type(source).__name__}"
        )
    dirs = [Path(t).expanduser() for t in source]
    if not dirs:
        raise NoCheckpointsError("no teacher checkpoints given; pass at least one checkpoint folder")
    bad = [str(d) for d in dirs if not is_export(d)]
    if bad:
        raise NoCheckpointsError(
            f"not checkpoint folders (each needs config.json and model.safetensors): {bad}; pass folders written by "
            "finetune_teacher or timm_remem.save_pretrained"
        )
    return dirs


def load_teacher_model(
    spec: Any, *, num_classes: int | None = None, pretrained: bool = True, model_kwargs: dict | None = None,
    against: str = "dataset",
) -> nn.Module:
    """Load the teacher named by ``spec``: an ``nn.Module`` (used as it is), a checkpoint folder,
    ``local-dir:``/``hf-hub:`` (:func:`timm_remem.load_teacher`), or a timm name (its own head kept).

    Args:
        spec: What the user named.
        num_classes: When given, the teacher must predict exactly this many classes.
        pretrained: Load pretrained weights for a teacher given by timm name.
        model_kwargs: Extra ``timm.create_model`` arguments.
        against: What ``num_classes`` comes from, for the message (``"dataset"``, ``"student"``).

    Returns:
        The teacher (a module as it is; in eval mode when loaded).

    Raises:
        CheckpointError: A folder without ``config.json``, or weights that do not load.
        ConfigError: An unknown name, a bad argument, or a class count that differs from ``num_classes``.
    """
    kwargs = dict(model_kwargs or {})
    if isinstance(spec, nn.Module):
        model = spec
    elif isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        path = Path(text).expanduser()
        if path.is_dir() and not (path / "config.json").is_file():
            raise CheckpointError(
                f"teacher folder {text!r} has no config.json, so it is not a checkpoint folder; pass a folder "
                "written by finetune_teacher or timm_remem.save_pretrained (e.g. runs/teacher/checkpoints/epoch-010) "
                "or a timm model name"
            )
        if path.is_dir() or text.startswith(SOURCE_PREFIXES):
            model = load_teacher(text, **kwargs)
        else:
            try:
                model = create_timm_model(text, pretrained=pretrained, kwargs=kwargs).eval()
            except HubError:  # weights that cannot be had (offline, no cache): its message names the fixes
                raise
            except RuntimeError as err:
                raise CheckpointError(
                    f"could not load teacher {text!r}: {err}. Pass a checkpoint folder, an nn.Module, or a timm name "
                    "whose weights are available offline"
                ) from err
    else:
        raise ConfigError(
            f"a teacher must be an nn.Module, a checkpoint folder written by timm_remem.save_pretrained, "
            f"'local-dir:DIR', 'hf-hub:namespace/name' or a timm model name, got {type(spec).__name__}"
        )
    if num_classes is not None:
        check_class_count(getattr(model, "num_classes", None), num_classes, teacher=f"teacher {_name(spec)}",
                          other=against)
    return model


def _name(spec: Any) -> str:
    return repr(os.fspath(spec)) if isinstance(spec, (str, os.PathLike)) else type(spec).__name__
