"""Bad input to a training run (timm_remem.train): one clear error each, the checkpoints already on disk kept.

Rows of docs/bad-input.md ("Training runs"). Data problems are fed to the real loop (:func:`timm_remem.train.loop.fit`
with the recipe's own model and loaders) through a loader wrapper that spoils the data from epoch 2 on, so the
epoch-1 checkpoint exists; "kept" means the train-state folder is byte-identical afterwards and its newest checkpoint
still loads into a fresh model.
"""

from __future__ import annotations

import hashlib
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch

from timm_remem.checkpoint import list_checkpoints, load_checkpoint, verify_checkpoint
from timm_remem.distill import task_loss
from timm_remem.errors import CheckpointError, ConfigError, TrainingError
from timm_remem.train import FinetuneConfig, distill_student, finetune_teacher
from timm_remem.train.lock import LOCK_FILE, OutputLock
from timm_remem.train.loop import evaluate, fit
from timm_remem.train.recipes import start_run

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(model="test_vit", dataset="digits", img_size=16, batch_size=64, eval_batch_size=512, progress=False,
            device="cpu", epochs=2, limit_train_batches=2, save_at=[])
NAN = float("nan")


def _raises(error: type[BaseException], match: str, call, *args, **kwargs) -> BaseException:
    """``call`` raises exactly ``error`` (not a subclass) with ``match`` in its message."""
    with pytest.raises(error, match=f"(?s){match}") as info:
        call(*args, **kwargs)
    assert type(info.value) is error, f"expected exactly {error.__name__}, got {type(info.value).__name__}"
    return info.value


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class _SpoiledFromEpoch2:
    """A loader that yields ``spoil(x, y, idx, batch_index)`` instead of its batches from its second pass on."""

    def __init__(self, loader, spoil):
        self.loader, self.spoil, self.passes = loader, spoil, 0
        self.sampler, self.dataset = getattr(loader, "sampler", None), getattr(loader, "dataset", None)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.passes += 1
        for i, batch in enumerate(self.loader):
            yield self.spoil(*batch, i) if self.passes >= 2 else batch


def _fit(tmp_path, *, train=None, val=None):
    """Two epochs of the real loop; ``train``/``val`` spoil the loaders' batches from epoch 2 on."""
    cfg = FinetuneConfig(**TINY, output=str(tmp_path / "run"))
    device, _, _, model, (_, _, train_loader, val_loader) = start_run(cfg)
    if train is not None:
        train_loader = _SpoiledFromEpoch2(train_loader, train)
    if val is not None:
        val_loader = _SpoiledFromEpoch2(val_loader, val) if callable(val) else val

    def compute(x, target, idx, teacher_logits):
        logits = model(x)
        return task_loss(logits, target), logits, None

    return fit(cfg, model, train_loader=train_loader, val_loader=val_loader, device=device, compute=compute,
               desc="finetune", write_export=lambda *a, **k: None)


def _label(value):
    def spoil(x, y, idx, i):
        y = y.clone()
        y[3] = value
        return x, y, idx
    return spoil


class _NaNAfter(torch.nn.Module):
    """A test_vit whose logits become NaN (or inf) after ``after`` forward passes."""

    def __init__(self, after: int, value: float = NAN):
        super().__init__()
        self.net = timm.create_model("test_vit", pretrained=False, img_size=16, num_classes=10)
        self.pretrained_cfg, self.num_classes = self.net.pretrained_cfg, 10
        self.after, self.value, self.calls = after, value, 0

    def forward(self, x):
        self.calls += 1
        out = self.net(x)
        return out * self.value if self.calls > self.after else out


def _distill(tmp_path, teacher):
    return distill_student(**dict(TINY, model="test_resnet"), cache_teacher=False, output=str(tmp_path / "run"),
                           teacher_model=teacher)


# ------------------------------------------------------------------------------------- spoiled data, bad teacher

# Each call gets tmp_path and writes tmp_path/run; ``kept`` names the model whose epoch-1 checkpoint (step 2) must
# survive intact (None: the run stops before any checkpoint).
RUN_CASES = [
    pytest.param(lambda t: _fit(t, train=_label(10)), ConfigError,
                 r"training batch 1 of epoch 2 holds label 10, outside 0\.\.9: the model has 10 classes.*"
                 r"--num-classes.*the last good checkpoint is '.*step-000000002'", "test_vit",
                 id="train-label-too-large"),
    pytest.param(lambda t: _fit(t, train=_label(-1)), ConfigError,
                 r"training batch 1 of epoch 2 holds label -1, outside 0\.\.9.*labelled -1 for 'no label'", "test_vit",
                 id="train-label-negative"),
    pytest.param(lambda t: _fit(t, train=lambda x, y, idx, i: (x[:0], y[:0], idx[:0]) if i == 1 else (x, y, idx)),
                 ConfigError, r"training batch 2 of epoch 2 is empty \(0 samples\).*dropped every sample", "test_vit",
                 id="train-empty-batch"),
    pytest.param(lambda t: _fit(t, val=_label(12)), ConfigError,
                 r"validation batch 1 holds label 12, outside 0\.\.9", "test_vit", id="val-label-out-of-range"),
    pytest.param(lambda t: _fit(t, val=[]), ConfigError,
                 r"the validation data holds no sample: an empty validation split", None, id="val-empty"),
    pytest.param(lambda t: _distill(t, _NaNAfter(after=3)), TrainingError,
                 r"the teacher's logits hold NaN or inf at epoch 2, step 3: the teacher is broken.*"
                 r"the last good checkpoint is '.*step-000000002'", "test_resnet",
                 id="teacher-nan-mid-run"),
    pytest.param(lambda t: _distill(t, _NaNAfter(after=0, value=float("inf"))), TrainingError,
                 r"evaluation gave a non-finite loss \(nan\): the model's outputs hold NaN or inf", None,
                 id="teacher-inf-from-start"),
]


@pytest.mark.parametrize(("run", "error", "match", "kept"), RUN_CASES)
def test_train_rejects(run, error, match, kept, tmp_path):
    state = tmp_path / "run" / "train-state"
    before: dict[str, str] = {}

    if kept:  # record the epoch-1 checkpoint the moment it is complete, before epoch 2 can spoil anything
        import timm_remem.train.loop as loop

        real = loop.save_checkpoint

        def save_and_record(*args, **kwargs):
            path = real(*args, **kwargs)
            before.update(_snapshot(state))
            return path

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(loop, "save_checkpoint", save_and_record)
            _raises(error, match, run, tmp_path)
    else:
        _raises(error, match, run, tmp_path)
    if kept:
        assert before and _snapshot(state) == before
        newest = list_checkpoints(state)[-1]
        verify_checkpoint(newest)
        fresh = timm.create_model(kept, pretrained=False, num_classes=10, **({"img_size": 16} if "vit" in kept else {}))
        assert load_checkpoint(newest, model=fresh, restore_rng=False).step == 2
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released on the way out


def test_train_rejects_nan_model_outputs_in_evaluation():
    batches = [(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]), torch.arange(4))]
    _raises(TrainingError, r"evaluation gave a non-finite loss \(nan\).*without amp", evaluate,
            _NaNAfter(after=0), batches, torch.device("cpu"))


# -------------------------------------------------------------------------------------------- the output folder

HOLDER = textwrap.dedent("""
    import fcntl, json, os, socket, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "2025-01-02T03:04:05+00:00",
                             "command": "timm-remem finetune"}).encode())
    print("held", flush=True)
    sys.stdin.read()
""")


def test_train_rejects_an_output_folder_in_use(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder / LOCK_FILE)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        _raises(TrainingError, rf"output folder '{re.escape(str(folder))}' is in use by another run: pid {proc.pid} "
                rf"on host {re.escape(socket.gethostname())}, started 2025-01-02T03:04:05\+00:00 \(command: "
                r"timm-remem finetune\)\. Wait for it to finish or choose another --output",
                finetune_teacher, **TINY, output=str(folder))
        assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_train_rejects_a_symlinked_lock_file(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "elsewhere").write_text("keep")
    (tmp_path / "run" / LOCK_FILE).symlink_to(tmp_path / "elsewhere")
    _raises(TrainingError, r"cannot create the run lock .*: it is a symlink; remove it", OutputLock(tmp_path / "run")
            .acquire)
    assert (tmp_path / "elsewhere").read_text() == "keep"


# ------------------------------------------------------------------------------------------------------ resume


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "run"
    finetune_teacher(**dict(TINY, epochs=1, limit_train_batches=1), alpha=0.8, model_kwargs={"depth": 2},
                     output=str(out))
    return out


RESUME_CASES = [
    pytest.param(dict(alpha=0.8), r"\(saved -> now\):\n  model_kwargs: \{\"depth\": 2\} -> \{\}\.\nResume with the "
                 r"same settings, or start a fresh run in another output folder", id="resume-other-architecture"),
    pytest.param(dict(alpha=0.9, model_kwargs={"depth": 2}), r"\(saved -> now\):\n  alpha: 0\.8 -> 0\.9\.\n",
                 id="resume-other-alpha"),
    pytest.param(dict(model_kwargs={"depth": 2}, lr=0.01), r"\n  alpha: 0\.8 -> unset;\n  lr: 0\.001 -> 0\.01\.\n",
                 id="resume-several-settings"),
]


@pytest.mark.parametrize(("changes", "match"), RESUME_CASES)
def test_train_rejects_resume(changes, match, saved_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    before = _snapshot(run)
    error = _raises(CheckpointError, match, finetune_teacher, **dict(TINY, epochs=1, limit_train_batches=1),
                    **changes, output=str(run), resume=True)
    assert "missing keys" not in str(error) and "unexpected keys" not in str(error)
    assert _snapshot(run) == before


# ---------------------------------------------------------------------------------------------------- trackers


@pytest.mark.parametrize(("tracker", "module", "env", "error", "match"), [
    pytest.param("tensorboard", "torch.utils.tensorboard", {}, ImportError,
                 r"--log tensorboard\) needs TensorBoard: pip install timm-remem\[tensorboard\]",
                 id="log-no-tensorboard"),
    pytest.param("wandb", "wandb", {}, ImportError,
                 r"--log wandb\) needs Weights & Biases: pip install timm-remem\[wandb\]", id="log-no-wandb"),
    pytest.param("wandb", None, {"WANDB_MODE": "bogus"}, ConfigError,
                 r"wandb could not start a run .*set WANDB_MODE=offline to log locally", id="log-wandb-cannot-start"),
])
def test_train_rejects_trackers(tracker, module, env, error, match, tmp_path, monkeypatch):
    if module is not None:
        monkeypatch.setitem(sys.modules, module, None)  # as if the package were not installed
    else:
        pytest.importorskip("wandb")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    _raises(error, match, finetune_teacher, **TINY, log=[tracker], output=str(tmp_path / "run"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / LOCK_FILE).exists()
