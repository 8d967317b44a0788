"""Bad checkpoints and failed checkpoint writes (the rows of docs/bad-input.md, section "Checkpoints: manifests,
format versions and failed writes").

Each manifest case writes checkpoints at steps 10 and 20, damages step 20's manifest (or a file it lists), and
checks three things: loading step 20 raises exactly ``CheckpointError`` with the quoted message; resuming from the
run folder skips it with a warning and loads step 10 (``latest_checkpoint(verify=True)``); step 10 is byte for byte
what it was. Each write case makes one write fail (full disk, read-only folder) and checks the one error naming the
path and that the earlier checkpoints are intact and still load.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import timm_remem._io as io
from timm_remem.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from timm_remem.errors import CheckpointError


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def two_checkpoints(tmp_path):
    model = torch.nn.Linear(4, 3)
    weights = []
    for step, seed in ((10, 1), (20, 2)):
        torch.manual_seed(seed)
        model.reset_parameters()
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
        save_checkpoint(tmp_path, model=model, epoch=step // 10, step=step, keep_last=None)
    return tmp_path, tmp_path / "step-000000010", tmp_path / "step-000000020", weights


def _edit(change):
    """A damage that loads manifest.json, lets ``change(manifest, folder)`` edit it and writes it back."""
    def damage(folder: Path) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        change(manifest, folder)
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return damage


def _text(text):
    def damage(folder: Path) -> None:
        (folder / "manifest.json").write_text(text)
    return damage


def _listed_twice(folder: Path) -> None:
    text = (folder / "manifest.json").read_text()
    entry = re.search(r'"model\.safetensors": \{[^}]*\}', text).group(0)
    (folder / "manifest.json").write_text(text.replace(entry, entry + ", " + entry))


def _rename(manifest, old, new):
    manifest["files"][new] = manifest["files"].pop(old)


def _ema_unlisted(folder: Path) -> None:
    (folder / "ema.safetensors").write_bytes((folder / "model.safetensors").read_bytes())


def _symlinked(folder: Path) -> None:
    elsewhere = folder.parent / "outside.safetensors"
    os.replace(folder / "model.safetensors", elsewhere)
    (folder / "model.safetensors").symlink_to(elsewhere)


def _state_json(change):
    """Edit state.json and record its new size and sha256, as if the checkpoint had been written that way."""
    def damage(folder: Path) -> None:
        state = json.loads((folder / "state.json").read_text())
        change(state)
        data = json.dumps(state).encode()
        (folder / "state.json").write_bytes(data)
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"]["state.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return damage


MALFORMED = r"manifest\.json' is malformed: "
EARLIER = r"; resume from an earlier checkpoint"

MANIFEST_CASES = [
    pytest.param(_text("[1, 2]"), MALFORMED + r"it is not a timm-remem checkpoint manifest \(format 'list', "
                 r"expected 'timm-remem-checkpoint'\)" + EARLIER, id="manifest-not-an-object"),
    pytest.param(_edit(lambda m, f: m.pop("files")), MALFORMED + r"missing keys \['files'\]" + EARLIER,
                 id="manifest-missing-files"),
    pytest.param(_edit(lambda m, f: m.pop("format_version")), MALFORMED + r"missing keys \['format_version'\]",
                 id="manifest-missing-version"),
    pytest.param(_edit(lambda m, f: m.update(files=list(m["files"]))),
                 MALFORMED + r"'files' must map file names to their size and sha256, got list", id="files-a-list"),
    pytest.param(_edit(lambda m, f: m["files"]["model.safetensors"].update(bytes="123")),
                 MALFORMED + r"the entry of 'model\.safetensors' needs an integer 'bytes' >= 0, got .*'123'",
                 id="bytes-a-string"),
    pytest.param(_edit(lambda m, f: m["files"]["state.json"].update(sha256="abc")),
                 MALFORMED + r"the entry of 'state\.json' needs a 64-digit hex 'sha256', got 'abc'", id="sha256-short"),
    pytest.param(_edit(lambda m, f: m.update(step="20")), MALFORMED + r"'step' must be an integer, got '20'",
                 id="step-a-string"),
    pytest.param(_listed_twice, MALFORMED + r"lists 'model\.safetensors' twice" + EARLIER, id="file-listed-twice"),
    pytest.param(_edit(lambda m, f: _rename(m, "model.safetensors", "../step-000000010/model.safetensors")),
                 MALFORMED + r"the file name '\.\./step-000000010/model\.safetensors' is not a plain name inside the "
                 r"checkpoint folder", id="path-escapes-the-folder"),
    pytest.param(_edit(lambda m, f: _rename(m, "state.json", "/etc/passwd")),
                 MALFORMED + r"the file name '/etc/passwd' is not a plain name", id="absolute-path"),
    pytest.param(_edit(lambda m, f: m["files"].update({"manifest.json": m["files"]["state.json"]})),
                 MALFORMED + r"it lists itself \('manifest\.json'\)", id="manifest-lists-itself"),
    pytest.param(_edit(lambda m, f: m["files"].pop("state.json")),
                 MALFORMED + r"it does not list \['state\.json'\], which the loader reads" + EARLIER,
                 id="state-json-not-listed"),
    pytest.param(_ema_unlisted, MALFORMED + r"it does not list \['ema\.safetensors'\], which the checkpoint holds "
                 r"and the loader reads", id="ema-not-listed"),
    pytest.param(_edit(lambda m, f: m.update(format_version=2, timm_remem="9.1.0")),
                 r"manifest\.json' is checkpoint format 2, written by timm-remem 9\.1\.0; this timm-remem .* reads "
                 r"formats up to 1: upgrade with pip install -U 'timm-remem>=9\.1\.0' to load it",
                 id="newer-format-version"),
    pytest.param(_edit(lambda m, f: m.update(format_version="1")),
                 r"manifest\.json' has format_version '1', expected a positive integer: the file is malformed",
                 id="format-version-a-string"),
    pytest.param(_symlinked, r"checkpoint file '.*step-000000020/model\.safetensors' is a symlink; checkpoints hold "
                 r"only their own files", id="file-is-a-symlink"),
    pytest.param(_state_json(lambda s: s.update(format_version=3)),
                 r"state\.json' is checkpoint format 3, written by a newer timm-remem; this timm-remem .* reads "
                 r"formats up to 1: upgrade", id="state-json-newer-format"),
    pytest.param(_state_json(lambda s: s.update(epoch="two")),
                 r"state\.json' is malformed: 'epoch' must be an integer, got 'two'; resume from an earlier one",
                 id="state-json-epoch-a-string"),
]


@pytest.mark.parametrize(("damage", "match"), MANIFEST_CASES)
def test_checkpoint_manifest_rejects(damage, match, two_checkpoints, caplog):
    root, first, second, weights = two_checkpoints
    on_disk = _snapshot(first)
    damage(second)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(second, model=torch.nn.Linear(4, 3))
    assert type(info.value) is CheckpointError
    with caplog.at_level(logging.WARNING, logger="timm_remem.checkpoint"):
        assert latest_checkpoint(root) == first
        model = torch.nn.Linear(4, 3)
        assert load_checkpoint(root, model=model).step == 10  # what --resume does: falls back to step 10
    assert "skipping damaged checkpoint" in caplog.text
    assert all(torch.equal(v, weights[0][k]) for k, v in model.state_dict().items())
    assert _snapshot(first) == on_disk


def _disk_full(monkeypatch):
    def no_space(path, tensors, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(io, "save_file", lambda *a, **k: no_space(None, None))


# What safetensors raises when the disk fills while it writes (its own error type, not an OSError).
FULL_DISK = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                            'left on device" })')


def _disk_full_in_safetensors(monkeypatch):
    def no_space(*args, **kwargs):
        raise FULL_DISK
    monkeypatch.setattr(io, "save_file", no_space)


def _read_only(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), kwargs.get("dir"))
    monkeypatch.setattr(io.tempfile, "mkdtemp", refuse)


def _disk_full_at_the_rename(monkeypatch):
    real = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".tmp-step-"):  # the new checkpoint moving into the place of the old one
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)
    monkeypatch.setattr(io.os, "replace", replace)


WRITE_CASES = [
    pytest.param(_disk_full, 30, r"could not write checkpoint '.*step-000000030': No space left on device\. Free disk "
                 r"space or make the folder writable \(or choose another --output\); the earlier checkpoints "
                 r"step-000000010, step-000000020 are kept", id="disk-full"),
    pytest.param(_disk_full_in_safetensors, 30, r"could not write checkpoint '.*step-000000030': No space left on "
                 r"device\. Free disk space or make the folder writable \(or choose another --output\); the earlier "
                 r"checkpoints step-000000010, step-000000020 are kept", id="disk-full-safetensors-error"),
    pytest.param(_read_only, 30, r"could not write checkpoint '.*step-000000030': Read-only file system\. Free disk "
                 r"space or make the folder writable", id="read-only-folder"),
    pytest.param(_disk_full_at_the_rename, 20, r"could not write checkpoint '.*step-000000020': No space left on "
                 r"device.*the earlier checkpoints step-000000010, step-000000020 are kept", id="disk-full-resaving"),
]


@pytest.mark.parametrize(("fail", "step", "match"), WRITE_CASES)
def test_checkpoint_write_fails_clearly(fail, step, match, two_checkpoints, monkeypatch):
    root, first, second, weights = two_checkpoints
    before = {p.name: _snapshot(p) for p in (first, second)}
    fail(monkeypatch)
    with pytest.raises(CheckpointError, match=match) as info:
        save_checkpoint(root, model=torch.nn.Linear(4, 3), step=step, keep_last=1)
    assert type(info.value) is CheckpointError
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["step-000000010", "step-000000020"]  # no temporary left
    assert {p.name: _snapshot(p) for p in (first, second)} == before
    for path, expected in ((first, weights[0]), (second, weights[1])):
        model = torch.nn.Linear(4, 3)
        load_checkpoint(path, model=model)
        assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_checkpoint_keep_last_rejects_a_bool(tmp_path):
    with pytest.raises(CheckpointError, match=r"keep_last must be an integer >= 1 or None, got True"):
        save_checkpoint(tmp_path, model=torch.nn.Linear(2, 2), keep_last=True)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_full_disk_during_training_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """The disk fills while the training loop writes its second checkpoint: one CheckpointError, the first kept."""
    from timm_remem.train import finetune_teacher

    real = io.save_file

    def fill_at_step_2(tensors, filename, metadata=None):
        if (tmp_path / "run" / "train-state" / "step-000000001").is_dir():
            raise FULL_DISK
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(io, "save_file", fill_at_step_2)
    options = dict(model="test_vit", img_size=16, epochs=2, limit_train_batches=1, save_at=[], progress=False,
                   device="cpu")
    state = tmp_path / "run" / "train-state"
    with pytest.raises(CheckpointError, match=r"could not write checkpoint '.*step-000000002': No space left on "
                                              r"device.*the earlier checkpoints step-000000001 are kept") as info:
        finetune_teacher(**options, output=str(tmp_path / "run"))
    assert type(info.value) is CheckpointError
    monkeypatch.undo()
    assert sorted(p.name for p in state.iterdir()) == ["step-000000001"]  # no temporary left
    first = _snapshot(state / "step-000000001")
    resumed = finetune_teacher(**options, output=str(tmp_path / "run"), resume=True)  # it loads and resumes
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    assert "step-000000001" not in [p.name for p in state.iterdir()] or _snapshot(state / "step-000000001") == first


def test_checkpoint_leaves_other_hidden_files_alone(tmp_path):
    for name in (".tmp-notes", ".old-photos"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "mine.txt").write_text("keep")
    save_checkpoint(tmp_path, model=torch.nn.Linear(2, 2), step=1)
    assert all((tmp_path / name / "mine.txt").read_text() == "keep" for name in (".tmp-notes", ".old-photos"))
