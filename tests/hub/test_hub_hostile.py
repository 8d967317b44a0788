"""Hostile input to the hub room: revisions that are paths, and a server whose headers lead out of the Hub cache.

A revision is checked like a repository id, before any request or file access (the test server records every
request; the cache folder must not even be created). A hostile server (``HubServer.lie``) sends an ``ETag``,
``X-Linked-Etag`` or commit id holding ``../``; huggingface_hub turns those into cache paths, and timm-remem must
read nothing that lies outside the cache. What huggingface_hub itself does with them is checked as well, through
its own ``hf_hub_download``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hub_server import ALICE_WRITE
from huggingface_hub import hf_hub_download

import timm_remem.hub.io as hub_io
from timm_remem.errors import CheckpointError, ConfigError, HubError
from timm_remem.hub import fetch_teacher_files, load_teacher, push_to_hub

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's own call

REVISION = r"revision must be a branch, tag or commit id \('main', 'v1\.0', 'refs/pr/1' or a 40-character commit hash\)"
FIX = r"Give the name the Hub lists for the repository \(huggingface_hub\.HfApi\(\)\.list_repo_refs\)"

# (revision, what the message says is wrong with it)
BAD_REVISIONS = [
    pytest.param("../../x", "it contains '..'", id="parent"),
    pytest.param("main/../../x", "it contains '..'", id="parent-inside"),
    pytest.param("/etc/passwd", "it is an absolute path", id="absolute"),
    pytest.param("v1\\..\\x", "it contains a backslash", id="backslash"),
    pytest.param("main\x00", r"it contains the control character '\\x00'", id="nul"),
    pytest.param("main\n", r"it contains the control character '\\n'", id="newline"),
    pytest.param("", "it is empty", id="empty"),
    pytest.param("v" * 256, r"it is 256 characters long \(at most 255\)", id="overlong"),
    pytest.param("my branch", r"it contains ' ' \(letters, digits, '\.', '_', '-', '\+' and '/' only\)", id="space"),
    pytest.param("refs//pr", r"it has an empty part \('//' or a '/' at the end\)", id="empty-part"),
    pytest.param(".git", r"it has a part '\.git' \(no part starts with '\.' or ends with '\.lock'\)", id="hidden"),
]


@pytest.fixture
def untouched(hub, tmp_path):
    """Yields the cache folder to pass; afterwards checks that neither the server nor the disk was touched."""
    cache = tmp_path / "cache"
    yield cache
    assert hub.requests == [] and not cache.exists()


def _shown(revision) -> str:
    return re.escape(repr(revision) if not isinstance(revision, str) or len(revision) <= 80
                     else f"{revision[:40]!r}... ({len(revision)} characters)")


@pytest.mark.parametrize(("revision", "problem"), BAD_REVISIONS)
@pytest.mark.parametrize("entry", ["load-at", "load-kwarg", "fetch-kwarg", "push", "local-folder"])
def test_a_bad_revision_is_refused_before_any_request_or_file_access(untouched, teacher, entry, revision, problem):
    calls = {
        "load-at": lambda: load_teacher(f"hf-hub:alice/vit@{revision}", cache_dir=untouched),
        "load-kwarg": lambda: load_teacher("hf-hub:alice/vit", revision=revision, cache_dir=untouched),
        "fetch-kwarg": lambda: fetch_teacher_files("hf-hub:alice/vit", revision=revision, cache_dir=untouched),
        "push": lambda: push_to_hub(teacher[0], "alice/vit", revision=revision, token=ALICE_WRITE),
        "local-folder": lambda: load_teacher(untouched, revision=revision),
    }
    name = re.escape(f"the revision after '@' in {f'hf-hub:alice/vit@{revision}'!r}") if entry == "load-at" \
        else "revision"
    pattern = REVISION.replace("revision", name, 1) + rf", got {_shown(revision)}: {problem}\. {FIX}"
    with pytest.raises(ConfigError, match=pattern):
        calls[entry]()


@pytest.mark.parametrize("call", [
    lambda cache: load_teacher("hf-hub:alice/vit", revision=7, cache_dir=cache),
    lambda cache: fetch_teacher_files("hf-hub:alice/vit", revision=b"v1", cache_dir=cache),
], ids=["int", "bytes"])
def test_a_revision_that_is_not_text_is_refused(untouched, call):
    with pytest.raises(ConfigError, match=REVISION + r", got (7|b'v1'): it is not a string but (int|bytes)\."):
        call(untouched)


def test_an_empty_revision_after_the_at_sign_is_refused(untouched):
    with pytest.raises(ConfigError, match=r"the revision after '@' in 'hf-hub:alice/vit@' must be .* it is empty"):
        load_teacher("hf-hub:alice/vit@", cache_dir=untouched)


def test_good_revisions_reach_the_hub(hub, teacher):
    push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE)
    push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE, revision="feature/v1.0-rc_1+cpu")
    sha = hub.repo("alice/vit-remem").branches["main"]
    assert fetch_teacher_files(f"hf-hub:alice/vit-remem@{sha}").name == sha  # a 40-character commit id
    assert fetch_teacher_files("hf-hub:alice/vit-remem@feature/v1.0-rc_1+cpu").is_dir()
    with pytest.raises(HubError, match="revision 'refs/pr/1' does not exist in 'alice/vit-remem'"):
        load_teacher("hf-hub:alice/vit-remem", revision="refs/pr/1")  # valid: it was sent, the server has none


# ------------------------------------------------------------------------------ a server that leads out of the cache


@pytest.fixture
def nothing_read(monkeypatch):
    """Fails the test if timm-remem reads a config or weights file."""
    def read(*args):
        raise AssertionError(f"timm-remem read {args[0]}")

    monkeypatch.setattr(hub_io, "_read_config", read)
    monkeypatch.setattr(hub_io, "_load_weights", lambda model, path, source: read(path))


def _outside(root: Path, cache: Path) -> list[str]:
    """Files and links under ``root`` that are (or lead) outside ``cache``."""
    cache = cache.resolve()
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if (p.is_file() or p.is_symlink()) and not p.resolve().is_relative_to(cache))


@pytest.mark.parametrize(("file", "header"), [("config.json", "ETag"), ("model.safetensors", "X_Linked_Etag")])
def test_a_file_tag_that_leads_out_of_the_cache_is_refused_and_nothing_is_read(hub, teacher, tmp_path, file, header,
                                                                               nothing_read):
    push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE)
    hub.lie(re.escape(file), **{header: '"../../../escaped"'})  # blobs/../../../escaped: beside the cache folder

    # huggingface_hub itself (2.x) follows the server: it writes the file outside the cache and hands back a path
    # in the cache that is a link to it.
    theirs = tmp_path / "theirs" / "cache"
    handed = Path(hf_hub_download("alice/vit-remem", file, cache_dir=theirs))
    assert handed.is_relative_to(theirs.resolve()) and not handed.resolve().is_relative_to(theirs.resolve())
    assert handed.resolve() == (theirs.parent / "escaped").resolve()

    ours = tmp_path / "ours" / "cache"
    with pytest.raises(HubError) as info:
        load_teacher("hf-hub:alice/vit-remem", cache_dir=ours)
    escaped = str((ours.parent / "escaped").resolve())
    assert re.search(rf"huggingface_hub handed back '{re.escape(str(ours.resolve()))}/models--alice--vit-remem/"
                     rf"snapshots/[0-9a-f]{{40}}/{re.escape(file)}' for 'alice/vit-remem', which leads to "
                     rf"'{re.escape(escaped)}', outside the Hub cache '{re.escape(str(ours.resolve()))}'",
                     str(info.value)), str(info.value)
    assert "so nothing was read. Point HF_ENDPOINT at a Hugging Face Hub you trust" in str(info.value)
    with pytest.raises(HubError, match="outside the Hub cache"):
        fetch_teacher_files("hf-hub:alice/vit-remem", cache_dir=ours)  # hands back no folder either
    assert _outside(tmp_path / "ours", ours) != []  # what huggingface_hub wrote before we could refuse


@pytest.mark.parametrize("commit", ["../../../escaped", "/tmp/escaped"])
def test_a_commit_id_that_leads_out_of_the_cache_is_one_clear_error(hub, teacher, tmp_path, commit, nothing_read):
    push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE)
    hub.lie("config.json", X_Repo_Commit=commit)

    # huggingface_hub itself refuses this one (a ValueError of its own), before writing anything.
    theirs = tmp_path / "theirs" / "cache"
    with pytest.raises(ValueError, match="Invalid pointer path"):
        hf_hub_download("alice/vit-remem", "config.json", cache_dir=theirs)
    assert _outside(tmp_path / "theirs", theirs) == []

    ours = tmp_path / "ours" / "cache"
    with pytest.raises(HubError, match=r"cannot download 'alice/vit-remem' on \S+: the server sent a commit id that "
                                       r"would place files outside the Hub cache \(huggingface_hub refused it; nothing "
                                       r"was read\)\. Point HF_ENDPOINT at a Hugging Face Hub you trust\."):
        load_teacher("hf-hub:alice/vit-remem", cache_dir=ours)
    assert _outside(tmp_path / "ours", ours) == []


def test_a_missing_file_with_a_commit_id_out_of_the_cache(hub, teacher, tmp_path):
    """A 404 whose commit id leads out of the cache: huggingface_hub (2.x) records the missing file there, an empty
    marker file outside the cache; timm-remem reads nothing and reports the missing weights."""
    push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE)
    hub.repo("alice/vit-remem").commits[hub.repo("alice/vit-remem").branches["main"]].files.pop("model.safetensors")
    hub.lie("model.safetensors", X_Repo_Commit="../../../escaped")
    ours = tmp_path / "ours" / "cache"
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_teacher("hf-hub:alice/vit-remem", cache_dir=ours)
    assert _outside(tmp_path / "ours", ours) == ["escaped/model.safetensors"]  # huggingface_hub's doing
