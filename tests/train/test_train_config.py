"""Tests for timm_remem.train.config: field help for the command line, validation messages, JSON round trips."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from timm_remem._version import __version__
from timm_remem.errors import ConfigError
from timm_remem.lora import check_lora_settings
from timm_remem.train import DistillConfig, FinetuneConfig, TrainConfig
from timm_remem.train.config import make_config

CONFIGS = [TrainConfig, FinetuneConfig, DistillConfig]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_has_one_line_command_line_help(cls):
    for f in dataclasses.fields(cls):
        text = f.metadata.get("help")
        assert isinstance(text, str) and text.strip(), f.name
        assert "\n" not in text and "``" not in text, f.name  # plain text for argparse
        assert not re.search(r"\bdefault\b", text), f.name  # the CLI appends the default itself


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_is_documented_once_and_its_docstring_is_made_from_it(cls):
    # the help is written once, in the field's metadata; the CLI and the class docstring read it from there
    assert all(f.metadata.get("help", "").strip() for f in dataclasses.fields(cls)), "a field without help"
    documented = {}
    for klass in cls.__mro__:
        documented.update(dict(re.findall(r"^ {8}(\w+): (.*)$", klass.__doc__ or "", re.M)))
    assert {f.name for f in dataclasses.fields(cls)} <= set(documented)
    for f in dataclasses.fields(cls):
        first_words = " ".join(f.metadata["help"].split()[:4])
        assert documented[f.name].lower().startswith(first_words.lower()), (f.name, documented[f.name])


def test_dict_defaults_are_not_shared_between_instances():
    a, b = DistillConfig(model="m"), DistillConfig(model="m")
    a.model_kwargs["depth"] = 2
    a.teacher_kwargs["x"] = 1
    assert b.model_kwargs == {} and b.teacher_kwargs == {}


def test_round_trip_through_json_is_sorted_and_versioned():
    cfg = FinetuneConfig(model="test_vit", alpha=0.85, save_at=[3, 1, 3], epochs=3)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert list(data) == sorted(data) and data["version"] == __version__
    assert data["save_at"] == [1, 3]
    assert FinetuneConfig.from_dict(data) == cfg


def test_unknown_keys_are_dropped_with_a_warning():
    with pytest.warns(UserWarning, match=r"DistillConfig: ignoring unknown keys \['from_the_future'\]"):
        cfg = DistillConfig.from_dict({"model": "test_resnet", "from_the_future": 1, "version": "9.9"})
    assert cfg.model == "test_resnet"


BAD = [
    (TrainConfig, {"epochs": 0}, r"epochs must be a positive integer, got 0"),
    (TrainConfig, {"batch_size": True}, r"batch_size must be a positive integer, got True"),
    (TrainConfig, {"lr": 0}, r"lr must be a finite number > 0, got 0"),
    (TrainConfig, {"lr": float("inf")}, r"lr must be a finite number > 0, got inf"),
    (TrainConfig, {"weight_decay": -1}, r"weight_decay must be a finite number >= 0, got -1"),
    (TrainConfig, {"mixup": float("nan")}, r"mixup must be a finite number >= 0, got nan"),
    (TrainConfig, {"label_smoothing": 1.0}, r"label_smoothing must be a finite number in \[0, 1\), got 1\.0"),
    (TrainConfig, {"ema_decay": 1.0}, r"ema_decay must be a finite number in \[0, 1\), got 1\.0; 0\.998 is a common"),
    (TrainConfig, {"clip_grad": 0}, r"clip_grad must be a finite number > 0 or None, got 0"),
    (TrainConfig, {"img_size": 0}, r"img_size must be a positive integer or None, got 0"),
    (TrainConfig, {"epochs": 2, "save_at": [3]}, r"save_at epochs \[3\] are outside 1\.\.epochs=2"),
    (TrainConfig, {"rho": 0.1, "optimizer": "lamb"}, r"SAM \(rho=0\.1\) wraps sgd, momentum, adam or adamw"),
    (TrainConfig, {"model": ""}, r"model must be a timm model name"),
    (FinetuneConfig, {"alpha": 0}, r"alpha must be a finite number > 0 or None, got 0; ReMem uses \(0, 1\]"),
    (FinetuneConfig, {"schedule": "linear"}, r"schedule must be 'exponential' or 'constant', got 'linear'"),
    (FinetuneConfig, {"top_k": 2}, r"top_k and learnable configure reweighting: also pass alpha"),
    (DistillConfig, {"method": "soft"}, r"method must be one of 'kd', 'hard', 'dist', got 'soft'"),
    (DistillConfig, {"temperature": 0}, r"temperature must be a finite number > 0, got 0"),
    (DistillConfig, {"task_weight": -1}, r"task_weight must be a finite number >= 0, got -1"),
    (DistillConfig, {"cache_teacher": True, "mixup": 0.2}, r"cache_teacher=True needs deterministic inputs"),
]


@pytest.mark.parametrize(("cls", "kwargs", "match"), BAD, ids=[f"{c.__name__}-{next(iter(k))}" for c, k, _ in BAD])
def test_bad_settings_are_refused_with_the_value_and_the_rule(cls, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        cls(**{"model": "test_vit", **kwargs})


def test_make_config_overrides_a_config_and_refuses_unknown_options():
    base = DistillConfig(model="test_resnet", epochs=3)
    assert make_config(DistillConfig, base, {"epochs": 1}).epochs == 1 and base.epochs == 3
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['epoch'\] for DistillConfig"):
        make_config(DistillConfig, base, {"epoch": 1})
    with pytest.raises(ConfigError, match="config must be a DistillConfig, got FinetuneConfig"):
        make_config(DistillConfig, FinetuneConfig(model="test_vit"), {})


def test_lora_fields_round_trip_and_are_in_the_saved_config():
    cfg = FinetuneConfig(model="test_vit", lora_rank=8, lora_alpha=16, lora_dropout=0.1,
                         lora_targets=["qkv", "fc1", "qkv"])
    data = json.loads(json.dumps(cfg.to_dict()))
    assert {k: data[k] for k in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")} == {
        "lora_rank": 8, "lora_alpha": 16.0, "lora_dropout": 0.1, "lora_targets": ["qkv", "fc1"]}
    assert FinetuneConfig.from_dict(data) == cfg
    full = FinetuneConfig(model="test_vit").to_dict()
    assert (full["lora_rank"], full["lora_alpha"], full["lora_targets"]) == (None, None, None)  # a resume diffs them


def test_lora_settings_are_checked_by_the_same_function_as_apply_lora():
    for kwargs in ({"lora_rank": 4, "lora_alpha": -1.0}, {"lora_rank": 4, "lora_dropout": 1.0},
                   {"lora_rank": 4, "lora_targets": "qkv"}):
        with pytest.raises(ConfigError) as ours:
            FinetuneConfig(model="test_vit", **kwargs)
        with pytest.raises(ConfigError) as theirs:
            check_lora_settings(kwargs["lora_rank"], kwargs.get("lora_alpha"), kwargs.get("lora_dropout", 0.0),
                                kwargs.get("lora_targets"))
        assert str(ours.value) == str(theirs.value)
