"""Crash-safe resume: ``timm-remem finetune`` killed with SIGKILL, then resumed with ``--resume``.

A real training process (``python -m timm_remem finetune``) is killed from outside in the middle of an epoch, and
killed in the middle of a checkpoint write (deterministically: a small driver script, written by the test, runs the
same command with ``timm_remem.checkpoint.atomic_write_json`` patched to SIGKILL its own process before the
checkpoint's ``state.json``). Each time the resumed run must start
from the last complete checkpoint, every checkpoint must verify, and with a fixed seed on CPU the run must end with
exactly the weights of an uninterrupted run. Unit-level corruption checks (truncated or altered files) live in
tests/train/test_checkpoint.py; here a damaged newest checkpoint is met through ``--resume``. A killed run cannot
remove its output-folder lock: the resumed run must recognise it as stale, take it over and release it at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from timm_remem.checkpoint import list_checkpoints, verify_checkpoint
from timm_remem.cli import main
from timm_remem.train.lock import LOCK_FILE

pytestmark = [
    pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals"),
    pytest.mark.usefixtures("one_thread"),
]

STEPS_PER_EPOCH = 12
EPOCHS = 2
# AdamW with warm-up and cosine schedule, drop-path (random masks) and an EMA: all of it must come back on resume.
ARGS = ["finetune", "--model", "test_vit", "--img-size", "16", "--epochs", str(EPOCHS), "--batch-size", "32",
        "--limit-train-batches", str(STEPS_PER_EPOCH), "--checkpoint-every", "2", "--keep-last", "3",
        "--warmup-epochs", "1", "--model-kwargs", '{"drop_path_rate": 0.1}', "--ema", "--ema-decay", "0.9",
        "--save-at", "1", "2", "--seed", "3", "--no-progress"]
FINAL = f"step-{EPOCHS * STEPS_PER_EPOCH:09d}"

# ``python CRASH_DRIVER STEP ARGS...`` runs ``timm-remem ARGS...`` and SIGKILLs itself inside the checkpoint write
# of step STEP: after the tensor files, before state.json, the manifest and the rename into place, exactly where a
# crash or a kill leaves a half-written temporary folder.
CRASH_DRIVER = """
import os, signal, sys

import timm_remem.checkpoint as checkpoint
from timm_remem.cli import main

crash_step = int(sys.argv[1])
write_json = checkpoint.atomic_write_json


def write_or_die(path, data, **kwargs):
    if path.name == "state.json" and data.get("step") == crash_step:
        os.kill(os.getpid(), signal.SIGKILL)
    return write_json(path, data, **kwargs)


checkpoint.atomic_write_json = write_or_die
sys.exit(main(sys.argv[2:]))
"""


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))


def _launch(output: Path, crash_at_step: int | None = None) -> subprocess.Popen:
    if crash_at_step is None:
        command = [sys.executable, "-m", "timm_remem"]
    else:
        driver = output.parent / "crash_driver.py"
        driver.write_text(CRASH_DRIVER)
        command = [sys.executable, str(driver), str(crash_at_step)]
    return subprocess.Popen([*command, *ARGS, "--output", str(output)], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _final_weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    state = run / "train-state" / FINAL
    return {
        "model": load_file(str(state / "model.safetensors")),
        "ema": load_file(str(state / "ema.safetensors")),
        "export": load_file(str(run / "checkpoints" / f"epoch-{EPOCHS:03d}" / "model.safetensors")),
    }


def _assert_same(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    for part in a:
        assert a[part].keys() == b[part].keys(), part
        different = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not different, f"{part}: {different[:5]}"


def _assert_all_verify(run: Path) -> None:
    states = list_checkpoints(run / "train-state")
    assert states
    for path in states:
        verify_checkpoint(path)
    assert not list((run / "train-state").glob(".*")), "a temporary checkpoint folder was left behind"
    assert not list((run / "checkpoints").glob(".*")), "a temporary export folder was left behind"


def _resume(run: Path, caplog, *flag: str) -> str:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="timm_remem"):
        assert main([*ARGS, "--output", str(run), *(flag or ["--resume"])]) == 0
    return caplog.text


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    assert main([*ARGS, "--output", str(run)]) == 0
    return run


def test_kill_mid_epoch_then_resume_matches_uninterrupted(reference, tmp_path, caplog):
    run = tmp_path / "run"
    proc = _launch(run)
    first = run / "train-state" / "step-000000002" / "manifest.json"
    deadline = time.monotonic() + 120
    while not first.exists():
        assert proc.poll() is None, f"training ended before it could be killed:\n{proc.communicate()[0]}"
        assert time.monotonic() < deadline, "no checkpoint appeared within 120 s"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL

    complete = list_checkpoints(run / "train-state")
    for path in complete:
        verify_checkpoint(path)
    last = complete[-1]
    assert int(last.name.split("-")[1]) < STEPS_PER_EPOCH  # killed during epoch 1

    holder = json.loads((run / LOCK_FILE).read_text())  # the killed run could not remove its lock: a stale one
    assert holder["pid"] == proc.pid

    log = _resume(run, caplog)
    assert f"resumed from {last} (epoch 1, step {int(last.name.split('-')[1])})" in log  # the last complete one
    assert f"took over the stale lock of pid {proc.pid}" in log
    assert not (run / LOCK_FILE).exists()  # released by the resumed run
    _assert_same(_final_weights(run), _final_weights(reference))
    _assert_all_verify(run)
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]


def test_kill_during_checkpoint_write_then_resume_matches_uninterrupted(reference, tmp_path, caplog):
    run = tmp_path / "run"
    proc = _launch(run, crash_at_step=6)  # SIGKILL from inside save_checkpoint for step 6
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == -signal.SIGKILL, output

    state = run / "train-state"
    partial = [p for p in state.iterdir() if p.name.startswith(".")]
    assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file()
    assert not (partial[0] / "manifest.json").exists()  # killed half-way: tensors written, no manifest
    assert [p.name for p in list_checkpoints(state)] == ["step-000000002", "step-000000004"]
    for path in list_checkpoints(state):
        verify_checkpoint(path)

    assert (run / LOCK_FILE).exists()  # left behind by the killed run
    log = _resume(run, caplog, "--resume", "auto")  # as a restarted job would
    assert f"resumed from {state / 'step-000000004'} (epoch 1, step 4)" in log
    _assert_same(_final_weights(run), _final_weights(reference))
    _assert_all_verify(run)


def _damage_newest(run: Path) -> Path:
    newest = list_checkpoints(run / "train-state")[-1]
    f = newest / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return newest


def test_resume_from_a_truncated_checkpoint_is_a_clear_error_and_loses_nothing(reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    damaged = _damage_newest(run)
    before = list_checkpoints(run / "train-state")
    assert main([*ARGS, "--output", str(run), "--resume", str(damaged)]) == 1  # a failure, not bad usage
    err = capsys.readouterr().err
    assert "is truncated or altered" in err and "resume from an earlier checkpoint" in err
    assert list_checkpoints(run / "train-state") == before
    for path in before[:-1]:
        verify_checkpoint(path)


def test_resume_skips_a_damaged_newest_checkpoint_and_matches_uninterrupted(reference, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    damaged = _damage_newest(run)
    previous = list_checkpoints(run / "train-state")[-2]
    log = _resume(run, caplog)
    assert "skipping damaged checkpoint" in log and f"resumed from {previous}" in log
    assert damaged.name == FINAL  # rewritten by the resumed run
    _assert_same(_final_weights(run), _final_weights(reference))
    _assert_all_verify(run)


def test_resume_auto_starts_afresh_when_there_is_no_checkpoint(tmp_path):
    args = ["finetune", "--model", "test_vit", "--img-size", "16", "--epochs", "1", "--limit-train-batches", "1",
            "--save-at", "--no-progress", "--output", str(tmp_path), "--resume", "auto"]
    assert main(args) == 0
    assert [p.name for p in list_checkpoints(tmp_path / "train-state")] == ["step-000000001"]


def test_resume_cleans_up_half_written_exports(reference, tmp_path):
    """A kill during an export leaves ``.tmp-*`` (deleted) or ``.old-<name>`` without ``<name>`` (put back)."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    exports = run / "checkpoints"
    (exports / ".tmp-epoch-002-x1y2").mkdir()
    (exports / ".tmp-epoch-002-x1y2" / "config.json").write_text("{}")
    os.replace(exports / "epoch-001", exports / ".old-epoch-001")
    assert main([*ARGS, "--output", str(run), "--resume"]) == 0  # finished already: nothing left to train
    assert sorted(p.name for p in exports.iterdir()) == ["epoch-001", "epoch-002"]
    assert (exports / "epoch-001" / "model.safetensors").is_file()
