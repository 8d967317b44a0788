"""The old import paths keep working: ``timm_remem.pipeline`` forwards to ``timm_remem.train`` with a warning."""

from __future__ import annotations

import importlib

import pytest

import timm_remem.train as train

# Every public name timm_remem.pipeline had (its __all__ and its constants).
OLD_PUBLIC = ["TrainConfig", "FinetuneConfig", "DistillConfig", "TrainResult", "SelectResult", "DemoResult",
              "finetune_teacher", "distill_student", "select_teacher", "run_demo", "METRICS_FILE", "STATE_DIR",
              "EXPORT_DIR", "DEMO_TEACHER", "DEMO_TEACHER_KWARGS", "DEMO_STUDENT", "DEMO_STUDENT_KWARGS", "DEMO_ALPHA",
              "DEMO_RHO"]


@pytest.mark.parametrize("name", OLD_PUBLIC)
def test_pipeline_names_forward_to_train_with_a_deprecation_warning(name):
    pipeline = importlib.import_module("timm_remem.pipeline")
    with pytest.warns(DeprecationWarning, match=r"timm_remem\.pipeline is now timm_remem\.train"):
        value = getattr(pipeline, name)
    assert value is getattr(train, name)


def test_private_helpers_used_by_the_benchmarks_still_resolve():
    from timm_remem.train.builders import resolve_device
    from timm_remem.train.loop import check_finite, train_step

    pipeline = importlib.import_module("timm_remem.pipeline")
    with pytest.warns(DeprecationWarning):
        assert pipeline._train_step is train_step
    with pytest.warns(DeprecationWarning):
        assert pipeline._check_finite is check_finite
    with pytest.warns(DeprecationWarning):
        assert pipeline._device is resolve_device


def test_unknown_pipeline_name_is_an_attribute_error():
    pipeline = importlib.import_module("timm_remem.pipeline")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pipeline.nope  # noqa: B018


@pytest.mark.parametrize(("module", "names"), [
    ("timm_remem.checkpoint", ["CheckpointInfo", "save_checkpoint", "load_checkpoint", "verify_checkpoint",
                               "list_checkpoints", "latest_checkpoint", "resolve_checkpoint", "flatten_state",
                               "unflatten_state", "get_rng_state", "set_rng_state", "FORMAT", "MANIFEST"]),
    ("timm_remem.data", ["DigitsDataset", "EpochSampler", "IndexedDataset", "create_dataset", "create_loader",
                         "dataset_num_classes", "IMAGENET_MEAN", "IMAGENET_STD"]),
    ("timm_remem.distributed", ["init_distributed", "is_distributed", "get_rank", "get_world_size", "barrier",
                                "all_reduce_sum", "all_reduce_max", "broadcast_object", "broadcast_buffers",
                                "all_gather_object", "cleanup", "env_world_size", "env_local_rank"]),
])
def test_the_training_support_modules_keep_their_names(module, names):
    mod = importlib.import_module(module)
    assert [n for n in names if not hasattr(mod, n)] == []
