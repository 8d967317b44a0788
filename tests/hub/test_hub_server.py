"""The test Hub server (tests/hub_server.py) against the real huggingface_hub client.

The reference is the client itself: every route is exercised through ``HfApi`` / ``hf_hub_download`` (or raw
HTTP where the headers are the point), and hashes are recomputed here with hashlib.
"""

from __future__ import annotations

import hashlib

import httpx2
import pytest
from hub_server import ALICE_READ, ALICE_WRITE, BOB_WRITE
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # the client's own call

REPO = "alice/demo"
CONFIG = b'{"architecture": "test_vit"}\n'
WEIGHTS = bytes(range(256)) * 40  # binary (NUL bytes): must go through LFS


def _upload(api: HfApi, repo_id: str = REPO, weights: bytes = WEIGHTS, **kwargs):
    return api.create_commit(
        repo_id,
        [CommitOperationAdd("config.json", CONFIG), CommitOperationAdd("weights/model.safetensors", weights)],
        commit_message="add files",
        **kwargs,
    )


def test_create_repo_conflicts_unless_exist_ok(hub):
    api = HfApi(token=ALICE_WRITE)
    url = api.create_repo(REPO)
    assert url == f"{hub.endpoint}/{REPO}"
    with pytest.raises(HfHubHTTPError) as info:
        api.create_repo(REPO)
    assert info.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO


def test_upload_stores_text_as_regular_and_binary_through_lfs(hub):
    api = HfApi(token=ALICE_WRITE)
    api.create_repo(REPO)
    info = _upload(api)
    files = hub.repo(REPO).commits[info.oid].files
    assert files["config.json"].sha256 is None
    assert files["weights/model.safetensors"].sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert hub.files(REPO) == {".gitattributes": hub.files(REPO)[".gitattributes"], "config.json": CONFIG,
                               "weights/model.safetensors": WEIGHTS}
    requests = [path for _, path in hub.requests]
    assert f"/{REPO}.git/info/lfs/objects/batch" in requests
    assert f"/{REPO}.git/info/lfs/objects/verify" in requests


def test_download_round_trip_and_commit_sha(hub):
    api = HfApi(token=ALICE_WRITE)
    api.create_repo(REPO)
    info = _upload(api)
    path = hf_hub_download(REPO, "weights/model.safetensors")
    assert open(path, "rb").read() == WEIGHTS
    assert f"/snapshots/{info.oid}/" in path
    assert api.model_info(REPO).sha == info.oid == api.list_repo_commits(REPO)[0].commit_id


def test_resolve_headers_etags_and_ranges(hub):
    api = HfApi(token=ALICE_WRITE)
    api.create_repo(REPO)
    info = _upload(api)
    base = f"{hub.endpoint}/{REPO}/resolve/main"
    regular = httpx2.head(f"{base}/config.json")
    git_sha1 = hashlib.sha1(b"blob %d\0" % len(CONFIG) + CONFIG).hexdigest()
    assert regular.headers["X-Repo-Commit"] == info.oid
    assert regular.headers["ETag"] == f'"{git_sha1}"'
    assert "X-Linked-Etag" not in regular.headers
    lfs = httpx2.head(f"{base}/weights/model.safetensors")
    assert lfs.headers["X-Linked-Etag"] == f'"{hashlib.sha256(WEIGHTS).hexdigest()}"'
    assert lfs.headers["X-Linked-Size"] == str(len(WEIGHTS))
    part = httpx2.get(f"{base}/weights/model.safetensors", headers={"Range": "bytes=10-19"})
    assert (part.status_code, part.content, part.headers["Content-Range"]) == (206, WEIGHTS[10:20],
                                                                                f"bytes 10-19/{len(WEIGHTS)}")
    assert httpx2.get(f"{base}/config.json", headers={"Range": "bytes=-5"}).content == CONFIG[-5:]
    assert httpx2.get(f"{base}/config.json", headers={"Range": "bytes=999-"}).status_code == 416


def test_typed_errors_for_missing_repo_revision_and_file(hub):
    api = HfApi(token=ALICE_WRITE)
    api.create_repo(REPO)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/missing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="nope")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "missing.json")


def test_private_repo_is_hidden_from_anonymous_and_other_users(hub):
    HfApi(token=ALICE_WRITE).create_repo(REPO, private=True)
    with pytest.raises(RepositoryNotFoundError) as anonymous:
        HfApi().model_info(REPO, token=False)
    assert anonymous.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=BOB_WRITE).model_info(REPO)
    assert HfApi(token=ALICE_READ).model_info(REPO).private is True


def test_tokens_roles_and_namespaces(hub):
    assert HfApi(token=ALICE_WRITE).whoami()["orgs"][0]["name"] == "remem-lab"
    with pytest.raises(HfHubHTTPError) as invalid:
        HfApi(token="hf_not_a_token").whoami()
    assert invalid.value.response.status_code == 401
    HfApi(token=ALICE_WRITE).create_repo("remem-lab/shared")  # organisation member
    HfApi(token=ALICE_WRITE).create_repo(REPO)
    for token, repo in ((ALICE_READ, REPO), (BOB_WRITE, REPO), (BOB_WRITE, "remem-lab/shared")):
        with pytest.raises(HfHubHTTPError) as refused:
            _upload(HfApi(token=token), repo)
        assert refused.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as foreign:
        HfApi(token=BOB_WRITE).create_repo("alice/other")
    assert foreign.value.response.status_code == 403


def test_tree_paths_info_refs_and_branches(hub):
    api = HfApi(token=ALICE_WRITE)
    api.create_repo(REPO)
    _upload(api)
    assert [f.path for f in api.list_repo_tree(REPO)] == [".gitattributes", "config.json", "weights"]
    assert sorted(api.list_repo_files(REPO)) == [".gitattributes", "config.json", "weights/model.safetensors"]
    infos = api.get_paths_info(REPO, ["config.json", "weights/model.safetensors", "absent"])
    assert [i.path for i in infos] == ["config.json", "weights/model.safetensors"]
    assert infos[1].lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    api.create_branch(REPO, branch="v2")
    _upload(api, weights=WEIGHTS[::-1], revision="v2")
    refs = {r.name: r.target_commit for r in api.list_repo_refs(REPO).branches}
    assert refs["v2"] != refs["main"]
    assert open(hf_hub_download(REPO, "weights/model.safetensors", revision="v2"), "rb").read() == WEIGHTS[::-1]


def test_commit_deletes_files_and_folders(hub):
    api = HfApi(token=ALICE_WRITE)
    api.create_repo(REPO)
    _upload(api)
    api.create_commit(REPO, [CommitOperationDelete("config.json"), CommitOperationDelete("weights/")],
                      commit_message="clean up")
    assert api.list_repo_files(REPO) == [".gitattributes"]
    with pytest.raises(EntryNotFoundError):
        api.create_commit(REPO, [CommitOperationDelete("config.json")], commit_message="again")


def test_dataset_repositories_use_their_url_prefix(hub):
    api = HfApi(token=ALICE_WRITE)
    api.create_repo(REPO, repo_type="dataset")
    api.upload_file(path_or_fileobj=WEIGHTS, path_in_repo="data.bin", repo_id=REPO, repo_type="dataset")
    assert open(hf_hub_download(REPO, "data.bin", repo_type="dataset"), "rb").read() == WEIGHTS
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(REPO)  # the model namespace is separate


def test_settings_and_delete(hub):
    api = HfApi(token=ALICE_WRITE)
    api.create_repo(REPO)
    api.update_repo_settings(REPO, private=True)
    with pytest.raises(RepositoryNotFoundError):
        HfApi().model_info(REPO, token=False)
    api.delete_repo(REPO)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(REPO)


def test_unchanged_upload_makes_no_commit_and_stale_parent_is_refused(hub):
    api = HfApi(token=ALICE_WRITE)
    api.create_repo(REPO)
    first = _upload(api)
    assert _upload(api).oid == first.oid  # nothing changed: the client skips the commit
    _upload(api, weights=WEIGHTS[1:])
    with pytest.raises(HfHubHTTPError) as stale:
        _upload(api, weights=WEIGHTS[2:], parent_commit=first.oid)
    assert stale.value.response.status_code == 412


def test_crash_on_commit_applies_nothing_and_restart_keeps_state(hub):
    api = HfApi(token=ALICE_WRITE)
    api.create_repo(REPO)
    first = _upload(api)
    hub.crash_on("POST", r"/commit/")
    with pytest.raises(httpx2.TransportError):
        _upload(api, weights=WEIGHTS[::-1])
    assert not hub.running
    with pytest.raises(httpx2.TransportError):  # refused, reset or dropped while the listening socket closes
        httpx2.get(f"{hub.endpoint}/api/models/{REPO}")
    hub.restart()
    assert api.model_info(REPO).sha == first.oid
    assert hub.files(REPO)["weights/model.safetensors"] == WEIGHTS
