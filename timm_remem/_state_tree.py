"""The pieces of a :mod:`timm_remem.checkpoint`, without pickle: nested state split into tensors plus JSON, the
random-generator states, and the manifest that lists (and versions) every file the loader reads.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._version import __version__
from .errors import CheckpointError

__all__ = ["flatten_state", "unflatten_state", "get_rng_state", "set_rng_state", "read_manifest",
           "read_state_document", "check_version", "FORMAT", "FORMAT_VERSION", "MANIFEST", "REQUIRED_FILES",
           "OPTIONAL_FILES"]

FORMAT = "timm-remem-checkpoint"
FORMAT_VERSION = 1  # raise it when a change to the files would make an older timm-remem misread them
MANIFEST = "manifest.json"
REQUIRED_FILES = ("model.safetensors", "state.json", "state.safetensors")  # what load_checkpoint always reads
OPTIONAL_FILES = ("ema.safetensors",)  # read when present (and asked for)
_SHA256 = re.compile(r"[0-9a-f]{64}")


_MARKERS = ("__tensor__", "__tuple__", "__dict__", "__float__")


def flatten_state(obj: Any, prefix: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split nested dicts/lists/tuples into ``(JSON-able tree, {key: tensor})``; keys start with ``prefix``.

    Tensors become ``{"__tensor__": key}`` references; tuples, dicts with non-string keys and non-finite floats get
    tagged forms so that :func:`unflatten_state` restores them exactly.

    Raises:
        CheckpointError: A value of another type (it could only be stored by pickling it).

    Example:
        >>> tree, tensors = flatten_state({"state": {0: {"m": torch.zeros(2)}}, "betas": (0.9, 0.99)}, "opt")
        >>> list(tensors), tree["betas"]
        (['opt.state.0.m'], {'__tuple__': [0.9, 0.99]})
    """
    tensors: dict[str, torch.Tensor] = {}

    def enc(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            key = path
            n = 1
            while key in tensors:
                key = f"{path}#{n}"
                n += 1
            tensors[key] = value
            return {"__tensor__": key}
        if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if isinstance(value, tuple):
            return {"__tuple__": [enc(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [enc(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            if all(isinstance(k, str) and k not in _MARKERS for k in value):
                return {k: enc(v, f"{path}.{k}") for k, v in value.items()}
            return {"__dict__": [[enc(k, f"{path}.key"), enc(v, f"{path}.{k}")] for k, v in value.items()]}
        if type(value).__module__ == "numpy" and hasattr(value, "tolist"):  # NumPy scalars and arrays (RNG state)
            return enc(value.tolist(), path)
        raise CheckpointError(
            f"cannot store a value of type {type(value).__name__} at {path!r} in a checkpoint: checkpoints hold only "
            "tensors, numbers, strings, lists and dicts (no pickle); convert it (e.g. to a list) before saving"
        )

    return enc(obj, prefix), tensors


def unflatten_state(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`.

    Raises:
        CheckpointError: A tensor reference has no tensor (the checkpoint files do not belong together).

    Example:
        >>> import json
        >>> tree, tensors = flatten_state({"a": (1, torch.ones(1)), 3: float("inf")}, "x")
        >>> out = unflatten_state(json.loads(json.dumps(tree)), tensors)
        >>> out["a"][0], out[3]
        (1, inf)
    """

    def dec(value: Any) -> Any:
        if isinstance(value, list):
            return [dec(v) for v in value]
        if isinstance(value, dict):
            if len(value) == 1:
                (tag, inner), = value.items()
                if tag == "__tensor__":
                    if inner not in tensors:
                        raise CheckpointError(f"checkpoint tensor {inner!r} is missing from state.safetensors")
                    return tensors[inner]
                if tag == "__tuple__":
                    return tuple(dec(v) for v in inner)
                if tag == "__dict__":
                    return {dec(k): dec(v) for k, v in inner}
                if tag == "__float__":
                    return float(inner)
            return {k: dec(v) for k, v in value.items()}
        return value

    return dec(tree)


def get_rng_state() -> dict[str, Any]:
    """Current states of the Python, NumPy, torch CPU and CUDA random generators.

    Example:
        >>> s = get_rng_state(); a = torch.rand(1); set_rng_state(s); bool(torch.rand(1) == a)
        True
    """
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state(),
                             "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generator states saved by :func:`get_rng_state` (also after a JSON/safetensors round trip)."""

    def to_tuple(v: Any) -> Any:
        return tuple(to_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v

    if "python" in state:
        random.setstate(to_tuple(state["python"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(list(state["cuda"])[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.to("cpu", torch.uint8), i)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_version(version: Any, where: str, written_by: Any = None) -> None:
    """Refuse a checkpoint format version this timm-remem cannot read (newer, or not a positive integer).

    Example:
        >>> check_version(1, "manifest.json")
        >>> check_version(99, "manifest.json", "9.0")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        timm_remem.errors.CheckpointError: manifest.json is checkpoint format 99, written by timm-remem 9.0; ...
    """
    if not _is_int(version) or version < 1:
        raise CheckpointError(f"{where} has format_version {version!r}, expected a positive integer: the file is "
                              "malformed; resume from an earlier checkpoint")
    if version > FORMAT_VERSION:
        by = f"timm-remem {written_by}" if isinstance(written_by, str) else "a newer timm-remem"
        need = f"'timm-remem>={written_by}'" if isinstance(written_by, str) else "timm-remem"
        raise CheckpointError(
            f"{where} is checkpoint format {version}, written by {by}; this timm-remem {__version__} reads formats up "
            f"to {FORMAT_VERSION}: upgrade with pip install -U {need} to load it"
        )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise CheckpointError(f"lists {key!r} twice")
        seen[key] = value
    return seen


def _check_entry(name: Any, meta: Any) -> str | None:
    """What is wrong with one ``files`` entry of a manifest (None when it is fine)."""
    if not isinstance(name, str) or name in ("", ".", "..") or name != Path(name).name or "\\" in name or "\0" in name:
        return f"the file name {name!r} is not a plain name inside the checkpoint folder"
    if name == MANIFEST:
        return f"it lists itself ({MANIFEST!r})"
    if not isinstance(meta, dict) or not _is_int(meta.get("bytes")) or meta["bytes"] < 0:
        return f"the entry of {name!r} needs an integer 'bytes' >= 0, got {meta!r}"
    if not isinstance(meta.get("sha256"), str) or not _SHA256.fullmatch(meta["sha256"]):
        return f"the entry of {name!r} needs a 64-digit hex 'sha256', got {meta.get('sha256')!r}"
    return None


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and check ``folder/manifest.json``: keys and types, format version, and a file list that names each of
    :data:`REQUIRED_FILES` once, as a plain name with an integer size and a sha256 (compared by verify_checkpoint).

    Raises:
        CheckpointError: No manifest, or a malformed one (what is wrong is named); a newer format version.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / MANIFEST).write_text('{"format": 1}')
        >>> read_manifest(d)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        timm_remem.errors.CheckpointError: ...manifest.json' is malformed: it is not a timm-remem checkpoint ...
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {str(folder)!r} has no {MANIFEST}: the write did not finish (crash or kill during save); "
            "resume from an earlier complete checkpoint"
        )

    def malformed(why: str) -> CheckpointError:
        return CheckpointError(f"{str(path)!r} is malformed: {why}; resume from an earlier checkpoint")

    try:
        manifest = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except CheckpointError as e:
        raise malformed(str(e)) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{str(path)!r} is corrupt ({e}); resume from an earlier checkpoint") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise malformed(f"it is not a timm-remem checkpoint manifest (format {got!r}, expected {FORMAT!r})")
    missing = [k for k in ("format_version", "files") if k not in manifest]
    if missing:
        raise malformed(f"missing keys {missing}")
    check_version(manifest["format_version"], repr(str(path)), manifest.get("timm_remem"))
    for key in ("epoch", "step"):
        if key in manifest and not _is_int(manifest[key]):
            raise malformed(f"{key!r} must be an integer, got {manifest[key]!r}")
    files = manifest["files"]
    if not isinstance(files, dict):
        raise malformed(f"'files' must map file names to their size and sha256, got {type(files).__name__}")
    for name, meta in files.items():
        problem = _check_entry(name, meta)
        if problem:
            raise malformed(problem)
    unlisted = [name for name in REQUIRED_FILES if name not in files]
    if unlisted:
        raise malformed(f"it does not list {unlisted}, which the loader reads")
    return manifest


def read_state_document(folder: str | Path) -> dict[str, Any]:
    """``folder/state.json``, checked for its format version and the types of the fields the loader uses.

    Raises:
        CheckpointError: Unreadable, not JSON, a newer format version, or a field of the wrong type.
    """
    spath = Path(folder) / "state.json"
    try:
        document = json.loads(spath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{str(spath)!r} is unreadable ({e}); resume from an earlier one") from e
    if not isinstance(document, dict):
        raise CheckpointError(f"{str(spath)!r} is malformed: not a JSON object; resume from an earlier one")
    check_version(document.get("format_version", FORMAT_VERSION), repr(str(spath)))
    kinds = {"epoch": int, "step": int, "config": dict, "metrics": dict, "state": dict}
    for key, kind in kinds.items():
        value = document.get(key, kind())
        if not isinstance(value, kind) or isinstance(value, bool):
            what = "an integer" if kind is int else "a JSON object"
            raise CheckpointError(f"{str(spath)!r} is malformed: {key!r} must be {what}, got {value!r}; resume from "
                                  "an earlier one")
    return document
