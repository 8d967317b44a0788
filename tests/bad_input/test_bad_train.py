"""Bad input to a training run (timm_remem.train): one clear error each, the checkpoints already on disk kept.

Rows of docs/bad-input.md ("Training runs"). Data problems are fed to the real loop (:func:`timm_remem.train.loop.fit`
with the recipe's own model and loaders) through a loader wrapper that spoils the data from epoch 2 on, so the
epoch-1 checkpoint exists; "kept" means the train-state folder is byte-identical afterwards and its newest checkpoint
still loads into a fresh model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch

import timm_remem.train.guards as guards
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


# ---------------------------------------------------------------------- a diverged run, whatever the optimizer

def _nan_perturbed_pass(monkeypatch):
    """The exact SAM's perturbed pass of step 2 (the finetune task loss's 4th call) gives NaN, nothing else."""
    import timm_remem.train.recipes as recipes

    real, calls = recipes.task_loss, {"n": 0}

    def task_loss(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs) * (NAN if calls["n"] == 4 else 1.0)

    monkeypatch.setattr(recipes, "task_loss", task_loss)
    return dict(rho=0.05)


DIVERGED = (r"; training stopped and nothing was saved after it \(no checkpoint was written yet\)\. Resume with "
            r"gradient clipping \(--resume --clip-grad 1\.0\), or start a new run with a lower learning rate or "
            r"without amp")


@pytest.mark.parametrize(("settings", "match"), [
    pytest.param(lambda mp: dict(optimizer="sgd", lr=1e6, rho=0.05),
                 r"the gradient of the training loss became non-finite at epoch 1, step 2 while the loss was finite "
                 r"\(.+\): the run has diverged \(only a GradScaler, under float16 amp, skips such a step\)" + DIVERGED,
                 id="sam-lr-1e6"),
    pytest.param(lambda mp: dict(optimizer="sgd", lr=1e6, rho=0.05, sam="onepass"),
                 r"the gradient of the training loss became non-finite at epoch 1, step 2 while the loss was finite"
                 + r".*" + DIVERGED, id="onepass-sam-lr-1e6"),
    pytest.param(_nan_perturbed_pass, r"the training loss became nan in SAM's perturbed pass at epoch 1, step 2"
                 + DIVERGED, id="sam-perturbed-pass-nan"),
])
def test_train_stops_a_diverged_sam_run(settings, match, tmp_path, monkeypatch):
    """Exactly as a plain run stops (tests/train/test_train_divergence.py has every optimizer path): before the
    epoch-1 export and any training checkpoint."""
    out = tmp_path / "run"
    _raises(TrainingError, match, finetune_teacher, **dict(TINY, save_at=[1]), **settings(monkeypatch),
            output=str(out))
    assert not (out / "checkpoints").exists() and not any((out / "train-state").glob("step-*"))
    assert not (out / LOCK_FILE).exists()


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
    if error is ImportError:  # a run that never started leaves no folder behind (wandb leaves its own files)
        assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- ownership: a folder that is not ours

def _image_folder(root: Path, per_class: int = 4) -> Path:
    """root/train/<class>/*.png and root/val/<class>/*.png: two classes of small random images (seeded)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 2)):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / split / name /
                                                                                         f"{i}.png")
    return root


def _users_folder(folder: Path) -> Path:
    """A folder holding a user's own config.json and metrics.jsonl (the files a run would write)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"mine": true}\n')
    (folder / "metrics.jsonl").write_text('{"my": "notes"}\n')
    return folder


NOT_OURS = r"is not empty and not a timm-remem {kind} folder: it holds config\.json, metrics\.jsonl\. " \
           r"timm-remem writes only into a folder it created, an empty one, or one it marked as its own \(a " \
           r"\.timm-remem file\), so that nothing of yours is overwritten: choose another output folder"


@pytest.fixture(scope="module")
def teacher_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    finetune_teacher(**dict(TINY, epochs=1, limit_train_batches=1, save_at=[1]), output=str(out))
    return out / "checkpoints" / "epoch-001"


def _select(output, teacher):
    from timm_remem.train import select_teacher

    return select_teacher([teacher], **dict(TINY, model="test_resnet", epochs=1, limit_train_batches=1),
                          output=output)


OWNERSHIP_CASES = [
    pytest.param(lambda out, teacher: finetune_teacher(**TINY, output=out), NOT_OURS.format(kind="run"),
                 id="finetune-into-a-users-folder"),
    pytest.param(lambda out, teacher: distill_student(**dict(TINY, model="test_resnet"), teacher=str(teacher),
                                                      output=out), NOT_OURS.format(kind="run"),
                 id="distill-into-a-users-folder"),
    pytest.param(lambda out, teacher: _select(out, teacher), NOT_OURS.format(kind="select"),
                 id="select-into-a-users-folder"),
]


@pytest.mark.parametrize(("run", "match"), OWNERSHIP_CASES)
def test_train_refuses_a_folder_it_does_not_own(run, match, teacher_export, tmp_path):
    folder = _users_folder(tmp_path / "mine")
    before = _snapshot(folder)
    _raises(ConfigError, rf"output folder '{re.escape(str(folder))}' " + match, run, str(folder), teacher_export)
    assert _snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == ["config.json",
                                                                                          "metrics.jsonl"]


def test_train_refuses_an_empty_output(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _raises(ConfigError, r"output is empty \(''\), which would write into the current folder: name the folder to "
            r"write, e.g\. output='runs/teacher' \(--output runs/teacher\)", finetune_teacher, **TINY, output="")
    assert list(tmp_path.iterdir()) == []


def test_train_refuses_the_current_folder_when_it_is_not_ours(tmp_path, monkeypatch):
    monkeypatch.chdir(_users_folder(tmp_path))
    before = _snapshot(tmp_path)
    _raises(ConfigError, r"output folder '\.' is not empty and not a timm-remem run folder: it holds config\.json, "
            r"metrics\.jsonl", finetune_teacher, **TINY, output=".")
    assert _snapshot(tmp_path) == before


def test_train_refuses_a_teacher_folder_as_output(teacher_export):
    before = _snapshot(teacher_export)
    _raises(ConfigError, r"is not empty and not a timm-remem run folder: it holds README\.md, config\.json, "
            r"model\.safetensors", finetune_teacher, **TINY, output=str(teacher_export))
    assert _snapshot(teacher_export) == before


def test_train_refuses_a_symlinked_train_state(tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    finetune_teacher(**dict(TINY, epochs=1, limit_train_batches=1), output=str(run))
    os.replace(run / "train-state", elsewhere)
    (run / "train-state").symlink_to(elsewhere, target_is_directory=True)
    before = _snapshot(elsewhere)
    _raises(ConfigError, rf"'{re.escape(str(run / 'train-state'))}' is a symlink; timm-remem never writes through a "
            r"symlink: make it a real folder, or choose another output folder", finetune_teacher,
            **dict(TINY, epochs=1, limit_train_batches=1), output=str(run), resume=True)
    assert _snapshot(elsewhere) == before


def _killed_in_epoch_2(recipe, opts: dict, run: Path, steps_per_epoch: int) -> None:
    """Run ``recipe`` and stop it (a simulated kill) at the first step of epoch 2: the epoch-1 checkpoint is kept."""
    real, calls = guards.check_finite, {"n": 0}

    def check(loss, **kwargs):
        calls["n"] += 1
        if calls["n"] == steps_per_epoch + 1:
            raise KeyboardInterrupt("simulated kill")
        return real(loss, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(guards, "check_finite", check)
        with pytest.raises(KeyboardInterrupt):
            recipe(**opts, output=str(run))


def test_train_never_appends_through_a_symlinked_metrics_file(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside.jsonl"
    opts = dict(TINY, epochs=2, limit_train_batches=1)
    _killed_in_epoch_2(finetune_teacher, opts, run, 1)
    outside.write_text((run / "metrics.jsonl").read_text())
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(outside)  # the run's metrics file became a symlink to a file outside
    before = outside.read_text()
    finetune_teacher(**opts, output=str(run), resume=True)
    assert outside.read_text() == before  # kept
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert not (run / "metrics.jsonl").is_symlink() and [json.loads(x)["epoch"] for x in lines] == [1, 2]


def test_train_refuses_a_study_folder_whose_runs_folder_is_a_symlink(tmp_path):
    from timm_remem.study import run_study

    study, elsewhere = tmp_path / "study", tmp_path / "elsewhere"
    options = dict(quick=True, arms=["student"], confidence=None, mi=None, sharpness=None, progress=False,
                   output=str(study))
    run_study(**options)
    os.replace(study / "runs", elsewhere)
    (study / "runs").symlink_to(elsewhere, target_is_directory=True)
    before = _snapshot(elsewhere)
    _raises(ConfigError, r"runs' is a symlink; timm-remem never writes through a symlink", run_study,
            **dict(options, seeds=3))
    assert _snapshot(elsewhere) == before


# ------------------------------------------------------------------- validate first: nothing created on refusal

FIRST_CASES = [
    pytest.param(dict(img_size=33), ConfigError,
                 r"img_size=33 is not a multiple of test_vit's patch size 16: the image is cut into 16x16-pixel "
                 r"patches, so timm refuses it or drops the pixels past the last whole patch; use img_size=32 or 48",
                 id="img-size-not-a-multiple-of-the-patch"),
    pytest.param(dict(optimizer="adamx"), ConfigError,
                 r"cannot create optimizer 'adamx' \(.*\); use a timm optimizer name such as 'adamw' or 'sgd'",
                 id="unknown-optimizer"),
    pytest.param(dict(sched="cosin"), ConfigError, r"scheduler 'cosin'", id="unknown-scheduler"),
    pytest.param(dict(model="vit_nope"), ConfigError, r"unknown timm model 'vit_nope'", id="unknown-model"),
    pytest.param(dict(dataset="folder", data_dir="no/such/folder"), ConfigError,
                 r"dataset folder 'no/such/folder' does not exist", id="missing-image-folder"),
    pytest.param(dict(model="test_resnet", teacher="no/such/teacher"), ConfigError, r"no/such/teacher",
                 id="distill-missing-teacher"),
]


@pytest.mark.parametrize(("changes", "error", "match"), FIRST_CASES)
def test_train_validates_before_creating_the_folder(changes, error, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = distill_student if "teacher" in changes else finetune_teacher
    _raises(error, match, recipe, **dict(TINY, **changes), output=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- resume: the run's identity

def _cut_run(root: Path, run: Path) -> dict:
    """A run on an image folder (2 steps an epoch) killed in epoch 2: its epoch-1 checkpoint is step 2."""
    opts = dict(TINY, dataset="folder", data_dir=str(root), batch_size=4, epochs=2)
    _killed_in_epoch_2(finetune_teacher, opts, run, 2)
    return opts


def _add_images(root: Path) -> None:
    from PIL import Image

    for name in ("new1", "new2"):
        Image.new("RGB", (16, 16), (9, 9, 9)).save(root / "train" / "cat" / f"{name}.png")


def _rewrite_image(root: Path) -> None:
    from PIL import Image

    path = root / "train" / "dog" / "0.png"
    Image.new("RGB", (20, 20), (1, 2, 3)).save(path)


def _newer_timm(monkeypatch) -> None:
    import timm_remem.train.identity as identity

    real = identity._library_versions
    monkeypatch.setattr(identity, "_library_versions", lambda: {**real(), "timm": "9.9.9"})


IDENTITY_CASES = [
    pytest.param(lambda root, mp: _add_images(root),
                 r"the image folder '.*train' of the training data has 2 file\(s\) more than when the run started; "
                 r"added: .*train/cat/new1\.png, .*train/cat/new2\.png", id="images-added"),
    pytest.param(lambda root, mp: (root / "train" / "cat" / "3.png").unlink(),
                 r"the image folder '.*train' of the training data has 1 file\(s\) fewer than when the run started; "
                 r"removed: .*train/cat/3\.png", id="image-removed"),
    pytest.param(lambda root, mp: _rewrite_image(root),
                 r"the image folder '.*train' of the training data holds as many files as when the run started, but "
                 r"not the same; changed \(size or time\): "
                 r".*train/dog/0\.png", id="image-rewritten"),
    pytest.param(lambda root, mp: (root / "val" / "dog" / "1.png").unlink(),
                 r"the image folder '.*val' of the validation data has 1 file\(s\) fewer",
                 id="validation-image-removed"),
    pytest.param(lambda root, mp: _newer_timm(mp), r"timm [0-9.]+ -> 9\.9\.9", id="timm-upgraded"),
]


@pytest.mark.parametrize(("change", "match"), IDENTITY_CASES)
def test_train_resume_refuses_changed_data(change, match, tmp_path, monkeypatch):
    root, run = _image_folder(tmp_path / "data"), tmp_path / "run"
    opts = _cut_run(root, run)
    change(root, monkeypatch)
    before = _snapshot(run)
    _raises(ConfigError, rf"cannot resume '.*step-000000002': what the run is computed from changed since it started "
            rf"\(recorded in '.*run-identity\.json'\):\n  - {match}.*\nResume with the data and libraries the run "
            r"started with, start a fresh run in another output folder, or resume anyway with "
            r"resume_mismatch='allow' \(--resume-mismatch allow\)", finetune_teacher, **opts, output=str(run),
            resume=True)
    assert _snapshot(run) == before


def test_train_resume_refuses_a_re_exported_teacher(teacher_export, tmp_path):
    import shutil

    teacher, run = tmp_path / "teacher", tmp_path / "run"
    shutil.copytree(teacher_export, teacher)
    opts = dict(TINY, model="test_resnet", teacher=str(teacher), epochs=2, limit_train_batches=1)
    _killed_in_epoch_2(distill_student, opts, run, 1)
    weights = teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # written again: another modification time
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    _raises(ConfigError, r"the teacher folder '.*teacher' changed since the run started: model\.safetensors",
            distill_student, **opts, output=str(run), resume=True)


def test_train_resume_anyway_with_resume_mismatch_allow(tmp_path, caplog):
    import logging

    root, run = _image_folder(tmp_path / "data"), tmp_path / "run"
    opts = _cut_run(root, run)
    _add_images(root)
    with caplog.at_level(logging.WARNING, logger="timm_remem.train"):
        result = finetune_teacher(**opts, output=str(run), resume=True, resume_mismatch="allow")
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert "although what it is computed from changed since the run started (resume_mismatch='allow')" in caplog.text
    assert "new1.png" in caplog.text
    assert json.loads((run / "run-identity.json").read_text())["data"]["train"]["count"] == 10  # the new identity
