"""One run per output folder (timm_remem.train.lock): a live holder refuses a second run, a dead one's lock is stale.

The other holders here are independent of the library: a plain Python child that takes the ``flock`` and writes its
details the documented way, or a lock file written by hand. The fault test at the end starts two real
``python -m timm_remem finetune`` runs on one folder.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from train_cases import VIT

import timm_remem.train.lock as lock_module
import timm_remem.train.loop as loop
from timm_remem.errors import TrainingError
from timm_remem.train import finetune_teacher
from timm_remem.train.lock import LOCK_FILE, OutputLock, read_lock

pytestmark = pytest.mark.usefixtures("one_thread")

# A holder written without timm_remem: flock the lock file, write pid/host/started, wait for stdin to close.
HOLDER = textwrap.dedent("""
    import fcntl, json, os, socket, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "2025-01-02T03:04:05+00:00",
                             "command": "holder"}).encode())
    print("held", flush=True)
    sys.stdin.read()
""")


@pytest.fixture
def held(tmp_path):
    """``tmp_path/run`` locked by a live child process (released when the test ends)."""
    folder = tmp_path / "run"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder / LOCK_FILE)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield folder, proc
    proc.stdin.close()
    proc.wait(timeout=30)


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(folder: Path, **holder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps({"started": "2025-01-02T03:04:05+00:00", "command": "old", **holder}))


def test_a_live_holder_refuses_a_second_run_naming_it(held):
    folder, proc = held
    before = (folder / LOCK_FILE).read_text()
    with pytest.raises(TrainingError, match=rf"in use by another run: pid {proc.pid} on host "
                                            rf"{socket.gethostname()}, started 2025-01-02T03:04:05"):
        OutputLock(folder).acquire()
    assert (folder / LOCK_FILE).read_text() == before  # the holder's lock is left alone


def test_a_run_on_a_held_folder_refuses_before_writing_anything(held):
    folder, proc = held
    with pytest.raises(TrainingError, match=f"pid {proc.pid}"):
        finetune_teacher(**VIT, epochs=1, limit_train_batches=1, output=str(folder))
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]  # no config.json, metrics or checkpoints


def test_the_lock_of_a_killed_run_is_stale_and_taken_over(tmp_path, caplog):
    folder = tmp_path / "run"
    dead = _dead_pid()
    _write_lock(folder, pid=dead, host=socket.gethostname())  # what a SIGKILLed run leaves (its flock is gone)
    with caplog.at_level(logging.INFO, logger="timm_remem.train"):
        with OutputLock(folder):
            assert read_lock(folder)["pid"] == os.getpid()
    assert f"took over the stale lock of pid {dead} on host {socket.gethostname()}" in caplog.text
    assert not (folder / LOCK_FILE).exists()


def test_the_lock_is_reentrant_in_one_process_and_released_at_the_outermost_level(tmp_path):
    outer, inner = OutputLock(tmp_path), OutputLock(tmp_path)
    with outer:
        with inner:  # e.g. a recipe holds it, then fit takes it again
            pass
        assert read_lock(tmp_path)["pid"] == os.getpid()  # still held by the outer one
    assert read_lock(tmp_path) is None


def test_a_run_holds_the_lock_while_it_trains_and_releases_it(tmp_path, monkeypatch):
    seen = []
    real = loop.write_metrics
    monkeypatch.setattr(loop, "write_metrics", lambda path, record: (seen.append(read_lock(tmp_path)),
                                                                      real(path, record)))
    finetune_teacher(**VIT, epochs=1, limit_train_batches=1, save_at=[], output=str(tmp_path))
    assert seen[0]["pid"] == os.getpid() and seen[0]["host"] == socket.gethostname()
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_lock_is_released_when_training_fails(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        assert read_lock(tmp_path)["pid"] == os.getpid()
        raise RuntimeError("failed inside the run")

    monkeypatch.setattr(loop, "train_step", fail)
    with pytest.raises(RuntimeError, match="failed inside the run"):
        finetune_teacher(**VIT, epochs=1, limit_train_batches=1, save_at=[], output=str(tmp_path))
    assert not (tmp_path / LOCK_FILE).exists()


@pytest.mark.parametrize(("alive", "host", "refused"), [
    pytest.param(True, None, True, id="live-pid-this-host"),
    pytest.param(False, None, False, id="dead-pid-this-host"),
    pytest.param(False, "elsewhere.example", True, id="other-host"),
])
def test_without_flock_the_pid_decides(tmp_path, monkeypatch, alive, host, refused):
    """On a file system without flock, a lock is stale when its pid no longer exists on this host."""
    monkeypatch.setattr(lock_module, "_try_flock", lambda fd: None)
    pid = os.getppid() if alive else _dead_pid()
    _write_lock(tmp_path, pid=pid, host=host or socket.gethostname())
    if refused:
        match = f"pid {pid} on host {host}.*delete" if host else f"pid {pid}"
        with pytest.raises(TrainingError, match=match):
            OutputLock(tmp_path).acquire()
    else:
        with OutputLock(tmp_path):
            assert read_lock(tmp_path)["pid"] == os.getpid()


def test_a_symlinked_lock_file_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).symlink_to(target)
    with pytest.raises(TrainingError, match="is a symlink; remove it"):
        OutputLock(tmp_path / "run").acquire()
    assert target.read_text() == "keep"


# ------------------------------------------------------------------------------------------------ the fault test

# Runs ``timm-remem ARGS`` but waits, before its first training step, until the file GATE exists: the second run is
# started and finishes while this one certainly holds the folder.
GATED = textwrap.dedent("""
    import os, sys, time
    import timm_remem.train.loop as loop
    from timm_remem.cli import main

    gate, real = sys.argv[1], loop.train_step

    def gated(*args, **kwargs):
        deadline = time.monotonic() + 300
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.05)
        return real(*args, **kwargs)

    loop.train_step = gated
    sys.exit(main(sys.argv[2:]))
""")


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))


def test_two_real_runs_on_one_output_folder(tmp_path):
    out, gate = tmp_path / "run", tmp_path / "go"
    args = ["finetune", "--model", "test_vit", "--img-size", "16", "--epochs", "2", "--limit-train-batches", "2",
            "--no-progress", "--output", str(out)]
    (tmp_path / "gated.py").write_text(GATED)
    first = subprocess.Popen([sys.executable, str(tmp_path / "gated.py"), str(gate), *args], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while (read_lock(out) or {}).get("pid") != first.pid:  # the first run holds the folder
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline, "the first run never took the lock"
        time.sleep(0.05)

    second = subprocess.run([sys.executable, "-m", "timm_remem", *args], env=_env(), capture_output=True, text=True,
                            timeout=240)
    assert first.poll() is None  # still running: the second one did not wait for it
    gate.touch()
    out_first, err_first = first.communicate(timeout=240)

    assert first.returncode == 0, err_first
    assert second.returncode != 0
    assert f"in use by another run: pid {first.pid} on host {socket.gethostname()}" in second.stderr
    assert "epoch 1/2" not in second.stderr + second.stdout  # it refused before training
    assert "Traceback" not in second.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and [r["step"] for r in records] == [2, 4]  # one run's lines
    assert "teacher val acc" in out_first and not (out / LOCK_FILE).exists()
