"""``timm_remem._io``: atomic writes (complete or untouched, the umask's permissions, symlinks replaced), writes by
other libraries through a private folder, and the one ownership check of output folders (``claim_output_dir``)."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import timm_remem._io as io
from timm_remem import save_pretrained
from timm_remem._io import (
    OWNER_FILE,
    abandon_output_dir,
    atomic_replace_dir,
    atomic_write_file,
    atomic_write_json,
    atomic_write_safetensors,
    atomic_write_text,
    claim_output_dir,
    write_into,
)
from timm_remem.errors import ConfigError


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_text_and_json_round_trip(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "héllo\n")
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_write_json(tmp_path / "b.json", {"z": 1, "a": [1.5, None]})
    text = (tmp_path / "b.json").read_text()
    assert json.loads(text) == {"z": 1, "a": [1.5, None]}
    assert text.index('"a"') < text.index('"z"')  # sorted keys
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f", "x")
        assert _mode(tmp_path / "f") == 0o644
        os.umask(0o077)
        atomic_write_text(tmp_path / "g", "x")
        assert _mode(tmp_path / "g") == 0o600
    finally:
        os.umask(old)


def test_a_symlink_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "out.txt"
    link.symlink_to(victim)
    atomic_write_text(link, "new")
    assert not link.is_symlink() and link.read_text() == "new"
    assert victim.read_text() == "keep me"


def test_nan_is_refused_and_the_old_file_kept(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"loss": 1.0})
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "m.json", {"loss": float("nan")})
    assert json.loads((tmp_path / "m.json").read_text()) == {"loss": 1.0}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_names_the_path(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(OSError, match="could not write file .*ro/x.txt"):
            atomic_write_text(ro / "x.txt", "x")
    finally:
        ro.chmod(0o700)


def test_missing_folder_names_the_path(tmp_path):
    with pytest.raises(OSError, match=r"could not write file .*nope/x\.txt"):
        atomic_write_text(tmp_path / "nope" / "x.txt", "x")


def test_replace_dir_swaps_whole_folders_and_keeps_the_old_on_failure(tmp_path):
    target = tmp_path / "export"
    atomic_replace_dir(lambda d: (d / "a").write_text("1"), target)
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    atomic_replace_dir(lambda d: (d / "b").write_text("2"), target)
    assert sorted(p.name for p in target.iterdir()) == ["b"]  # the old folder's files are gone with it

    def fail(d):
        (d / "c").write_text("half")
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError, match="crash"):
        atomic_replace_dir(fail, target)
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folder left


def test_safetensors_and_writer_files_are_atomic_with_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_safetensors(tmp_path / "w.safetensors", {"a": torch.arange(3.0), "b": torch.ones(2)})
        assert _mode(path) == 0o644  # mkstemp alone would give 0600
        assert load_file(str(path))["a"].tolist() == [0.0, 1.0, 2.0]
        atomic_write_file(tmp_path / "img.png", lambda tmp: tmp.write_bytes(b"\x89PNG"))
        assert _mode(tmp_path / "img.png") == 0o644
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png", "w.safetensors"]


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "w.safetensors"
    atomic_write_safetensors(target, {"a": torch.zeros(2)})
    before = target.read_bytes()

    def disk_full(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match=r"could not write file '.*w\.safetensors': No space left on device") as info:
        atomic_write_file(target, disk_full)
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_replace_dir_puts_the_old_folder_back_when_the_new_one_cannot_move_in(tmp_path, monkeypatch):
    target = tmp_path / "export"
    atomic_replace_dir(lambda d: (d / "a").write_text("old"), target)
    real = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".tmp-export-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match=r"could not write folder '.*export': No space left on device"):
        atomic_replace_dir(lambda d: (d / "b").write_text("new"), target)
    monkeypatch.undo()
    assert (target / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_exported_teacher_files_get_umask_permissions(tmp_path):
    model = timm.create_model("test_vit", pretrained=False, img_size=16)
    old = os.umask(0o022)
    try:
        folder = atomic_replace_dir(lambda d: save_pretrained(model, d), tmp_path / "epoch-001")
    finally:
        os.umask(old)
    modes = {p.name: _mode(p) for p in folder.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes
    assert _mode(folder) == 0o755


# ------------------------------------------------------------------------------ safetensors' own write errors


def test_a_full_disk_in_safetensors_is_an_os_error_naming_the_path(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    target = tmp_path / "w.safetensors"
    atomic_write_safetensors(target, {"a": torch.zeros(2)})
    before = target.read_bytes()

    def no_space(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')

    monkeypatch.setattr(io, "save_file", no_space)
    with pytest.raises(OSError, match=r"could not write file '.*w\.safetensors': No space left on device") as info:
        atomic_write_safetensors(target, {"a": torch.ones(2)})
    assert info.value.errno == errno.ENOSPC
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


# ----------------------------------------------------------------------------------------------- write_into


def test_write_into_replaces_symlinks_and_renames_the_last_names_last(tmp_path, monkeypatch):
    victim = tmp_path / "victim.json"
    victim.write_text("keep me")
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "config.json").symlink_to(victim)
    order = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (order.append(Path(dst).name), real(src, dst)))
    old = os.umask(0o022)
    try:
        write_into(folder, lambda tmp: [(tmp / n).write_text(n) for n in ("config.json", "a.bin", "z.md")],
                   last=("config.json",))
    finally:
        os.umask(old)
    assert order == ["a.bin", "z.md", "config.json"]
    assert victim.read_text() == "keep me" and not (folder / "config.json").is_symlink()
    assert {p.name: _mode(p) for p in folder.iterdir()} == {"config.json": 0o644, "a.bin": 0o644, "z.md": 0o644}


def test_write_into_leaves_the_folder_as_it_was_when_the_writer_fails(tmp_path):
    (tmp_path / "config.json").write_text("old")

    def fail(tmp):
        (tmp / "config.json").write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError, match=r"could not write folder '.*': No space left on device"):
        write_into(tmp_path, fail)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"] and (tmp_path / "config.json").read_text() == "old"


# ------------------------------------------------------------------------------------- claim_output_dir


def test_claim_creates_a_missing_folder_and_marks_it(tmp_path):
    claim = claim_output_dir(tmp_path / "a" / "run", "run")
    assert claim.created and claim.fresh
    marker = json.loads((tmp_path / "a" / "run" / OWNER_FILE).read_text())
    assert marker["owner"] == "timm-remem" and marker["kind"] == "run"
    again = claim_output_dir(tmp_path / "a" / "run", "run")  # ours now: accepted, nothing rewritten
    assert not again.created and not again.fresh


def test_claim_adopts_an_empty_folder_and_checks_without_writing(tmp_path):
    assert claim_output_dir(tmp_path, "run", create=False).fresh and list(tmp_path.iterdir()) == []
    assert not claim_output_dir(tmp_path / "x", "run", create=False).created and not (tmp_path / "x").exists()
    assert claim_output_dir(tmp_path, "select").fresh and [p.name for p in tmp_path.iterdir()] == [OWNER_FILE]


def test_claim_refuses_a_users_folder_naming_a_few_files(tmp_path):
    for i in range(7):
        (tmp_path / f"f{i}.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"it holds f0\.txt, f1\.txt, f2\.txt, f3\.txt, f4\.txt and 2 more\. "
                                          r".*choose another output folder \(a new name is created for you\), or "
                                          r"empty this one"):
        claim_output_dir(tmp_path, "run")
    assert not (tmp_path / OWNER_FILE).exists()


@pytest.mark.parametrize(("kind", "make"), [
    pytest.param("run", lambda d: save_checkpoint_in(d / "train-state"), id="run-with-checkpoints"),
    pytest.param("select", lambda d: (d / "select.json").write_text('{"rows": [], "best": "x"}'), id="select"),
    pytest.param("study", lambda d: (d / "study-settings.json").write_text("{}"), id="study"),
    pytest.param("export", lambda d: (d / "config.json").write_text('{"remem": {}}'), id="teacher-export"),
    pytest.param("export", lambda d: (d / "config.json").write_text('{"remem_student": {}}'), id="student-export"),
])
def test_claim_accepts_a_folder_written_before_the_marker_existed(kind, make, tmp_path):
    make(tmp_path)
    claim_output_dir(tmp_path, kind)
    assert (tmp_path / OWNER_FILE).exists() == (kind != "export")  # exports never get a marker


def test_claim_refuses_a_users_model_folder_whose_readme_mentions_timm_remem(tmp_path):
    # A README that links timm-remem is not our card: only the card's metadata tag (and nothing but export files) is.
    (tmp_path / "README.md").write_text("# my model\nTrained with https://pypi.org/project/timm-remem\n")
    (tmp_path / "config.json").write_text('{"architecture": "resnet18"}')
    (tmp_path / "model.safetensors").write_bytes(b"mine")
    with pytest.raises(ConfigError, match="not a timm-remem export folder"):
        claim_output_dir(tmp_path, "export")
    (tmp_path / "config.json").unlink()
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "README.md").write_text("---\ntags:\n- remem\n---\n# a card\n")
    (tmp_path / "adapter_config.json").write_text("{}")
    claim_output_dir(tmp_path, "export")  # our adapter card: adopted
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt"):
        claim_output_dir(tmp_path, "export")


def save_checkpoint_in(root):
    from timm_remem.checkpoint import save_checkpoint

    save_checkpoint(root, model=torch.nn.Linear(2, 2), step=1)


def test_claim_refuses_another_kind_and_symlinked_sub_folders(tmp_path):
    claim_output_dir(tmp_path / "run", "run")
    with pytest.raises(ConfigError, match=r"is a training run folder \(finetune / distill\) \(its \.timm-remem "
                                          r"marker says so\), not a select folder: choose another output folder"):
        claim_output_dir(tmp_path / "run", "select")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "run" / "checkpoints").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ConfigError, match=r"checkpoints' is a symlink; timm-remem never writes through a symlink"):
        claim_output_dir(tmp_path / "run", "run")


@pytest.mark.parametrize(("path", "match"), [
    pytest.param("", r"output is empty \(''\), which would write into the current folder", id="empty"),
    pytest.param("  ", r"output is empty", id="blank"),
    pytest.param("file.txt", r"output 'file\.txt' is a file, not a folder", id="a-file"),
    pytest.param("dangling", r"output folder 'dangling' is a symlink to a folder that does not exist", id="dangling"),
])
def test_claim_refuses_paths_that_are_no_folder(path, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    with pytest.raises(ConfigError, match=match):
        claim_output_dir(path, "run")


def test_abandon_undoes_only_a_claim_that_found_nothing(tmp_path):
    claim = claim_output_dir(tmp_path / "new", "run")
    (claim.path / "config.json").write_text("{}")
    assert abandon_output_dir(claim, ("config.json",)) and not claim.path.exists()
    claim = claim_output_dir(tmp_path / "busy", "run")
    (claim.path / "metrics.jsonl").write_text("{}\n")
    assert not abandon_output_dir(claim, ("config.json",)) and (claim.path / "metrics.jsonl").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    claim = claim_output_dir(empty, "run")
    assert abandon_output_dir(claim) and empty.is_dir() and list(empty.iterdir()) == []  # adopted: left empty
