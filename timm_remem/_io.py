"""Atomic file writes: a file or folder is either the old one or the complete new one, never half written.

Every write goes to a temporary sibling that is flushed, fsynced and renamed over the target with ``os.replace``.
The result gets the user's umask (``0644`` by default, not ``mkstemp``'s ``0600``); a symlink at the target is
replaced by a regular file, never written through. An ``OSError`` (full disk, read-only folder) becomes one
``OSError`` naming the path; the previous file is left as it was.

Example:
    >>> import json, tempfile, pathlib
    >>> from timm_remem._io import atomic_write_json, atomic_write_text
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = atomic_write_json(d / "a.json", {"b": 1, "a": 2})
    >>> (d / "a.json").read_text()
    '{\\n "a": 2,\\n "b": 1\\n}\\n'
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json", "atomic_replace_dir", "fsync_dir",
           "default_file_mode"]


def default_file_mode() -> int:
    """``0o666`` less the process umask (what ``open(path, "w")`` would give)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a power cut (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _with_path(err: OSError, path: Path, what: str) -> OSError:
    reason = err.strerror or str(err)
    new = type(err)(err.errno, f"could not write {what} {str(path)!r}: {reason}") if err.errno else OSError(
        f"could not write {what} {str(path)!r}: {err}")
    return new


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically with the umask's permissions; returns the path."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _with_path(err, path, "file") from err
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)  # replaces a symlink itself, never its target
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise _with_path(err, path, "file") from err
        raise
    if fsync:
        fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int = 1, fsync: bool = True) -> Path:
    """Write ``data`` as sorted, indented JSON (NaN refused) atomically; returns the path."""
    text = json.dumps(data, indent=indent, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write_text(path, text, fsync=fsync)


def atomic_replace_dir(write: Callable[[Path], Any], path: str | os.PathLike) -> Path:
    """Run ``write(tmp_folder)`` into a hidden sibling folder, then swap it in for ``path``.

    The old folder (if any) is moved aside and removed only after the new one is in place, so a crash leaves
    either the old or the new folder (a leftover ``.old-<name>`` is the old one). Returns ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
        os.chmod(tmp, _default_dir_mode())
    except OSError as err:
        raise _with_path(err, path, "folder") from err
    try:
        write(tmp)
        if path.exists() or path.is_symlink():
            old = path.parent / f".old-{path.name}"
            if old.is_symlink() or old.is_file():
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            if old.is_symlink() or old.is_file():
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise _with_path(err, path, "folder") from err
        raise
    return path


def _default_dir_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask
