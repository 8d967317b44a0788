"""Tests for timm_remem.hub.io: teacher folders written, found and loaded back, from disk and from the Hub.

References: the hook-based teacher of ``hub_teachers`` for outputs, plain timm for merged checkpoints, and the test
Hub server (tests/hub_server.py) for what was published.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from hub_server import ALICE_READ, ALICE_WRITE, BOB_WRITE
from hub_teachers import META, expected_scales, out
from huggingface_hub import constants, hf_hub_download
from safetensors.torch import load_file, save_file

import timm_remem
from timm_remem.errors import CheckpointError, ConfigError, HubError
from timm_remem.hub import fetch_teacher_files, load_teacher, push_to_hub, save_pretrained
from timm_remem.reweighting import ScaledBranch

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's own call


# ------------------------------------------------------------------------------------------ folders (no server)


def test_reference_differs_from_unscaled_model(teacher):
    model, reference = teacher
    plain = copy.deepcopy(model)
    timm_remem.unreweight(plain)
    assert not torch.allclose(out(plain), out(reference), atol=1e-3)  # the checks below can fail


def test_merged_folder_loads_in_plain_timm_with_the_teacher_outputs(teacher, tmp_path):
    model, reference = teacher
    save_pretrained(model, tmp_path, **META)
    assert not any(k.endswith("remem_scale") for k in load_file(tmp_path / "model.safetensors"))
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    torch.testing.assert_close(out(loaded), out(reference), atol=1e-5, rtol=1e-5)
    assert timm_remem.get_scales(model) == expected_scales()  # the caller's model was not merged


def test_unmerged_folder_round_trip_restores_structure_and_factors(teacher, tmp_path):
    model, reference = teacher
    save_pretrained(model, tmp_path, merge=False)
    loaded = load_teacher(tmp_path)
    assert timm_remem.get_scales(loaded) == expected_scales()
    assert all(isinstance(w.remem_scale, torch.nn.Parameter) for w in loaded.modules() if isinstance(w, ScaledBranch))
    assert timm_remem.get_reweight_config(loaded).alpha == 0.8
    torch.testing.assert_close(out(loaded), out(reference), atol=1e-6, rtol=1e-6)


def test_load_teacher_merge_true_returns_a_plain_model(teacher, tmp_path):
    model, reference = teacher
    save_pretrained(model, tmp_path, merge=False)
    loaded = load_teacher(f"local-dir:{tmp_path}", merge=True)
    assert not any(isinstance(m, ScaledBranch) for m in loaded.modules())
    assert timm_remem.get_reweight_config(loaded).merged is True
    torch.testing.assert_close(out(loaded), out(reference), atol=1e-5, rtol=1e-5)


def test_save_over_a_folder_replaces_the_teacher_files_and_keeps_others(teacher, other, tmp_path):
    save_pretrained(teacher[0], tmp_path, merge=False)
    (tmp_path / "notes.txt").write_text("mine")
    save_pretrained(other[0], tmp_path, merge=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary leftovers
    torch.testing.assert_close(out(load_teacher(tmp_path)), out(other[1]), atol=1e-6, rtol=1e-6)


def test_load_names_missing_and_unexpected_keys(teacher, tmp_path):
    model, _ = teacher
    save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["extra.weight"] = tensors.pop("blocks.0.mlp.fc2.bias")
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks\.0\.mlp\.fc2\.bias'\].*"
                                              r"unexpected keys \['extra\.weight'\]"):
        load_teacher(tmp_path)


def test_load_refuses_a_pickle_only_folder(teacher, tmp_path):
    model, _ = teacher
    save_pretrained(model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="model.safetensors' is missing.*never pickle"):
        load_teacher(tmp_path)


def test_load_teacher_rejects_an_unknown_source():
    with pytest.raises(ConfigError, match="not an existing folder.*hf-hub:namespace/name"):
        load_teacher("alice/vit-remem")


@pytest.mark.parametrize("prefix", ["", "local-dir:"])
def test_fetch_teacher_files_returns_a_local_folder_as_it_is(teacher, tmp_path, prefix):
    save_pretrained(teacher[0], tmp_path)
    assert fetch_teacher_files(f"{prefix}{tmp_path}") == tmp_path


@pytest.mark.parametrize(
    ("source", "kwargs", "error", "match"),
    [
        (42, {}, ConfigError, "name_or_path must be a string or a path, got int"),
        ("hf-hub:alice/vit@v1", {"revision": "v2"}, ConfigError, "two revisions given: 'v1' in"),
        ("hf-hub:alice", {}, ConfigError, "repo_id must be 'namespace/name'"),
    ],
)
def test_fetch_teacher_files_rejects_bad_sources_before_any_request(source, kwargs, error, match):
    with pytest.raises(error, match=match):
        fetch_teacher_files(source, **kwargs)


# ----------------------------------------------------------------------------------------- against the server


def test_fetch_teacher_files_downloads_one_snapshot(hub, teacher):
    push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE)
    folder = fetch_teacher_files("hf-hub:alice/vit-remem")
    assert (folder / "config.json").read_bytes() == hub.files("alice/vit-remem")["config.json"]
    assert (folder / "model.safetensors").read_bytes() == hub.files("alice/vit-remem")["model.safetensors"]
    assert folder.name == hub.repo("alice/vit-remem").branches["main"]  # the snapshot of the commit


def test_unmerged_push_and_load_teacher_round_trip(hub, teacher):
    model, reference = teacher
    push_to_hub(model, "remem-lab/vit-remem", merge=False, token=ALICE_WRITE)
    loaded = load_teacher("hf-hub:remem-lab/vit-remem")
    assert timm_remem.get_scales(loaded) == expected_scales()
    torch.testing.assert_close(out(loaded), out(reference), atol=1e-6, rtol=1e-6)
    assert loaded.pretrained_cfg["hf_hub_id"] == "remem-lab/vit-remem"


def test_private_repo_is_refused_without_a_token(hub, teacher):
    push_to_hub(teacher[0], "alice/secret", private=True, token=ALICE_WRITE)
    with pytest.raises(HubError, match="'alice/secret' on .* was not found, or it is private and no token was sent"):
        load_teacher("hf-hub:alice/secret")
    with pytest.raises(HubError, match="private and your token cannot see it"):
        load_teacher("hf-hub:alice/secret", token=BOB_WRITE)
    torch.testing.assert_close(out(load_teacher("hf-hub:alice/secret", token=ALICE_READ)), out(teacher[1]),
                               atol=1e-5, rtol=1e-5)


def test_missing_repo_and_revision_are_named(hub, teacher):
    with pytest.raises(HubError, match="repository 'alice/nothing' on .* was not found"):
        load_teacher("hf-hub:alice/nothing", token=ALICE_WRITE)
    push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE)
    with pytest.raises(HubError, match="revision 'v9' does not exist in 'alice/vit-remem'"):
        load_teacher("hf-hub:alice/vit-remem@v9")


def test_offline_load_from_the_cache(hub, teacher, monkeypatch):
    model, reference = teacher
    push_to_hub(model, "alice/vit-remem", token=ALICE_WRITE)
    push_to_hub(model, "alice/vit-remem-unmerged", merge=False, token=ALICE_WRITE)
    timm.create_model("hf-hub:alice/vit-remem", pretrained=True)  # fills the cache
    load_teacher("hf-hub:alice/vit-remem-unmerged")
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface_hub read the variable at import
    torch.testing.assert_close(out(timm.create_model("hf-hub:alice/vit-remem", pretrained=True)), out(reference),
                               atol=1e-5, rtol=1e-5)
    offline = load_teacher("hf-hub:alice/vit-remem-unmerged")
    assert timm_remem.get_scales(offline) == expected_scales()
    with pytest.raises(HubError, match="not in the local Hub cache and offline mode is on"):
        load_teacher("hf-hub:alice/never-downloaded")


def test_offline_with_only_the_config_cached_says_the_weights_are_not_cached(hub, teacher, monkeypatch):
    """A weights file missing from the cache is not a repository without weights (nothing to re-publish)."""
    push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE)
    hf_hub_download("alice/vit-remem", "config.json")  # an interrupted download: config cached, weights not
    hub.stop()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="'alice/vit-remem' is not in the local Hub cache and offline mode is on"):
        load_teacher("hf-hub:alice/vit-remem")


def test_factors_edited_in_config_json_are_a_record_checked_on_load_not_an_instruction(tmp_path):
    import json

    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3)
    timm_remem.reweight(model, alpha=0.5)
    folder = tmp_path / "t"
    save_pretrained(model, folder, merge=False)
    cfg = json.loads((folder / "config.json").read_text())
    true_factors = list(cfg["remem"]["factors"])
    cfg["remem"]["factors"] = [0.9] * len(true_factors)  # edited by hand
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="factor"):
        loaded = load_teacher(folder, merge=False)
    reported = timm_remem.get_reweight_config(loaded).factors
    assert reported == pytest.approx(true_factors, rel=1e-6)  # what the loaded tensors hold, not the edit
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(loaded(x), model(x))
