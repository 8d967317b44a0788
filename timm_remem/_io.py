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
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

__all__ = ["atomic_write_file", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "atomic_write_safetensors", "atomic_replace_dir", "fsync_dir", "default_file_mode", "file_sha256"]


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


def atomic_write_file(path: str | os.PathLike, write: Callable[[Path], Any], *, fsync: bool = True) -> Path:
    """Let ``write(tmp)`` fill a temporary sibling of ``path``, then rename it over ``path`` atomically.

    For writers that take a file name (``safetensors.torch.save_file``, ``Image.save``). The result gets the
    umask's permissions; a symlink at ``path`` is replaced, never written through; on any failure the temporary is
    removed and the previous file is left as it was. Returns the path.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> atomic_write_file(d / "x.bin", lambda tmp: tmp.write_bytes(b"abc")).read_bytes()
        b'abc'
    """
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise _with_path(err, path, "file") from err
    tmp = Path(name)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically with the umask's permissions; returns the path."""
    return atomic_write_file(path, lambda tmp: tmp.write_bytes(data), fsync=fsync)


def _to_savable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors with no shared storage (safetensors refuses shared memory)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        ident = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if ident in seen or not t.is_contiguous() or t.storage_offset() or t.numel() * t.element_size() != ident[1]:
            t = t.clone(memory_format=torch.contiguous_format)
        elif t.untyped_storage().data_ptr() != 0:
            seen.add(ident)
        out[key] = t
    return out


def atomic_write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], *,
                             fsync: bool = True) -> Path:
    """Write ``tensors`` as one safetensors file atomically (tied or non-contiguous tensors are copied first).

    Example:
        >>> import tempfile, pathlib, torch
        >>> from safetensors.torch import load_file
        >>> p = atomic_write_safetensors(pathlib.Path(tempfile.mkdtemp()) / "t.safetensors", {"w": torch.ones(2)})
        >>> load_file(str(p))["w"].tolist()
        [1.0, 1.0]
    """
    savable = _to_savable(tensors)
    return atomic_write_file(path, lambda tmp: save_file(savable, str(tmp), metadata={"format": "pt"}), fsync=fsync)


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    either the old or the new folder (a leftover ``.old-<name>`` is the old one); when the new one cannot be moved
    in, the old one is put back. Everything inside gets the umask's permissions, whoever wrote it. Returns ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
        os.chmod(tmp, _default_dir_mode())
    except OSError as err:
        raise _with_path(err, path, "folder") from err
    old = path.parent / f".old-{path.name}"
    moved_aside = False
    try:
        write(tmp)
        _umask_permissions(tmp)
        if path.exists() or path.is_symlink():
            _remove(old)
            os.replace(path, old)
            moved_aside = True
        os.replace(tmp, path)
        if moved_aside:
            with contextlib.suppress(OSError):
                _remove(old)
        fsync_dir(path.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved_aside and not (path.exists() or path.is_symlink()):
            with contextlib.suppress(OSError):  # the new folder never arrived: put the old one back
                os.replace(old, path)
        if isinstance(err, OSError):
            raise _with_path(err, path, "folder") from err
        raise
    return path


def _umask_permissions(folder: Path) -> None:
    """Give every file and folder under ``folder`` the umask's permissions (third-party writers such as timm's
    ``save_for_hf`` may leave ``mkstemp``'s 0600 behind)."""
    files, dirs = default_file_mode(), _default_dir_mode()
    for root, subdirs, names in os.walk(folder):
        for name in names:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), files)
        for name in subdirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), dirs)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _default_dir_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask
