"""Tests for timm_remem.hub: Hub-format folders, push to and load from a Hub-compatible server on loopback.

The reference for a teacher's outputs is written here, independently of the reweighting module: the same perturbed
``test_vit`` without wrappers, with forward hooks multiplying each block's MLP output by its factor. Plain timm
(``timm.create_model("hf-hub:..." / "local-dir:...")``) is the reference loader for merged checkpoints.
"""

from __future__ import annotations

import argparse
import copy
import json

import pytest
import timm
import torch
from hub_server import ALICE_READ, ALICE_WRITE, BOB_WRITE, no_retry_waits, serving
from huggingface_hub import ModelCard, constants
from safetensors.torch import load_file, save_file

import timm_remem
from timm_remem.cli import push as push_cli
from timm_remem.errors import CheckpointError, ConfigError, HubError
from timm_remem.hub import TeacherMetadata, load_teacher, push_to_hub, save_pretrained
from timm_remem.reweighting import ScaledBranch

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's own call

FACTORS = [0.9, 0.8, 0.65, 0.5, 0.4, 0.3]  # "learned" factors, away from alpha=0.8's schedule and from 1
META = dict(base_model="timm/test_vit.r160_in1k", dataset="cifar100", rho=0.1, adaptive=True, epochs=3,
            teacher_accuracy=91.25, student_accuracies={"resnet18": 78.5}, license="apache-2.0")
X = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with serving(tmp_path / "hf_home", monkeypatch) as server:
        yield server


@pytest.fixture
def no_retry_wait(monkeypatch):
    no_retry_waits(monkeypatch)


def _make_teacher(seed: int = 0, factors: list[float] = FACTORS):
    """A reweighted test_vit with perturbed weights and factors, and an independent reference of its forward."""
    torch.manual_seed(seed)
    base = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    reference = copy.deepcopy(base).eval()
    for block, factor in zip(reference.blocks, factors, strict=True):
        block.mlp.register_forward_hook(lambda mod, args, out, f=factor: out * f)
    teacher = timm_remem.reweight(base, alpha=0.8, learnable=True)
    with torch.no_grad():
        for wrapper in teacher.modules():
            if isinstance(wrapper, ScaledBranch):
                wrapper.remem_scale.fill_(factors[wrapper.index])
    return teacher.eval(), reference


@pytest.fixture(scope="module")
def teacher():
    return _make_teacher()


@pytest.fixture(scope="module")
def other():
    """A second teacher (other weights and factors), for pushes that replace or must not replace the first."""
    return _make_teacher(seed=1, factors=FACTORS[::-1])


@torch.no_grad()
def _out(model):
    return model.eval()(X)


def _expected_scales():
    return {f"blocks.{i}.mlp": pytest.approx(f) for i, f in enumerate(FACTORS)}


# ------------------------------------------------------------------------------------------ folders (no server)


def test_reference_differs_from_unscaled_model(teacher):
    model, reference = teacher
    plain = copy.deepcopy(model)
    timm_remem.unreweight(plain)
    assert not torch.allclose(_out(plain), _out(reference), atol=1e-3)  # the checks below can fail


def test_merged_folder_loads_in_plain_timm_with_the_teacher_outputs(teacher, tmp_path):
    model, reference = teacher
    save_pretrained(model, tmp_path, **META)
    assert not any(k.endswith("remem_scale") for k in load_file(tmp_path / "model.safetensors"))
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
    torch.testing.assert_close(_out(loaded), _out(reference), atol=1e-5, rtol=1e-5)
    assert timm_remem.get_scales(model) == _expected_scales()  # the caller's model was not merged


def test_unmerged_folder_round_trip_restores_structure_and_factors(teacher, tmp_path):
    model, reference = teacher
    save_pretrained(model, tmp_path, merge=False)
    loaded = load_teacher(tmp_path)
    assert timm_remem.get_scales(loaded) == _expected_scales()
    assert all(isinstance(w.remem_scale, torch.nn.Parameter) for w in loaded.modules() if isinstance(w, ScaledBranch))
    assert timm_remem.get_reweight_config(loaded).alpha == 0.8
    torch.testing.assert_close(_out(loaded), _out(reference), atol=1e-6, rtol=1e-6)


def test_load_teacher_merge_true_returns_a_plain_model(teacher, tmp_path):
    model, reference = teacher
    save_pretrained(model, tmp_path, merge=False)
    loaded = load_teacher(f"local-dir:{tmp_path}", merge=True)
    assert not any(isinstance(m, ScaledBranch) for m in loaded.modules())
    assert timm_remem.get_reweight_config(loaded).merged is True
    torch.testing.assert_close(_out(loaded), _out(reference), atol=1e-5, rtol=1e-5)


def test_config_records_remem_block_and_rewrites_inherited_fields(teacher, tmp_path):
    model, _ = teacher
    save_pretrained(model, tmp_path, repo_id="alice/vit-remem", **META)
    config = json.loads((tmp_path / "config.json").read_text())
    remem = config["remem"]
    assert {k: remem[k] for k in ("alpha", "schedule", "top_k", "merged", "rho", "adaptive", "dataset", "epochs",
                                  "base_model", "version")} == {
        "alpha": 0.8, "schedule": "exponential", "top_k": None, "merged": True, "rho": 0.1, "adaptive": True,
        "dataset": "cifar100", "epochs": 3, "base_model": "timm/test_vit.r160_in1k",
        "version": timm_remem.__version__}
    assert remem["factors"] == pytest.approx(FACTORS)
    cfg = config["pretrained_cfg"]
    assert (cfg["tag"], cfg["license"], cfg["num_classes"], cfg["hf_hub_id"]) == (
        "remem_cifar100", "apache-2.0", 5, "alice/vit-remem")
    assert cfg["input_size"] == [3, 32, 32]


def test_inherited_license_is_dropped_when_none_is_given(teacher, tmp_path):
    model, _ = teacher
    assert model.pretrained_cfg["license"] == "apache-2.0"  # test_vit's own pretrained_cfg
    save_pretrained(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["pretrained_cfg"]
    assert "license" not in cfg and "hf_hub_id" not in cfg and cfg["tag"] == "remem"


def test_model_card_metadata_and_text(teacher, tmp_path):
    model, _ = teacher
    save_pretrained(model, tmp_path, repo_id="alice/vit-remem", **META)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "timm"
    assert set(card.data.tags) >= {"remem", "knowledge-distillation", "image-classification", "timm"}
    assert (card.data.base_model, card.data.datasets, card.data.license) == (
        "timm/test_vit.r160_in1k", ["cifar100"], "apache-2.0")
    values = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert values["Top-1 accuracy (%)"] == 91.25
    assert any("resnet18" in name and value == 78.5 for name, value in values.items())
    assert 'timm.create_model("hf-hub:alice/vit-remem", pretrained=True)' in card.text
    assert "arXiv:2506.23041" in card.text and "| SAM radius rho | 0.1 |" in card.text


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


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epoch": 3}, r"unknown keyword arguments \['epoch'\]"),
        ({"dataset": "cifar100", "teacher_accuracy": 0.91 * 1000}, "between 0 and 100"),
        ({"teacher_accuracy": 90.0}, "pass dataset="),
        ({"rho": -0.1}, "rho must be a finite number >= 0"),
        ({"repo_id": "no-namespace"}, "repo_id must be 'namespace/name'"),
    ],
)
def test_bad_arguments_raise_config_errors(teacher, tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        save_pretrained(teacher[0], tmp_path, **kwargs)


def test_load_teacher_rejects_an_unknown_source():
    with pytest.raises(ConfigError, match="not an existing folder.*hf-hub:namespace/name"):
        load_teacher("alice/vit-remem")


# ----------------------------------------------------------------------------------------- against the server


def test_push_then_plain_timm_loads_the_teacher_in_one_line(hub, teacher):
    model, reference = teacher
    url = push_to_hub(model, "alice/vit-remem", token=ALICE_WRITE, **META)
    sha = hub.repo("alice/vit-remem").branches["main"]
    assert url == f"{hub.endpoint}/alice/vit-remem/commit/{sha}"
    assert len(hub.repo("alice/vit-remem").commits) == 2  # the repository's initial commit, then one upload
    assert set(hub.files("alice/vit-remem")) == {".gitattributes", "config.json", "model.safetensors", "README.md"}
    loaded = timm.create_model("hf-hub:alice/vit-remem", pretrained=True)
    torch.testing.assert_close(_out(loaded), _out(reference), atol=1e-5, rtol=1e-5)


def test_pushed_teacher_resolves_the_right_preprocessing(hub, teacher):
    push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE)
    loaded = timm.create_model("hf-hub:alice/vit-remem", pretrained=True)
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in timm.data.resolve_model_data_config(loaded).items()}
    # test_vit built with img_size=32; its default pretrained_cfg says 160 px, mean = std = 0.5, bicubic, 0.95
    assert config == {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5),
                      "std": (0.5, 0.5, 0.5), "crop_pct": 0.95, "crop_mode": "center"}
    assert loaded.pretrained_cfg["hf_hub_id"] == "alice/vit-remem" and loaded.num_classes == 5


def test_unmerged_push_and_load_teacher_round_trip(hub, teacher):
    model, reference = teacher
    push_to_hub(model, "remem-lab/vit-remem", merge=False, token=ALICE_WRITE)
    loaded = load_teacher("hf-hub:remem-lab/vit-remem")
    assert timm_remem.get_scales(loaded) == _expected_scales()
    torch.testing.assert_close(_out(loaded), _out(reference), atol=1e-6, rtol=1e-6)
    assert loaded.pretrained_cfg["hf_hub_id"] == "remem-lab/vit-remem"


def test_push_to_a_new_branch_leaves_main_alone(hub, teacher, other):
    second, reference = other
    push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE)
    main = hub.repo("alice/vit-remem").branches["main"]
    push_to_hub(second, "alice/vit-remem", token=ALICE_WRITE, revision="v2")
    assert hub.repo("alice/vit-remem").branches["main"] == main
    torch.testing.assert_close(_out(load_teacher("hf-hub:alice/vit-remem@v2")), _out(reference), atol=1e-5,
                               rtol=1e-5)


def test_private_repo_is_refused_without_a_token(hub, teacher):
    push_to_hub(teacher[0], "alice/secret", private=True, token=ALICE_WRITE)
    with pytest.raises(HubError, match="'alice/secret' on .* was not found, or it is private and no token was sent"):
        load_teacher("hf-hub:alice/secret")
    with pytest.raises(HubError, match="private and your token cannot see it"):
        load_teacher("hf-hub:alice/secret", token=BOB_WRITE)
    torch.testing.assert_close(_out(load_teacher("hf-hub:alice/secret", token=ALICE_READ)), _out(teacher[1]),
                               atol=1e-5, rtol=1e-5)


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


def test_missing_repo_and_revision_are_named(hub, teacher):
    with pytest.raises(HubError, match="repository 'alice/nothing' on .* was not found"):
        load_teacher("hf-hub:alice/nothing", token=ALICE_WRITE)
    push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE)
    with pytest.raises(HubError, match="revision 'v9' does not exist in 'alice/vit-remem'"):
        load_teacher("hf-hub:alice/vit-remem@v9")


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
    torch.testing.assert_close(_out(timm.create_model("hf-hub:alice/vit-remem", pretrained=True)), _out(reference),
                               atol=1e-5, rtol=1e-5)


def test_offline_load_from_the_cache(hub, teacher, monkeypatch):
    model, reference = teacher
    push_to_hub(model, "alice/vit-remem", token=ALICE_WRITE)
    push_to_hub(model, "alice/vit-remem-unmerged", merge=False, token=ALICE_WRITE)
    timm.create_model("hf-hub:alice/vit-remem", pretrained=True)  # fills the cache
    load_teacher("hf-hub:alice/vit-remem-unmerged")
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface_hub read the variable at import
    torch.testing.assert_close(_out(timm.create_model("hf-hub:alice/vit-remem", pretrained=True)), _out(reference),
                               atol=1e-5, rtol=1e-5)
    offline = load_teacher("hf-hub:alice/vit-remem-unmerged")
    assert timm_remem.get_scales(offline) == _expected_scales()
    with pytest.raises(HubError, match="not in the local Hub cache and offline mode is on"):
        load_teacher("hf-hub:alice/never-downloaded")


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="timm-remem")
    push_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_push_keeps_saved_metadata_and_applies_overrides(hub, teacher, tmp_path, capsys):
    save_pretrained(teacher[0], tmp_path, merge=False, dataset="cifar100", rho=0.1)
    code = _cli(["push", str(tmp_path), "alice/vit-remem", "--token", ALICE_WRITE, "--rho", "0.2",
                 "--student-accuracy", "resnet18=78.5"])
    assert code == 0
    assert capsys.readouterr().out.strip().startswith(f"{hub.endpoint}/alice/vit-remem/commit/")
    remem = json.loads(hub.files("alice/vit-remem")["config.json"])["remem"]
    assert (remem["dataset"], remem["rho"], remem["student_accuracies"], remem["merged"]) == (
        "cifar100", 0.2, {"resnet18": 78.5}, True)
    torch.testing.assert_close(_out(timm.create_model("hf-hub:alice/vit-remem", pretrained=True)), _out(teacher[1]),
                               atol=1e-5, rtol=1e-5)


def test_cli_push_reports_hub_errors_in_one_line(hub, teacher, tmp_path, capsys):
    save_pretrained(teacher[0], tmp_path)
    assert _cli(["push", str(tmp_path), "alice/vit-remem", "--token", "hf_wrong"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("timm-remem push: error: the Hub rejected the token") and "Traceback" not in err


def test_metadata_dataclass_round_trip_ignores_unknown_keys():
    meta = TeacherMetadata(**META)
    with pytest.warns(UserWarning, match="ignoring unknown keys"):
        assert TeacherMetadata.from_dict({**meta.to_dict(), "future_field": 1}) == meta
