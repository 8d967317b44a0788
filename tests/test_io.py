"""Atomic writes of ``timm_remem._io``: complete or untouched, the umask's permissions, symlinks replaced."""

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

from timm_remem import save_pretrained
from timm_remem._io import (
    atomic_replace_dir,
    atomic_write_file,
    atomic_write_json,
    atomic_write_safetensors,
    atomic_write_text,
)


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
