"""One run per output folder: the lock a training run holds on its ``output`` folder while it runs.

``OUTPUT/.timm-remem.lock`` holds the run's pid, host, start time and command under an exclusive ``flock``; a second
run refuses, naming the holder. The OS releases the ``flock`` of a dead process, so a killed run's lock file is stale
and taken over. Without ``flock`` the pid decides (a holder on another host counts as alive). The lock is re-entrant
within a process; under torchrun rank 0 takes it. Taking it claims the folder (:func:`timm_remem._io.claim_output_dir`);
a folder this lock created or adopted is left as found when the run wrote only :data:`RUN_BOOKKEEPING`.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .._io import OutputClaim, abandon_output_dir, claim_output_dir, mark_output_dir
from ..errors import TrainingError

try:  # POSIX; on other platforms the lock falls back to the pid check alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["LOCK_FILE", "CONFIG_FILE", "IDENTITY_FILE", "STATE_DIR", "RUN_BOOKKEEPING", "OutputLock", "read_lock",
           "describe_holder"]

_log = logging.getLogger(__name__)

LOCK_FILE = ".timm-remem.lock"
CONFIG_FILE = "config.json"  # the run's settings
STATE_DIR = "train-state"  # the run's resumable training checkpoints (see timm_remem.train.resume)
IDENTITY_FILE = "run-identity.json"  # what the run is computed from (see timm_remem.train.identity.run_identity)
# What a run writes before its first training step (timm_remem.train.resume.prepare_output).
RUN_BOOKKEEPING = (CONFIG_FILE, IDENTITY_FILE)
# How long a refused run waits for the holder's details to appear (the holder writes them right after its flock).
_READ_WAIT_S = 2.0
# Locks this process holds: resolved folder -> [OutputLock, nesting depth] (the lock is re-entrant in a process).
_HELD: dict[str, list[Any]] = {}


def read_lock(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The holder recorded in ``folder``'s lock file (pid, host, started, command); None without one, {} unreadable."""
    path = Path(folder) / LOCK_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError:
        return {}
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def describe_holder(holder: dict[str, Any] | None) -> str:
    """``pid P on host H, started T (command: C)``: the holder of a lock in words."""
    if not holder or "pid" not in holder:
        return "a run whose details are not readable yet"
    text = f"pid {holder.get('pid')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"
    if holder.get("command"):
        text += f" (command: {holder['command']})"
    return text


def _this_holder() -> dict[str, Any]:
    command = " ".join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]])
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command[:300]}


def _try_flock(fd: int) -> bool | None:
    """True: the exclusive flock is ours; False: another process holds it; None: this file system has no flock."""
    if fcntl is None:  # pragma: no cover - Windows
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
            return False
        return None  # ENOLCK, EOPNOTSUPP, EINVAL: no flock here; the pid check decides
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a releasing holder unlinks it; then try again)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


class OutputLock:
    """The lock of one run on its output folder (a context manager; re-entrant within a process).

    ``kind`` is what the folder is for (see :func:`timm_remem._io.claim_output_dir`). :meth:`acquire` raises
    ConfigError when the folder is not timm-remem's to write, TrainingError when another live run holds it (named)
    or the lock file cannot be created.
    """

    def __init__(self, folder: str | os.PathLike, *, kind: str = "run") -> None:
        self.folder = Path(folder)
        self.kind = kind
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None
        self._key: str | None = None
        self._claim: OutputClaim | None = None
        self._taken = 0  # acquisitions of this object not yet released

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock (or refuse, naming the holder); a stale lock left by a dead run is taken over."""
        # the ownership check; the marker waits until the lock is ours (a refused run writes nothing)
        claim = claim_output_dir(self.folder, self.kind, mark=False)
        self._key = str(self.folder.resolve())
        if self._key in _HELD:  # this process holds it already (a recipe, then fit)
            _HELD[self._key][1] += 1
            self._taken += 1
            return
        for _ in range(10):  # a holder releasing at this moment unlinks the file: open the new one
            fd = self._open()
            got = _try_flock(fd)
            if got is False:
                os.close(fd)
                self._refuse(self._wait_for_holder())
            previous = read_lock(self.folder)
            if got is None and previous and self._alive(previous):
                os.close(fd)
                self._refuse(previous)
            if not _same_file(fd, self.path):
                os.close(fd)
                continue
            try:
                mark_output_dir(self.folder, self.kind)  # the folder is this run's from now on
            except OSError as e:
                os.close(fd)
                raise TrainingError(f"cannot write into the output folder {str(self.folder)!r} ({e.strerror or e}); "
                                    "make it writable or choose another --output") from e
            self._write(fd)
            self._fd = fd
            self._claim = claim
            _HELD[self._key] = [self, 1]
            self._taken += 1
            if previous:
                _log.info("took over the stale lock of %s: a run that ended without releasing %s",
                          describe_holder(previous), self.path)
            return
        raise TrainingError(f"could not take the lock {str(self.path)!r}: it kept changing (another run starting "
                            "and ending on this folder); choose another --output")

    def release(self) -> None:
        """Release the lock (at the outermost level of nesting) and delete the lock file."""
        if self._taken == 0:
            return
        self._taken -= 1
        entry = _HELD.get(self._key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] > 0:
            return
        del _HELD[self._key]
        owner = entry[0]
        fd, owner._fd = owner._fd, None
        if fd is None:
            return
        claim, owner._claim = owner._claim, None
        try:
            if _same_file(fd, owner.path):
                # while still holding the flock (a run waiting on it then opens a new file): a run that never
                # started leaves the folder as it found it, else the lock file alone goes
                bookkeeping = (*RUN_BOOKKEEPING, LOCK_FILE) if owner.kind == "run" else (LOCK_FILE,)
                if claim is None or not abandon_output_dir(claim, bookkeeping):
                    owner.path.unlink()
        except OSError:
            pass
        finally:
            os.close(fd)

    def _open(self) -> int:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            return os.open(self.path, flags, 0o666)  # the user's umask applies (0644 by default)
        except OSError as e:
            hint = "it is a symlink; remove it" if e.errno == errno.ELOOP else "check the folder's permissions"
            raise TrainingError(f"cannot create the run lock {str(self.path)!r} ({e.strerror}): {hint}, or choose "
                                "another --output") from e

    def _write(self, fd: int) -> None:
        # Written in place, not by rename: the flock belongs to this very file. Readers retry a partial read.
        data = (json.dumps(_this_holder(), sort_keys=True) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def _alive(self, holder: dict[str, Any]) -> bool:
        """Whether the holder's process exists (one on another host, or of another user, counts as alive)."""
        if holder.get("host") != socket.gethostname():
            return True  # cannot tell from here
        pid = holder.get("pid")
        if pid == os.getpid() or not isinstance(pid, int) or pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:  # PermissionError: another user's process
            pass
        return True

    def _wait_for_holder(self) -> dict[str, Any] | None:
        deadline = time.monotonic() + _READ_WAIT_S
        while True:
            holder = read_lock(self.folder)
            if (holder and "pid" in holder) or time.monotonic() > deadline:
                return holder
            time.sleep(0.05)

    def _refuse(self, holder: dict[str, Any] | None) -> None:
        other_host = bool(holder) and holder.get("host") not in (None, socket.gethostname())
        gone = (f"; if that run is gone (it ran on another host, so this one cannot check), delete "
                f"{str(self.path)!r}") if other_host else ""
        raise TrainingError(
            f"output folder {str(self.folder)!r} is in use by another run: {describe_holder(holder)}. Wait for it "
            f"to finish or choose another --output{gone}"
        )
