"""Tests for timm_remem.hub.push: publishing on a Hub-compatible server on loopback (tests/hub_server.py).

References: plain timm loading ``hf-hub:`` for what was published, the server's own record of repositories,
branches and requests, and the hook-based teacher of ``hub_teachers`` for outputs.
"""

from __future__ import annotations

import pytest
import timm
import torch
from hub_server import ALICE_READ, ALICE_WRITE, BOB_WRITE
from hub_teachers import META, out
from huggingface_hub import constants

from timm_remem.errors import HubError
from timm_remem.hub import load_teacher, push_to_hub

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's own call


def test_push_then_plain_timm_loads_the_teacher_in_one_line(hub, teacher):
    model, reference = teacher
    url = push_to_hub(model, "alice/vit-remem", token=ALICE_WRITE, **META)
    sha = hub.repo("alice/vit-remem").branches["main"]
    assert url == f"{hub.endpoint}/alice/vit-remem/commit/{sha}"
    assert len(hub.repo("alice/vit-remem").commits) == 2  # the repository's initial commit, then one upload
    assert set(hub.files("alice/vit-remem")) == {".gitattributes", "config.json", "model.safetensors", "README.md"}
    loaded = timm.create_model("hf-hub:alice/vit-remem", pretrained=True)
    torch.testing.assert_close(out(loaded), out(reference), atol=1e-5, rtol=1e-5)


def test_pushed_teacher_resolves_the_right_preprocessing(hub, teacher):
    push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE)
    loaded = timm.create_model("hf-hub:alice/vit-remem", pretrained=True)
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in timm.data.resolve_model_data_config(loaded).items()}
    # test_vit built with img_size=32; its default pretrained_cfg says 160 px, mean = std = 0.5, bicubic, 0.95
    assert config == {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5),
                      "std": (0.5, 0.5, 0.5), "crop_pct": 0.95, "crop_mode": "center"}
    assert loaded.pretrained_cfg["hf_hub_id"] == "alice/vit-remem" and loaded.num_classes == 5


def test_push_to_a_new_branch_leaves_main_alone(hub, teacher, other):
    second, reference = other
    push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE)
    main = hub.repo("alice/vit-remem").branches["main"]
    push_to_hub(second, "alice/vit-remem", token=ALICE_WRITE, revision="v2")
    assert hub.repo("alice/vit-remem").branches["main"] == main
    torch.testing.assert_close(out(load_teacher("hf-hub:alice/vit-remem@v2")), out(reference), atol=1e-5,
                               rtol=1e-5)


def test_commit_message_names_the_architecture_unless_given(hub, teacher, other):
    push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE)
    push_to_hub(other[0], "alice/vit-remem", token=ALICE_WRITE, commit_message="Second try")
    repo = hub.repo("alice/vit-remem")
    titles = [c.title for c in repo.commits.values()]
    assert titles[-2:] == ["Upload ReMem teacher test_vit", "Second try"]


def test_wrong_token_is_refused_with_one_clear_message(hub, teacher):
    with pytest.raises(HubError, match=r"rejected the token \(401 Unauthorized\).*invalid, expired or revoked") as e:
        push_to_hub(teacher[0], "alice/vit-remem", token="hf_wrong")
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no stack of HTTP internals
    assert ("model", "alice/vit-remem") not in hub.repos


@pytest.mark.parametrize(("token", "repo_id"), [(BOB_WRITE, "alice/vit-remem"), (ALICE_READ, "alice/vit-remem"),
                                                (BOB_WRITE, "remem-lab/vit-remem")])
def test_writing_to_a_foreign_namespace_is_refused(hub, teacher, token, repo_id):
    namespace = repo_id.split("/")[0]
    with pytest.raises(HubError, match=rf"403 Forbidden\): it has no write access to the namespace '{namespace}'"):
        push_to_hub(teacher[0], repo_id, token=token)


def test_writing_to_someone_elses_existing_repo_is_refused(hub, teacher, other):
    push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE)
    before = hub.repo("alice/vit-remem").branches["main"]
    with pytest.raises(HubError, match=r"403 Forbidden"):
        push_to_hub(other[0], "alice/vit-remem", token=BOB_WRITE)
    assert hub.repo("alice/vit-remem").branches["main"] == before


def test_push_without_any_token_is_refused_before_contacting_the_hub(hub, teacher):
    with pytest.raises(HubError, match="needs a Hugging Face token with the write role"):
        push_to_hub(teacher[0], "alice/vit-remem")
    assert hub.requests == []


def test_unreachable_hub_is_one_clear_message(hub, teacher, no_retry_wait):
    hub.stop()
    with pytest.raises(HubError, match="the connection to the Hub failed .*Check the network connection") as e:
        push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE)
    assert "Traceback" not in str(e.value)
    with pytest.raises(HubError, match="cannot reach the Hub at .* not in the local cache"):
        load_teacher("hf-hub:alice/vit-remem")


def test_client_with_xet_enabled_is_told_to_disable_it(hub, teacher, monkeypatch):
    pytest.importorskip("hf_xet")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    with pytest.raises(HubError, match="offers no Xet storage.*set HF_HUB_DISABLE_XET=1"):
        push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE)


@pytest.mark.parametrize(
    ("method", "route", "after_bytes"),
    [("POST", r"/api/models/alice/vit-remem/commit/", None), ("PUT", r"/__lfs_upload/", 4096)],
    ids=["during-commit", "during-weights-upload"],
)
def test_server_killed_mid_upload_leaves_nothing_published(hub, teacher, other, no_retry_wait, method, route,
                                                          after_bytes):
    model, reference = teacher
    push_to_hub(model, "alice/vit-remem", token=ALICE_WRITE)
    published = hub.repo("alice/vit-remem").branches["main"]
    hub.crash_on(method, route, after_bytes=after_bytes)
    with pytest.raises(HubError, match="the connection to the Hub failed.*The push did not complete"):
        push_to_hub(other[0], "alice/vit-remem", token=ALICE_WRITE)
    hub.restart()
    assert hub.repo("alice/vit-remem").branches["main"] == published
    torch.testing.assert_close(out(timm.create_model("hf-hub:alice/vit-remem", pretrained=True)), out(reference),
                               atol=1e-5, rtol=1e-5)
