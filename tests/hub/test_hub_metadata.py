"""Tests for timm_remem.hub.metadata: what config.json records about a teacher, and TeacherMetadata's checks."""

from __future__ import annotations

import json

import pytest
import timm
from hub_teachers import FACTORS, META

import timm_remem
from timm_remem.errors import CheckpointError, ConfigError
from timm_remem.hub import TeacherMetadata, save_pretrained
from timm_remem.hub.metadata import reweight_config_from_block


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


def test_plain_model_records_no_reweighting(tmp_path):
    save_pretrained(timm.create_model("test_vit", pretrained=False, img_size=32), tmp_path)
    remem = json.loads((tmp_path / "config.json").read_text())["remem"]
    assert (remem["reweighted"], remem["factors"], remem["alpha"], remem["merged"]) == (False, [], None, True)


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


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"adaptive": "yes"}, r"adaptive must be True or False, got 'yes'; or None when it was not recorded"),
        ({"epochs": -1}, r"epochs must be an integer >= 0 or None, got -1"),
        ({"epochs": True}, r"epochs must be an integer >= 0 or None, got True"),
        ({"dataset": "d", "student_accuracies": {"resnet18": 101}},
         r"student_accuracies\['resnet18'\] must be a finite number in \[0, 100\], got 101; give the top-1 accuracy "
         r"in percent"),
        ({"dataset": "d", "teacher_accuracy": float("nan")}, r"teacher_accuracy must be a finite number"),
        ({"dataset": " "}, r"dataset must be a non-empty string or None, got ' '"),
        ({"student_accuracies": [("resnet18", 70)]}, r"student_accuracies must be a dict"),
        ({"rho": True}, r"rho must be a finite number >= 0 \(the SAM radius, e\.g\. 0\.05\), got True"),
    ],
)
def test_metadata_checks_name_the_field_and_the_value(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TeacherMetadata(**kwargs)


def test_metadata_normalises_numbers():
    meta = TeacherMetadata(dataset="d", rho=1, teacher_accuracy=90, student_accuracies={"s": 70})
    assert (type(meta.rho), type(meta.teacher_accuracy), type(meta.student_accuracies["s"])) == (float, float, float)


def test_metadata_dataclass_round_trip_ignores_unknown_keys():
    meta = TeacherMetadata(**META)
    with pytest.warns(UserWarning, match="ignoring unknown keys"):
        assert TeacherMetadata.from_dict({**meta.to_dict(), "future_field": 1}) == meta


def test_metadata_from_dict_treats_none_as_not_recorded():
    assert TeacherMetadata.from_dict({"dataset": "d", "student_accuracies": None}) == TeacherMetadata(dataset="d")


def test_a_damaged_remem_block_is_a_checkpoint_error():
    with pytest.raises(CheckpointError, match="the 'remem' block of config.json is invalid"):
        reweight_config_from_block({"reweighted": True, "factors": [0.5], "alpha": "high"})


def test_a_model_reweighted_after_a_merge_records_the_product_its_weights_hold():
    from timm_remem.hub.card import model_card
    from timm_remem.hub.metadata import remem_block

    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3)
    depth = len(model.blocks)
    timm_remem.reweight(model, alpha=0.5)
    timm_remem.merge(model)
    timm_remem.reweight(model, alpha=0.8, compose=True)
    block = remem_block(model, TeacherMetadata(), merged=False)
    expected = [(0.5 * 0.8) ** (i + 1) for i in range(depth)]  # exponential: block i from the bottom, alpha^(i+1)
    assert block["total_factors"] == pytest.approx(expected, rel=1e-6)
    assert block["factors"] == pytest.approx([0.8 ** (i + 1) for i in range(depth)], rel=1e-6)
    card = str(model_card({"architecture": "test_vit", "num_classes": 3}, block, TeacherMetadata(), {}, "alice/t"))
    assert f"{expected[-1]:.6g}" in card
