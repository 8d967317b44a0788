"""What a training run prints (timm_remem.train.console): a start-up line, one line per epoch, the export path, and
progress that stays small when the output goes to a file.

The command-line runs here are real processes with stdout and stderr redirected to files, as in a batch job.
"""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm

import timm_remem.train.console as console
from timm_remem.train.console import ConsoleHandler, EpochProgress

pytestmark = pytest.mark.usefixtures("one_thread")

DIGITS_TRAIN, DIGITS_VAL, BATCH = 1437, 360, 64  # the digits split and the default batch size
STEPS = math.ceil(DIGITS_TRAIN / BATCH)


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))


def _params_text() -> str:
    model = timm.create_model("test_vit", pretrained=False, img_size=16, num_classes=10)
    return f"{sum(p.numel() for p in model.parameters()) / 1e3:.1f}K"


@pytest.mark.parametrize("flags", [pytest.param([], id="progress"), pytest.param(["--no-progress"], id="no-progress")])
def test_a_redirected_two_epoch_finetune_log_is_small_and_says_what_ran(tmp_path, flags):
    out = tmp_path / "run"
    with open(tmp_path / "stdout.txt", "w") as stdout, open(tmp_path / "stderr.txt", "w") as stderr:
        code = subprocess.call([sys.executable, "-m", "timm_remem", "finetune", "--model", "test_vit", "--img-size",
                                "16", "--epochs", "2", "--device", "cpu", "--output", str(out), *flags],
                               stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=_env())
    text = (tmp_path / "stdout.txt").read_text() + (tmp_path / "stderr.txt").read_text()
    assert code == 0, text
    assert len(text.encode()) < 20_000 and "\r" not in text and "Traceback" not in text
    startup = (f"finetune test_vit: {_params_text()} parameters; data digits: {DIGITS_TRAIN} train / {DIGITS_VAL} val "
               f"images; device cpu; SAM off; reweighting off; 2 epochs x {STEPS} steps; output {out}")
    lines = text.splitlines()
    assert startup in lines
    epochs = [line for line in lines if re.fullmatch(
        r"finetune epoch [12]/2: train loss \d\.\d{4}, train acc [01]\.\d{4}, val loss \d\.\d{4}, val acc [01]\.\d{4}, "
        r"lr \S+, \d+\.\d s \(\d+ img/s\)", line)]
    assert [line[:19] for line in epochs] == ["finetune epoch 1/2:", "finetune epoch 2/2:"]
    assert f"finetune epoch 2: exported {out / 'checkpoints' / 'epoch-002'}" in lines
    assert f"checkpoints: {out / 'checkpoints' / 'epoch-002'}" in text  # the command's result line
    progress = [line for line in lines if re.fullmatch(r"finetune epoch [12]/2: \d+% \(\d+/\d+ steps\).*", line)]
    if flags:
        assert progress == []
    else:  # a plain line every ceil(10%) of the steps, none at the end (the epoch line follows)
        every = math.ceil(STEPS / 10)
        assert len(progress) == 2 * len(range(every, STEPS, every)) and len(progress) <= 20
    assert lines.index(startup) < lines.index(epochs[0]) < lines.index(epochs[1])


def test_an_application_that_configured_logging_gets_each_line_once_in_its_format(tmp_path):
    script = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.WARNING, format='APP %(name)s %(message)s', stream=sys.stdout)\n"
        "from timm_remem.train import finetune_teacher\n"
        f"finetune_teacher(model='test_vit', img_size=16, epochs=1, limit_train_batches=2, save_at=[], "
        f"progress=False, device='cpu', output={str(tmp_path / 'run')!r})\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("APP timm_remem.train finetune test_vit: ") == 1
    assert proc.stdout.count("APP timm_remem.train finetune epoch 1/1: train loss") == 1
    assert "finetune test_vit:" not in proc.stderr  # not printed a second time by the library's own handler


def test_the_console_handler_writes_only_when_nothing_else_shows_the_records(monkeypatch, capsys):
    logger = logging.getLogger("timm_remem.train.test")
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "a console line", None, None)
    handler = ConsoleHandler()
    monkeypatch.setattr(logging.root, "handlers", [])
    handler.handle(record)
    assert capsys.readouterr().err == "a console line\n"
    monkeypatch.setattr(logging.root, "handlers", [logging.NullHandler()])  # the application configured logging
    handler.handle(record)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("steps", [5, 23, 100, 1437])
def test_plain_progress_is_a_line_every_tenth_of_an_epoch(monkeypatch, steps):
    monkeypatch.setattr(console, "_is_terminal", lambda: False)
    progress = EpochProgress("finetune", 1, 1, steps=steps, start=0, enabled=True)
    assert progress.bar is None
    running = {"loss": 1.0, "correct": 1, "count": 2, "time": 0.5}
    due = [done for done in range(1, steps + 1) if progress.line(done, running) is not None]
    every = math.ceil(steps / 10)
    assert due == list(range(every, steps, every)) and len(due) <= 10


def test_progress_is_a_bar_only_on_a_terminal_and_nothing_when_disabled(monkeypatch):
    monkeypatch.setattr(console, "_is_terminal", lambda: True)
    bar = EpochProgress("finetune", 1, 2, steps=10, start=3, enabled=True)
    assert bar.bar is not None and bar.bar.n == 3 and bar.line(5, {}) is None
    bar.close()
    off = EpochProgress("finetune", 1, 2, steps=10, start=0, enabled=False)
    assert off.bar is None and off.line(1, {"loss": 1, "correct": 1, "count": 1, "time": 1}) is None
