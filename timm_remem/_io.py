"""Atomic file writes, and the one check of which folders timm-remem may write into (``docs/guarantees.md``).

Every write goes to a temporary sibling that is fsynced and renamed over the target: it gets the umask's
permissions, a symlink at the target is replaced (never written through), and a failed write keeps the previous
file and raises one ``OSError`` naming the path. :func:`claim_output_dir` decides whether a folder is ours.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.repocard import metadata_load
from safetensors import SafetensorError
from safetensors.torch import save_file

from ._state_tree import FORMAT as _CHECKPOINT_FORMAT
from ._version import __version__
from .errors import ConfigError

__all__ = ["atomic_write_file", "atomic_write_text", "atomic_write_json",
           "atomic_write_safetensors", "atomic_replace_dir", "write_into", "fsync_dir", "default_file_mode",
           "file_sha256", "os_error_reason", "OWNER_FILE", "OUTPUT_KINDS", "OutputClaim", "claim_output_dir",
           "mark_output_dir", "abandon_output_dir"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """``0o666`` less the process umask (what ``open(path, "w")`` would give)."""
    return 0o666 & ~_umask()


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives a power cut (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def os_error_reason(err: BaseException) -> str:
    """The reason of the first ``OSError`` in an exception's chain, without the paths wrapped around it.

    Example:
        >>> os_error_reason(OSError(28, "No space left on device"))
        'No space left on device'
    """
    while isinstance(err.__cause__, OSError):
        err = err.__cause__
    return (err.strerror if isinstance(err, OSError) and err.strerror else None) or str(err)


def _with_path(err: OSError, path: Path, what: str) -> OSError:
    if not err.errno:
        return OSError(f"could not write {what} {str(path)!r}: {err}")
    return type(err)(err.errno, f"could not write {what} {str(path)!r}: {err.strerror or err}")


def atomic_write_file(path: str | os.PathLike, write: Callable[[Path], Any], *, fsync: bool = True) -> Path:
    """Let ``write(tmp)`` fill a temporary sibling of ``path``, then rename it over ``path`` atomically.

    For writers that take a file name (``safetensors.torch.save_file``, ``Image.save``). Returns the path.

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


def _safetensors_os_error(err: Exception) -> OSError:
    """safetensors' write error (a ``SafetensorError`` carrying Rust's ``Os { code: 28, ... }``) as an ``OSError``."""
    text = str(err)
    found = re.search(r"code:\s*(\d+)", text)
    code = int(found.group(1)) if found else errno.EIO
    return OSError(code, os.strerror(code) if found else f"safetensors could not write the file ({text})")


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

    def write(tmp: Path) -> None:
        try:
            save_file(savable, str(tmp), metadata={"format": "pt"})
        except SafetensorError as err:
            raise _safetensors_os_error(err) from err

    return atomic_write_file(path, write, fsync=fsync)


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns the path."""
    data = text.encode("utf-8")
    return atomic_write_file(path, lambda tmp: tmp.write_bytes(data), fsync=fsync)


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int = 1, fsync: bool = True) -> Path:
    """Write ``data`` as sorted, indented JSON (NaN refused) atomically; returns the path."""
    text = json.dumps(data, indent=indent, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write_text(path, text, fsync=fsync)


def atomic_replace_dir(write: Callable[[Path], Any], path: str | os.PathLike) -> Path:
    """Run ``write(tmp_folder)`` into a hidden sibling folder, then swap it in for ``path``; returns ``path``.

    The old folder is moved aside (``.old-<name>``) and removed only once the new one is in place, or put back when
    the new one cannot be moved in. Everything inside gets the umask's permissions, whoever wrote it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())
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
    """Give everything under ``folder`` the umask's permissions (timm's ``save_for_hf`` may leave 0600 behind)."""
    files, dirs = default_file_mode(), 0o777 & ~_umask()
    for root, subdirs, names in os.walk(folder):
        for name, mode in [(n, files) for n in names] + [(n, dirs) for n in subdirs]:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, mode)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _move_in(src: Path, dst: Path) -> None:
    """Rename ``src`` over ``dst`` without following a symlink at ``dst`` (a folder there is replaced whole)."""
    if (src.is_dir() and not src.is_symlink()) or (dst.is_dir() and not dst.is_symlink()):
        _remove(dst)
    os.replace(src, dst)  # a symlink at dst is replaced itself, its target never opened


def write_into(folder: str | os.PathLike, write: Callable[[Path], Any], *, last: Collection[str] = ()) -> list[Path]:
    """Let ``write(tmp)`` fill a fresh private folder inside ``folder``, then rename what it wrote into ``folder``.

    For writers that open their own files in a folder (timm's ``save_for_hf``, peft's ``save_pretrained``): nothing
    is written through a symlink waiting in ``folder`` (it is replaced, its target left alone). The names in
    ``last`` are renamed in last (a ``config.json`` that says the folder is complete). Returns the files in place.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> (d / "elsewhere.txt").write_text("keep")
        4
        >>> (d / "a.txt").symlink_to(d / "elsewhere.txt")
        >>> [p.name for p in write_into(d, lambda tmp: (tmp / "a.txt").write_text("new"))]
        ['a.txt']
        >>> (d / "a.txt").is_symlink(), (d / "a.txt").read_text(), (d / "elsewhere.txt").read_text()
        (False, 'new', 'keep')
    """
    folder = Path(folder)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{_OURS_PREFIX}-staging-", dir=folder))
    except OSError as err:
        raise _with_path(err, folder, "folder") from err
    try:
        try:
            write(tmp)
        except SafetensorError as err:
            raise _safetensors_os_error(err) from err
        _umask_permissions(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: (n in last, n))
        for name in names:
            if (tmp / name).is_file() and not (tmp / name).is_symlink():
                with open(tmp / name, "rb+") as f:
                    os.fsync(f.fileno())
        for name in names:
            _move_in(tmp / name, folder / name)
        fsync_dir(folder)
        return [folder / name for name in names]
    except OSError as err:
        raise _with_path(err, folder, "folder") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


OWNER_FILE = ".timm-remem"
# What a folder is for (_KIND_WORDS says it in words). Exports carry no marker file: their files are the mark.
OUTPUT_KINDS = ("run", "select", "study", "export", "analysis")
_OURS_PREFIX = ".timm-remem"  # the marker, the run lock (.timm-remem.lock) and write_into's private folders
_KIND_WORDS = {"run": "a training run folder (finetune / distill)", "select": "a select folder",
               "study": "a study folder", "export": "a model folder (save_pretrained / a run's export)",
               "analysis": "an analysis folder (timm-remem analyze)"}
# Every file a model folder (an export) may hold, of either kind (merged checkpoint or peft adapter).
EXPORT_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "README.md", "remem.json",
                "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# Sub-folders a kind writes into: they must be real folders, never symlinks (nothing is written through one).
_SUBFOLDERS = {"run": ("train-state", "checkpoints"), "select": (), "study": ("runs",), "export": (), "analysis": ()}


@dataclass(frozen=True)
class OutputClaim:
    """What :func:`claim_output_dir` found and did: ``created`` the folder, or found it ``fresh`` (empty)."""

    path: Path
    kind: str
    created: bool
    fresh: bool


def _read_json(path: Path) -> Any:
    """The JSON in a regular file (not a symlink), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            return json.loads(f.read(1 << 20).decode("utf-8"))
    except (OSError, ValueError):
        return None


def _marker_kind(folder: Path) -> str | None:
    """The kind the folder's marker names; ``""`` for a marker that names none (made by hand); None: no marker."""
    marker = folder / OWNER_FILE
    if marker.is_symlink() or not marker.is_file():
        return None
    data = _read_json(marker)
    if isinstance(data, dict) and data.get("owner") == "timm-remem" and data.get("kind") in OUTPUT_KINDS:
        return data["kind"]
    return ""  # an empty (or hand-written) marker: the user says the folder is timm-remem's


def _written_by_us(folder: Path, kind: str) -> bool:
    """Whether a folder without a marker holds what only timm-remem writes for ``kind`` (older runs had no marker)."""
    if kind == "run":
        state = folder / "train-state"
        if state.is_symlink() or not state.is_dir():
            return False
        manifests = (_read_json(p / "manifest.json") for p in state.glob("step-*") if p.is_dir() and not p.is_symlink())
        return any(isinstance(m, dict) and m.get("format") == _CHECKPOINT_FORMAT for m in manifests)
    if kind == "select":
        data = _read_json(folder / "select.json")
        return isinstance(data, dict) and {"rows", "best"} <= set(data)
    if kind == "study":
        return isinstance(_read_json(folder / "study-settings.json"), dict)
    if kind == "analysis":
        report = _read_json(folder / "report.json")
        return isinstance(report, dict) and "timm_remem_version" in report
    data = _read_json(folder / "config.json")
    if isinstance(data, dict) and ("remem" in data or "remem_student" in data):
        return True
    remem = _read_json(folder / "remem.json")
    if isinstance(remem, dict) and "remem" in remem:
        return True
    # an adapter folder without factors: only export files, and our card (its metadata tags it "remem")
    card = folder / "README.md"
    names = {n for n in os.listdir(folder) if not n.startswith(_OURS_PREFIX)}
    if not names <= set(EXPORT_FILES) or card.is_symlink() or not card.is_file():
        return False
    with contextlib.suppress(Exception):  # a card that does not parse is not ours
        return "remem" in (metadata_load(card) or {}).get("tags", [])
    return False


def _shown(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _wording(what: str) -> tuple[str, str]:
    """How messages name the folder (``output folder``, ``folder``) and an example of a good value."""
    if what == "output":
        return "output folder", "e.g. output='runs/teacher' (--output runs/teacher)"
    if what.startswith("--"):  # a command's own flag
        return "output folder", f"e.g. {what} {what.lstrip('-')}-new"
    return "folder", f"e.g. {what}='teachers/vit-remem'"


def _foreign(text: str, what: str, kind: str, others: list[str]) -> ConfigError:
    noun = _wording(what)[0]
    return ConfigError(
        f"{noun} {text!r} is not empty and not a timm-remem {kind} folder: it holds {_shown(others)}. "
        "timm-remem writes only into a folder it created, an empty one, or one it marked as its own (a "
        f"{OWNER_FILE} file), so that nothing of yours is overwritten: choose another {noun} (a new name is "
        "created for you), or empty this one"
    )


def claim_output_dir(path: str | os.PathLike, kind: str, *, create: bool = True, mark: bool = True,
                     what: str = "output") -> OutputClaim:
    """The one check every command makes before it writes into a folder: is the folder ours?

    Yes when it does not exist (it is created), is empty (``.timm-remem*`` files do not count), carries a
    ``.timm-remem`` marker of the same ``kind`` (one of :data:`OUTPUT_KINDS`), or, without a marker, holds what
    only timm-remem writes for that kind (folders written before the marker existed). ``mark`` writes the marker
    into a created or adopted folder (not an ``"export"``: its files are its mark). With ``create=False`` nothing is
    created or written. ``what`` names the option in messages (``"output"``, ``"path"``).

    Raises:
        ConfigError: ``path`` is empty (the current folder), a file, a dangling symlink, a non-empty folder that is
            not timm-remem's, one marked for another kind, a sub-folder that is a symlink, or cannot be created.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> claim_output_dir(d / "run", "run").created, (d / "run" / OWNER_FILE).is_file()
        (True, True)
        >>> _ = (d / "mine").mkdir(), (d / "mine" / "notes.txt").write_text("x")
        >>> claim_output_dir(d / "mine", "run")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        timm_remem.errors.ConfigError: output folder '...mine' is not empty and not a timm-remem run folder: ...
    """
    if kind not in OUTPUT_KINDS:
        raise ConfigError(f"kind must be one of {OUTPUT_KINDS}, got {kind!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"{what} must be a folder path, got {type(path).__name__} {path!r}")
    text = os.fspath(path)
    noun, example = _wording(what)
    if not str(text).strip():
        raise ConfigError(f"{what} is empty ({text!r}), which would write into the current folder: name the folder "
                          f"to write, {example}")
    folder = Path(text)
    if folder.is_symlink() and not folder.exists():
        raise ConfigError(f"{noun} {text!r} is a symlink to a folder that does not exist; point it at an existing "
                          f"folder or choose another {noun}")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{what} {text!r} is a file, not a folder; choose a folder (it is created if missing)")
    created = False
    if not folder.exists():
        if not create:
            return OutputClaim(folder, kind, created=False, fresh=True)
        try:
            folder.mkdir(parents=True)
            created = True
        except FileExistsError:
            pass  # made by someone else this very moment: checked below like any existing folder
        except OSError as e:
            raise ConfigError(f"cannot create the {noun} {text!r} ({e.strerror or e}); choose another "
                              f"{noun}") from e
    fresh = created
    if not created:
        try:
            names = sorted(os.listdir(folder))
        except OSError as e:
            raise ConfigError(f"cannot read the {noun} {text!r} ({e.strerror or e}); choose another "
                              f"{noun}") from e
        owner = _marker_kind(folder)
        if owner:
            if owner != kind:
                raise ConfigError(f"{noun} {text!r} is {_KIND_WORDS[owner]} (its {OWNER_FILE} marker says so), "
                                  f"not {_KIND_WORDS[kind]}: choose another {noun}")
        elif owner is None:
            others = [n for n in names if not n.startswith(_OURS_PREFIX)]
            fresh = not others
            if others and not _written_by_us(folder, kind):
                raise _foreign(text, what, kind, others)
    for name in _SUBFOLDERS[kind]:
        if (folder / name).is_symlink():
            raise ConfigError(f"{str(folder / name)!r} is a symlink; timm-remem never writes through a symlink: make "
                              f"it a real folder, or choose another {noun}")
    if mark and create and (created or fresh or _marker_kind(folder) is None):
        try:
            mark_output_dir(folder, kind)
        except OSError as e:
            raise ConfigError(f"cannot write into the {noun} {text!r} ({os_error_reason(e)}); make it writable or "
                              f"choose another {noun}") from e
    return OutputClaim(folder, kind, created=created, fresh=fresh)


def check_real_folders(root: str | os.PathLike, path: str | os.PathLike) -> None:
    """Refuse a symlink at ``path`` or at any folder between ``root`` and it: nothing is written through one.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> (d / "runs").mkdir(); (d / "runs" / "plain").symlink_to(tempfile.mkdtemp())
        >>> check_real_folders(d, d / "runs" / "plain" / "seed-0")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        timm_remem.errors.ConfigError: '...plain' is a symlink; timm-remem never writes through a symlink: ...
    """
    root, path = Path(root), Path(path)
    for part in [*reversed(path.relative_to(root).parents), path.relative_to(root)]:
        if str(part) != "." and (root / part).is_symlink():
            raise ConfigError(f"{str(root / part)!r} is a symlink; timm-remem never writes through a symlink: make "
                              "it a real folder (or remove it)")


def mark_output_dir(path: str | os.PathLike, kind: str) -> None:
    """Write the ``.timm-remem`` marker into a folder :func:`claim_output_dir` accepted (none for exports)."""
    folder = Path(path)
    if kind == "export" or _marker_kind(folder) is not None:
        return
    atomic_write_json(folder / OWNER_FILE, {
        "owner": "timm-remem", "kind": kind, "version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })


def abandon_output_dir(claim: OutputClaim, leftovers: Collection[str] = ()) -> bool:
    """Undo a fresh claim whose work never started; returns whether it did.

    Only when the folder holds nothing but the marker and ``leftovers`` (our own bookkeeping, such as a run's
    ``config.json``): they are removed, and the folder if the claim created it.

    Example:
        >>> import tempfile, pathlib
        >>> claim = claim_output_dir(pathlib.Path(tempfile.mkdtemp()) / "run", "run")
        >>> abandon_output_dir(claim), claim.path.exists()
        (True, False)
    """
    if not claim.fresh:
        return False
    folder = claim.path
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    ours = {OWNER_FILE, *leftovers}
    if any(n not in ours for n in names) or any((folder / n).is_dir() and not (folder / n).is_symlink()
                                               for n in names):
        return False
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            (folder / name).unlink()
    if claim.created:
        with contextlib.suppress(OSError):
            folder.rmdir()
    return True
