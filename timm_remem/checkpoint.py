"""Crash-safe, pickle-free training checkpoints.

A checkpoint is a directory ``<root>/step-<step>/``: ``model.safetensors`` (and ``ema.safetensors``), every other
tensor in ``state.safetensors``, everything else in ``state.json``, and last ``manifest.json`` (each file's size and
sha256), which marks it complete. It is written in a hidden directory renamed into place, so a crash leaves the
earlier checkpoints intact; a damaged one is detected on load. Nothing is pickled, so loading never executes code.

Example:
    >>> import tempfile, torch
    >>> from timm_remem.checkpoint import save_checkpoint, load_checkpoint
    >>> model = torch.nn.Linear(3, 2)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> model(torch.ones(1, 3)).sum().backward(); opt.step()
    >>> root = tempfile.mkdtemp()
    >>> path = save_checkpoint(root, model=model, optimizer=opt, epoch=1, step=10)
    >>> info = load_checkpoint(root, model=model, optimizer=opt)
    >>> info.epoch, info.step, path.name
    (1, 10, 'step-000000010')
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ._io import atomic_replace_dir, atomic_write_json, atomic_write_safetensors, file_sha256, fsync_dir
from ._state_tree import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    OPTIONAL_FILES,
    flatten_state,
    get_rng_state,
    read_manifest,
    read_state_document,
    set_rng_state,
    unflatten_state,
)
from ._version import __version__
from .errors import CheckpointError

__all__ = ["CheckpointInfo", "save_checkpoint", "load_checkpoint", "verify_checkpoint", "list_checkpoints",
           "latest_checkpoint", "resolve_checkpoint", "flatten_state", "unflatten_state", "get_rng_state",
           "set_rng_state"]

_log = logging.getLogger(__name__)

_PREFIX = "step-"
_TMP_PREFIX = ".tmp-"  # a checkpoint being written (atomic_replace_dir's temporary sibling)
_OLD_PREFIX = ".old-"  # a checkpoint being replaced by a new save of the same step


@dataclass
class CheckpointInfo:
    """What :func:`load_checkpoint` read besides the tensors it loaded: the directory and what was saved with it."""

    path: Path
    epoch: int
    step: int
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def _read_safetensors(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"checkpoint file {str(path)!r} is unreadable ({e}); it is corrupt or truncated: resume from an "
            "earlier checkpoint (list them with timm_remem.checkpoint.list_checkpoints)"
        ) from e


def _step_of(path: Path) -> int:
    try:
        return int(path.name[len(_PREFIX) :])
    except ValueError:
        return -1


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (those with a manifest) under ``root``, oldest step first; integrity is not checked.

    Example:
        >>> import tempfile
        >>> list_checkpoints(tempfile.mkdtemp())
        []
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / MANIFEST).is_file()]
    return sorted(found, key=_step_of)


def verify_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Check that a checkpoint directory is complete and every file matches its size and sha256; returns the manifest.

    Raises:
        CheckpointError: Missing directory or manifest, a missing, truncated or modified file.

    Example:
        >>> import tempfile
        >>> verify_checkpoint(tempfile.mkdtemp())  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        timm_remem.errors.CheckpointError: ... has no manifest.json ...
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; pass a checkpoint directory or its parent")
    manifest = read_manifest(path)
    files = manifest["files"]
    unlisted = [name for name in OPTIONAL_FILES if name not in files and (path / name).exists()]
    if unlisted:
        raise CheckpointError(f"{str(path / MANIFEST)!r} is malformed: it does not list {unlisted}, which the "
                              "checkpoint holds and the loader reads; resume from an earlier checkpoint")
    for name, meta in files.items():
        fpath = path / name
        if fpath.is_symlink():
            raise CheckpointError(f"checkpoint file {str(fpath)!r} is a symlink; checkpoints hold only their own "
                                  "files: resume from an earlier checkpoint")
        if not fpath.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} is missing {name!r}; resume from an earlier checkpoint")
        size = fpath.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(
                f"checkpoint file {str(fpath)!r} is truncated or altered: {size} bytes, expected {meta['bytes']}; "
                "resume from an earlier checkpoint"
            )
        if file_sha256(fpath) != meta["sha256"]:
            raise CheckpointError(
                f"checkpoint file {str(fpath)!r} is corrupt: its sha256 does not match the manifest; resume from an "
                "earlier checkpoint"
            )
    read_state_document(path)  # its format version and field types (the hashes say nothing about those)
    return manifest


def latest_checkpoint(root: str | os.PathLike, *, verify: bool = True) -> Path | None:
    """The newest complete checkpoint under ``root`` that passes :func:`verify_checkpoint` (damaged ones are skipped
    with a warning), or None.

    Example:
        >>> import tempfile
        >>> latest_checkpoint(tempfile.mkdtemp()) is None
        True
    """
    for path in reversed(list_checkpoints(root)):
        if not verify:
            return path
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            _log.warning("skipping damaged checkpoint: %s", e)
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory that :func:`load_checkpoint` would read: ``path`` itself, or a run directory's
    :func:`latest_checkpoint`.

    Raises:
        CheckpointError: The path does not exist, holds no complete checkpoint, or every one is damaged.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> _ = save_checkpoint(root, model=torch.nn.Linear(2, 2), step=5)
        >>> resolve_checkpoint(root).name
        'step-000000005'
    """
    path = Path(path)
    if (path / MANIFEST).is_file() or path.name.startswith(_PREFIX):
        return path
    if path.is_dir():
        if not list_checkpoints(path):
            raise CheckpointError(
                f"no complete checkpoint in {str(path)!r}; pass a directory written by save_checkpoint (or one of "
                "its step-* sub-directories)"
            )
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"every checkpoint in {str(path)!r} is damaged; nothing to resume from")
        return found
    raise CheckpointError(f"checkpoint {str(path)!r} does not exist; check the --resume path")


def _clean_up_after_crash(root: Path) -> None:
    """Delete half-written checkpoints (``.tmp-step-*``); put back a replaced one whose replacement never arrived."""
    for stale in sorted(root.glob(".*")):
        if stale.is_symlink() or not stale.is_dir():
            continue
        if stale.name.startswith(_OLD_PREFIX + _PREFIX):
            original = root / stale.name[len(_OLD_PREFIX):]
            if not (original.exists() or original.is_symlink()):
                os.replace(stale, original)
            else:
                shutil.rmtree(stale, ignore_errors=True)
        elif stale.name.startswith(_TMP_PREFIX + _PREFIX):
            shutil.rmtree(stale, ignore_errors=True)


def _optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = {"optimizer": optimizer.state_dict()}
    base = getattr(optimizer, "base_optimizer", None)
    if isinstance(base, torch.optim.Optimizer) and base is not optimizer and base.state is not optimizer.state:
        # A SAM-style wrapper whose own state dict leaves out the base optimizer's state (momentum, Adam moments).
        # (timm_remem.sam.SAM shares its state with the base optimizer and saves it itself.)
        state["base_optimizer"] = base.state_dict()
    return state


def save_checkpoint(
    root: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    ema: torch.nn.Module | None = None,
    epoch: int = 0,
    step: int = 0,
    config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    rng: bool = True,
    keep_last: int | None = 2,
) -> Path:
    """Write a checkpoint atomically to ``root/step-<step>`` and prune all but the newest ``keep_last``.

    Args:
        root: Directory holding the run's checkpoints.
        model: Model whose ``state_dict`` is saved (unwrap DDP first).
        optimizer: Optimizer (SAM included: its base optimizer's state is saved too).
        scheduler: Anything with ``state_dict()`` (as is ``scaler``).
        ema: An EMA model (e.g. ``timm.utils.ModelEmaV3``), saved to ``ema.safetensors``.
        step: Optimizer step counter; names the directory.
        config: Run configuration (JSON-able, as are ``metrics`` and ``extra``, which may hold tensors).
        rng: Save Python/NumPy/torch/CUDA RNG states.
        keep_last: Keep only this many newest checkpoints (None keeps all), pruned once the new one is complete.

    Returns:
        The checkpoint directory.

    Raises:
        CheckpointError: A value that cannot be stored without pickle, ``keep_last < 1``, or a failed write (a full
            disk, a read-only folder: safetensors' own write errors included); the earlier checkpoints are kept.

    Example:
        >>> import tempfile
        >>> m = torch.nn.Linear(2, 2)
        >>> p = save_checkpoint(tempfile.mkdtemp(), model=m, step=3, metrics={"acc": 0.5})
        >>> sorted(f.name for f in p.iterdir())
        ['manifest.json', 'model.safetensors', 'state.json', 'state.safetensors']
    """
    if keep_last is not None and (not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1):
        raise CheckpointError(f"keep_last must be an integer >= 1 or None, got {keep_last!r}")
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        _clean_up_after_crash(root)
    except OSError as e:
        raise _write_error(root, root, e) from e

    tree_src: dict[str, Any] = {}
    if optimizer is not None:
        tree_src.update(_optimizer_state(optimizer))
    if scheduler is not None:
        tree_src["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        tree_src["scaler"] = scaler.state_dict()
    if rng:
        tree_src["rng"] = get_rng_state()
    tree_src["extra"] = dict(extra or {})
    tree, state_tensors = flatten_state(tree_src, "state")
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "epoch": int(epoch), "step": int(step),
                "config": dict(config or {}), "metrics": dict(metrics or {}), "state": tree}
    try:
        json.dumps(document, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config and metrics must be JSON data (no NaN/inf, no objects): {e}") from e

    final = root / f"{_PREFIX}{int(step):09d}"

    def write(tmp: Path) -> None:  # into a hidden sibling; swapped in for ``final`` once complete
        atomic_write_safetensors(tmp / "model.safetensors", model.state_dict())
        if ema is not None:
            atomic_write_safetensors(tmp / "ema.safetensors", ema.state_dict())
        atomic_write_safetensors(tmp / "state.safetensors", state_tensors)
        atomic_write_json(tmp / "state.json", document)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in sorted(tmp.iterdir())}
        atomic_write_json(  # written last: it marks the checkpoint complete
            tmp / MANIFEST,
            {"format": FORMAT, "format_version": FORMAT_VERSION, "timm_remem": __version__, "epoch": int(epoch),
             "step": int(step), "created": time.time(), "files": files},
        )
        fsync_dir(tmp)

    # Re-saving the same step moves the old checkpoint aside and deletes it only once the new one is in place.
    try:
        atomic_replace_dir(write, final)
    except OSError as e:
        raise _write_error(final, root, e) from e
    if keep_last is not None:
        for old in list_checkpoints(root)[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _write_error(path: Path, root: Path, error: OSError) -> CheckpointError:
    """One error for a failed write (full disk, read-only folder), naming the checkpoint and what was kept."""
    while isinstance(error.__cause__, OSError):  # the original error, not _io's re-raise naming a temporary path
        error = error.__cause__
    reason = error.strerror or str(error)
    kept = ", ".join(p.name for p in list_checkpoints(root))
    return CheckpointError(
        f"could not write checkpoint {str(path)!r}: {reason}. Free disk space or make the folder writable (or choose "
        f"another --output); {'the earlier checkpoints ' + kept + ' are kept' if kept else 'no earlier checkpoint'}"
    )


def _load_state_dict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str, path: Path) -> None:
    own = module.state_dict()
    problems = {
        "missing keys": [k for k in own if k not in tensors],
        "unexpected keys": [k for k in tensors if k not in own],
        "shape mismatch": [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
                           for k in own if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)],
    }
    parts = [f"{label} {keys[:5]}{' ...' if len(keys) > 5 else ''}" for label, keys in problems.items() if keys]
    if parts:
        raise CheckpointError(
            f"the {what} in checkpoint {str(path)!r} does not match the {what} it is loaded into: "
            + "; ".join(parts)
            + ". Build it with the configuration saved in state.json (architecture, num_classes, img_size, "
            "reweighting) before loading"
        )
    module.load_state_dict(tensors, strict=True)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    ema: torch.nn.Module | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
    verify: bool = True,
) -> CheckpointInfo:
    """Load a checkpoint into the given objects after checking its integrity.

    Args:
        path: A checkpoint directory, or a run directory (its newest valid checkpoint is used).
        model: Model to load weights into (exactly the saved keys and shapes); ``ema``, ``optimizer`` (the saved
            parameter layout), ``scheduler`` and ``scaler`` are restored the same way when given.
        restore_rng: Restore Python/NumPy/torch/CUDA RNG states.
        map_location: Device the tensors are read onto.
        verify: Check sizes and sha256 of every file first.

    Returns:
        A :class:`CheckpointInfo`.

    Raises:
        CheckpointError: Missing, incomplete, truncated or corrupt checkpoint, or weights that do not fit ``model``.

    Example:
        >>> import tempfile
        >>> m = torch.nn.Linear(2, 2)
        >>> root = tempfile.mkdtemp(); _ = save_checkpoint(root, model=m, epoch=2, step=7, config={"lr": 0.1})
        >>> load_checkpoint(root, model=torch.nn.Linear(2, 2)).config
        {'lr': 0.1}
    """
    path = resolve_checkpoint(path)
    if verify:
        verify_checkpoint(path)
    else:
        read_manifest(path)  # complete, well-formed and of a format this version reads; sizes and hashes unchecked
    document = read_state_document(path)
    tensors = _read_safetensors(path / "state.safetensors", map_location)
    state = unflatten_state(document.get("state", {}), tensors)
    if model is not None:
        _load_state_dict(model, _read_safetensors(path / "model.safetensors", map_location), "model", path)
    if ema is not None:
        if not (path / "ema.safetensors").is_file():
            raise CheckpointError(f"checkpoint {str(path)!r} holds no EMA weights; run without EMA or start afresh")
        _load_state_dict(ema, _read_safetensors(path / "ema.safetensors", map_location), "EMA model", path)
    if optimizer is not None:
        if "optimizer" not in state:
            raise CheckpointError(f"checkpoint {str(path)!r} holds no optimizer state; it cannot resume training")
        try:
            optimizer.load_state_dict(state["optimizer"])
            base = getattr(optimizer, "base_optimizer", None)
            if "base_optimizer" in state and isinstance(base, torch.optim.Optimizer):
                base.load_state_dict(state["base_optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(
                f"the optimizer state in {str(path)!r} does not fit the optimizer ({e}); use the same optimizer, "
                "parameter groups and model as the saved run"
            ) from e
    if scheduler is not None and "scheduler" in state:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state and state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    if restore_rng and "rng" in state:
        set_rng_state(state["rng"])
    return CheckpointInfo(
        path=path,
        epoch=int(document.get("epoch", 0)),
        step=int(document.get("step", 0)),
        config=document.get("config", {}),
        metrics=document.get("metrics", {}),
        extra=state.get("extra", {}),
    )
