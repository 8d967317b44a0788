"""A run's identity: what defines what it computes (settings, data, teacher folder, library versions), recorded in
``run-identity.json`` when it starts and checked on every resume (:func:`check_run_identity`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch.utils.data import Dataset, Subset

from .._version import __version__
from ..data import DigitsDataset, IndexedDataset
from ..errors import ConfigError
from .config import TrainConfig
from .console import log
from .lock import IDENTITY_FILE, STATE_DIR

__all__ = ["RESUME_FREE", "IDENTITY_FORMAT", "FILE_LIST_LIMIT", "dataset_identity", "dataset_differences",
           "run_identity", "identity_differences", "attach_identity", "attached_identity", "check_run_identity"]

# Configuration fields that may change between a run and its resumption: how a run is shown, saved and logged,
# where it runs and what it may download. num_workers changes nothing (each sample's augmentation is seeded by
# (seed, epoch, index)); device and clip_grad change the numbers, on purpose (moving a run to another machine,
# clipping after a divergence). They are left out of the settings diff and of the run's identity.
RESUME_FREE = frozenset(
    {"resume", "resume_mismatch", "progress", "output", "num_workers", "device", "save_at", "keep_last",
     "checkpoint_every", "save_state", "clip_grad", "log", "download", "version"}
)
IDENTITY_FORMAT = 1


def _as_saved(value: Any) -> Any:
    return json.loads(json.dumps(value))  # as a checkpoint holds it: tuples become lists


def _shown(value: Any) -> str:
    return "unset" if value is None else json.dumps(value, sort_keys=True)

# An image folder's identity keeps its file list (path, size, modification time) up to this many files, so that a
# changed folder can be told file by file; above it, per-class counts and digests only (the list would be large).
FILE_LIST_LIMIT = 50_000


def _digest(lines: Sequence[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def _image_files(dataset: Any) -> tuple[str, list[str]] | None:
    """``(root, paths)`` of a dataset that reads image files through a reader with ``samples`` (None otherwise)."""
    reader = getattr(dataset, "reader", None)
    samples = getattr(reader, "samples", None)
    if not isinstance(samples, (list, tuple)) or not samples:
        return None
    if not all(isinstance(s, (list, tuple)) and s and isinstance(s[0], (str, os.PathLike)) for s in samples):
        return None
    paths = [os.fspath(s[0]) for s in samples]
    root = getattr(reader, "root", None)
    root = os.fspath(root) if isinstance(root, (str, os.PathLike)) and root else os.path.commonpath(paths)
    return root, paths


def _folder_identity(root: str, paths: list[str]) -> dict[str, Any]:
    entries: dict[str, list[int]] = {}
    for path in paths:
        try:
            st = os.stat(path)
            entries[os.path.relpath(path, root).replace(os.sep, "/")] = [st.st_size, st.st_mtime_ns]
        except OSError:
            entries[os.path.relpath(path, root).replace(os.sep, "/")] = [-1, -1]  # unreadable now: a difference
    lines = {rel: f"{rel}\t{size}\t{mtime}" for rel, (size, mtime) in entries.items()}
    by_class: dict[str, list[str]] = {}
    for rel in sorted(entries):
        by_class.setdefault(rel.split("/")[0] if "/" in rel else "", []).append(lines[rel])
    identity: dict[str, Any] = {
        "kind": "image_folder", "root": root, "count": len(entries),
        "digest": _digest([lines[rel] for rel in sorted(entries)]),
        "classes": {c: {"count": len(v), "digest": _digest(v)} for c, v in sorted(by_class.items())},
    }
    if len(entries) <= FILE_LIST_LIMIT:
        identity["files"] = dict(sorted(entries.items()))
    return identity


def dataset_identity(dataset: Dataset) -> dict[str, Any]:
    """What a dataset holds, as JSON data: an image folder's files (path, size, modification time; contents are not
    read), a ``Subset``'s indices and source, digits' images, else the dataset's type, split and size."""
    if isinstance(dataset, IndexedDataset):
        return dataset_identity(dataset.dataset)
    if isinstance(dataset, Subset):
        indices = [int(i) for i in dataset.indices]
        return {"kind": "subset", "size": len(indices), "digest": _digest([",".join(map(str, indices))]),
                "of": dataset_identity(dataset.dataset)}
    if isinstance(dataset, DigitsDataset):
        return {"kind": "digits", "split": dataset.split, "size": len(dataset),
                "digest": _digest([",".join(map(str, dataset.source_indices))])}
    files = _image_files(dataset)
    if files is not None:
        return _folder_identity(*files)
    identity: dict[str, Any] = {"kind": type(dataset).__name__, "size": len(dataset)}
    reader = getattr(dataset, "reader", None)
    split = getattr(reader, "split", None) or getattr(dataset, "split", None)
    if isinstance(split, str):
        identity["split"] = split
    if isinstance(getattr(dataset, "train", None), bool):  # torchvision's train/test switch
        identity["train"] = dataset.train
    fingerprint = getattr(getattr(reader, "dataset", None), "_fingerprint", None)  # a Hugging Face dataset's
    if isinstance(fingerprint, str):
        identity["fingerprint"] = fingerprint
    return identity


def _listed(names: Sequence[str], root: str, limit: int = 5) -> str:
    shown = ", ".join(os.path.join(root, n) if root else n for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _folder_differences(saved: dict[str, Any], now: dict[str, Any], what: str) -> list[str]:
    root = now.get("root", "")
    more = int(now.get("count", 0)) - int(saved.get("count", 0))
    head = (f"the image folder {root!r} of {what} has {abs(more)} file(s) {'more' if more > 0 else 'fewer'} than "
            "when the run started" if more else
            f"the image folder {root!r} of {what} holds as many files as when the run started, but not the same")
    old, new = saved.get("files"), now.get("files")
    if isinstance(old, dict) and isinstance(new, dict):
        added = sorted(set(new) - set(old))
        removed = sorted(set(old) - set(new))
        changed = sorted(k for k in set(old) & set(new) if list(old[k]) != list(new[k]))
        parts = [f"{label} {_listed(names, root)}" for label, names in
                 (("added:", added), ("removed:", removed), ("changed (size or time):", changed)) if names]
        return [head + ("; " + "; ".join(parts) if parts else "")]
    old_c, new_c = saved.get("classes", {}), now.get("classes", {})
    parts = []
    for c in sorted(set(old_c) | set(new_c)):
        a, b = old_c.get(c, {"count": 0}), new_c.get(c, {"count": 0})
        if a != b:
            parts.append(f"{c or '.'}: {a.get('count', 0)} -> {b.get('count', 0)} files"
                         if a.get("count") != b.get("count") else f"{c or '.'}: other files")
    return [head + ("; by class: " + ", ".join(parts[:10]) + (", ..." if len(parts) > 10 else "") if parts else "")]


def dataset_differences(saved: Any, now: dict[str, Any], what: str = "the training data") -> list[str]:
    """How the data behind ``now`` differs from ``saved`` (two :func:`dataset_identity` results), in words.

    Example:
        >>> a = {"kind": "digits", "split": "train", "size": 1437, "digest": "x"}
        >>> dataset_differences(a, dict(a, size=1400, digest="y"))
        ['the training data (digits): digest x -> y, size 1437 -> 1400']
    """
    if saved == now:
        return []
    if not isinstance(saved, dict) or saved.get("kind") != now.get("kind"):
        kind = saved.get("kind") if isinstance(saved, dict) else None
        return [f"{what} was {kind or 'unrecorded'} data, now {now.get('kind')}"]
    if now["kind"] == "subset":
        inner = dataset_differences(saved.get("of"), now.get("of", {}), what)
        return inner or [f"the training subset of {what} holds other images ({saved.get('size')} -> {now.get('size')} "
                         "samples) though its settings are the same: the labels of the data changed"]
    if now["kind"] == "image_folder":
        return _folder_differences(saved, now, what)
    changes = [f"{k} {saved.get(k)} -> {now.get(k)}" for k in sorted(set(saved) | set(now))
               if k != "kind" and saved.get(k) != now.get(k)]
    return [f"{what} ({now['kind']}): " + ", ".join(changes)]

_IDENTITY_ATTR = "_timm_remem_run_identity"


def _library_versions() -> dict[str, str]:
    import torchvision  # timm's training transforms are torchvision's (timm depends on it)

    return {"timm-remem": __version__, "timm": timm.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__}


def _teacher_identity(cfg: TrainConfig) -> dict[str, Any] | None:
    """The files (size, modification time) of a distillation teacher given as a folder."""
    name = getattr(cfg, "teacher", None)
    if not isinstance(name, str):
        return None
    folder = Path(name[len("local-dir:"):] if name.startswith("local-dir:") else name)
    if not folder.is_dir():
        return None  # a timm or hf-hub: name; the name is a setting (pin a revision with name@revision)
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file():
            st = p.stat()
            files[p.name] = [st.st_size, st.st_mtime_ns]
    return {"folder": str(folder), "files": files}


def run_identity(cfg: TrainConfig, train: Any, val: Any, *, num_classes: int, img_size: int) -> dict[str, Any]:
    """What a run computes from, as JSON data: the settings less :data:`RESUME_FREE`, the resolved class count and
    input size, the training and validation data, a teacher folder's files and the library versions.

    Example:
        >>> from timm_remem.data import create_dataset
        >>> from timm_remem.train import FinetuneConfig
        >>> train, val = (create_dataset("digits", split=s, img_size=8) for s in ("train", "val"))
        >>> ident = run_identity(FinetuneConfig(model="test_vit"), train, val, num_classes=10, img_size=8)
        >>> sorted(ident), ident["data"]["train"]["size"]
        (['data', 'format', 'resolved', 'settings', 'teacher', 'versions'], 1437)
    """
    settings = {k: v for k, v in _as_saved(cfg.to_dict()).items() if k not in RESUME_FREE}
    return {"format": IDENTITY_FORMAT, "settings": settings,
            "resolved": {"num_classes": int(num_classes), "img_size": int(img_size)},
            "data": {"train": dataset_identity(train), "val": dataset_identity(val)},
            "teacher": _teacher_identity(cfg), "versions": _library_versions()}


def identity_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """What differs between two :func:`run_identity` records, one line each (the settings are not compared here)."""
    lines: list[str] = []
    old_v, new_v = saved.get("versions") or {}, now.get("versions") or {}
    lines += [f"{lib} {old_v.get(lib, 'unrecorded')} -> {new_v.get(lib, 'not installed')}"
              for lib in sorted(set(old_v) | set(new_v)) if old_v.get(lib) != new_v.get(lib)]
    # the settings are compared with the checkpoint's own (check_resume_config, which reports them first)
    old, new = saved.get("resolved") or {}, now.get("resolved") or {}
    lines += [f"{k}: {_shown(old.get(k))} -> {_shown(new.get(k))}" for k in sorted(set(old) | set(new))
              if old.get(k) != new.get(k)]
    old_d, new_d = saved.get("data") or {}, now.get("data") or {}
    for split, what in (("train", "the training data"), ("val", "the validation data")):
        if split in new_d:
            lines += dataset_differences(old_d.get(split), new_d[split], what)
    old_t, new_t = saved.get("teacher"), now.get("teacher")
    if old_t != new_t:
        if old_t and new_t and old_t.get("folder") == new_t.get("folder"):
            changed = sorted(n for n in set(old_t["files"]) | set(new_t["files"])
                             if old_t["files"].get(n) != new_t["files"].get(n))
            lines.append(f"the teacher folder {new_t['folder']!r} changed since the run started: "
                         f"{', '.join(changed)} (other files, sizes or modification times)")
        else:
            lines.append(f"the teacher was {(old_t or {}).get('folder', 'not a folder')}, now "
                         f"{(new_t or {}).get('folder', 'not a folder')}")
    return lines


def attach_identity(cfg: TrainConfig, identity: Mapping[str, Any]) -> None:
    """Hand a run's identity to the loop, which sees only the config: it rides on this object (not on a copy, nor in
    its serialisation)."""
    object.__setattr__(cfg, _IDENTITY_ATTR, dict(identity))


def attached_identity(cfg: TrainConfig) -> dict[str, Any] | None:
    """The identity :func:`attach_identity` gave ``cfg`` (None: ``fit`` called alone)."""
    return getattr(cfg, _IDENTITY_ATTR, None)


def _recorded_identity(checkpoint: Path, out: Path) -> tuple[Path, Any]:
    """The identity file of the run a checkpoint belongs to (``RUN/train-state/step-N``), else of ``out``."""
    run = checkpoint.parent.parent if checkpoint.parent.name == STATE_DIR else out
    path = run / IDENTITY_FILE
    try:
        return path, json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return path, None
    except (OSError, ValueError):
        return path, {}


def check_run_identity(cfg: TrainConfig, checkpoint: Path, out: Path) -> None:
    """Refuse to resume from ``checkpoint`` when the run's data or library versions changed since it started (a
    warning instead with ``resume_mismatch="allow"``, or when the run recorded no identity).

    Raises:
        ConfigError: Naming each difference, and the three ways on.
    """
    now = attached_identity(cfg)
    if now is None:
        return
    path, saved = _recorded_identity(checkpoint, out)
    if saved is None:
        log.warning("resuming %s: its run recorded no %s (written by an older timm-remem), so changed data cannot "
                    "be detected", checkpoint, IDENTITY_FILE)
        return
    diffs = identity_differences(saved if isinstance(saved, dict) else {}, now)
    if not diffs:
        return
    listed = "".join(f"\n  - {d}" for d in diffs)
    if cfg.resume_mismatch == "allow":
        log.warning("resuming %s although what it is computed from changed since the run started "
                    "(resume_mismatch='allow'):%s", checkpoint, listed)
        return
    raise ConfigError(
        f"cannot resume {str(checkpoint)!r}: what the run is computed from changed since it started (recorded in "
        f"{str(path)!r}):{listed}\nResume with the data and libraries the run started with, start a fresh run in "
        "another output folder, or resume anyway with resume_mismatch='allow' (--resume-mismatch allow): the run "
        "then goes on with what changed and is no longer what an uninterrupted run would have computed"
    )
