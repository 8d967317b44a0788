"""The teacher-source service: what a user may name as a teacher, and the errors for what is not one."""

from __future__ import annotations

import pytest
import timm
import torch

import timm_remem
from timm_remem.errors import CheckpointError, ConfigError
from timm_remem.teachers import NoCheckpointsError, is_export, list_exports, load_teacher_model


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=4)
    timm_remem.save_pretrained(model, root / "checkpoints" / "epoch-10")
    timm_remem.save_pretrained(model, root / "checkpoints" / "epoch-2")
    return root, model


def test_list_exports_natural_order_from_run_folder_checkpoints_or_one(export):
    root, _ = export
    assert [p.name for p in list_exports(root)] == ["epoch-2", "epoch-10"]
    assert [p.name for p in list_exports(root / "checkpoints")] == ["epoch-2", "epoch-10"]
    one = root / "checkpoints" / "epoch-10"
    assert list_exports(one) == [one]
    assert list_exports([one, root / "checkpoints" / "epoch-2"])[0] == one  # a list keeps its order


def test_half_written_and_weightless_folders_are_not_exports(tmp_path):
    for name in (".tmp-epoch-3-x", "weightless"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    (tmp_path / ".tmp-epoch-3-x" / "model.safetensors").write_bytes(b"")
    assert not is_export(tmp_path / ".tmp-epoch-3-x") and not is_export(tmp_path / "weightless")
    with pytest.raises(NoCheckpointsError, match="holds no teacher checkpoints") as info:
        list_exports(tmp_path)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, CheckpointError)


def test_missing_folder_and_empty_list(tmp_path):
    with pytest.raises(NoCheckpointsError, match="does not exist"):
        list_exports(tmp_path / "nope")
    with pytest.raises(NoCheckpointsError, match="no teacher checkpoints given"):
        list_exports([])
    with pytest.raises(NoCheckpointsError, match="not checkpoint folders"):
        list_exports([tmp_path])


def test_load_from_folder_gives_the_saved_weights(export):
    root, model = export
    loaded = load_teacher_model(root / "checkpoints" / "epoch-2", num_classes=4)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)
    assert not loaded.training


def test_class_count_unknown_name_and_bad_types(export, tmp_path):
    root, model = export
    with pytest.raises(ConfigError, match="teacher .*epoch-2' has 4 classes but dataset has 10"):
        load_teacher_model(root / "checkpoints" / "epoch-2", num_classes=10)
    with pytest.raises(ConfigError, match="unknown timm model 'not_a_model'"):
        load_teacher_model("not_a_model")
    with pytest.raises(ConfigError, match="got int"):
        load_teacher_model(3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load_teacher_model(tmp_path / "empty")
    assert load_teacher_model(model, num_classes=4) is model


def test_a_timm_name_keeps_its_own_head():
    t = load_teacher_model("test_vit", pretrained=False, model_kwargs={"img_size": 32})
    assert t.num_classes == timm.create_model("test_vit", pretrained=False, img_size=32).num_classes


def test_weights_that_cannot_be_had_offline_name_the_model_and_the_fixes(tmp_path, monkeypatch):
    # No network here and an empty cache: huggingface_hub's own error would name neither the model nor a way out.
    from huggingface_hub import constants

    from timm_remem.errors import HubError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(HubError, match=r"pretrained weights of 'test_vit' could not be had .*local-dir:.*"
                                       r"--no-teacher-pretrained"):
        load_teacher_model("test_vit", pretrained=True)
