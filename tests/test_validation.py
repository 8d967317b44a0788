"""The shared checkers of ``timm_remem._validation``: what they accept, what they refuse, and what they say."""

from __future__ import annotations

import math

import numpy as np
import pytest

from timm_remem._validation import check_bool, check_choice, check_class_count, check_float, check_int
from timm_remem.errors import ConfigError


@pytest.mark.parametrize("value", [1, 7, np.int64(3)])
def test_check_int_accepts_integers_in_range(value):
    assert check_int("epochs", value, low=1) == int(value)
    assert type(check_int("epochs", value, low=1)) is int


@pytest.mark.parametrize("value", [0, -1, True, False, 1.0, "3", None, 2.5])
def test_check_int_refuses_with_the_name_and_value(value):
    with pytest.raises(ConfigError, match=rf"^epochs must be a positive integer, got {value!r}$".replace("(", r"\(")
                       .replace(")", r"\)")):
        check_int("epochs", value, low=1)


def test_check_int_range_words_and_none():
    with pytest.raises(ConfigError, match=r"top_k must be an integer in \[1, 12\] or None, got 13"):
        check_int("top_k", 13, low=1, high=12, allow_none=True)
    assert check_int("top_k", None, low=1, allow_none=True) is None
    with pytest.raises(ConfigError, match=r"keep must be an integer >= 0, got -2; use 0 to keep none"):
        check_int("keep", -2, low=0, hint="use 0 to keep none")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "0.1", None])
def test_check_float_refuses_non_finite_bool_and_strings(value):
    with pytest.raises(ConfigError, match="rho must be a finite number >= 0"):
        check_float("rho", value, low=0)


def test_check_float_open_and_closed_ends():
    assert check_float("p", 0.0, low=0, high=1, high_open=True) == 0.0
    with pytest.raises(ConfigError, match=r"p must be a finite number in \[0, 1\), got 1"):
        check_float("p", 1, low=0, high=1, high_open=True)
    with pytest.raises(ConfigError, match=r"lr must be a finite number > 0, got 0"):
        check_float("lr", 0, low=0, low_open=True)
    assert check_float("x", np.float32(0.5), low=0) == 0.5
    assert check_float("x", None, allow_none=True) is None


def test_check_bool_and_choice():
    assert check_bool("amp", True) is True
    for bad in (1, 0, "yes", None):
        with pytest.raises(ConfigError, match="amp must be True or False"):
            check_bool("amp", bad)
    assert check_choice("method", "kd", ("kd", "dist")) == "kd"
    with pytest.raises(ConfigError, match=r"method must be one of 'kd', 'dist', got 'KD'"):
        check_choice("method", "KD", ("kd", "dist"))


def test_check_class_count():
    check_class_count(10, 10)
    check_class_count(None, 10)  # a model without a head is not checked
    expected = r"^teacher has 7 classes but student has 5; distillation needs the same label space: create the student"
    with pytest.raises(ConfigError, match=expected):
        check_class_count(7, 5)
    with pytest.raises(ConfigError, match=r"teacher 'x' has 7 classes but dataset 'digits' has 10; retrain it"):
        check_class_count(7, 10, teacher="teacher 'x'", other="dataset 'digits'", fix="retrain it")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"ema": "false"}, r"ema must be true or false, got 'false'"),
    ({"pretrained": "False"}, r"pretrained must be true or false"),
    ({"alpha": 0.8, "learnable": "no"}, r"learnable must be true or false"),
    ({"seed": 1.5}, r"seed must be an integer in \[0, 4\.29497e\+09\], got 1\.5"),
    ({"seed": True}, r"seed must be an integer in .*, got True"),
    ({"seed": -1}, r"seed must be an integer in \[0, 4\.29497e\+09\], got -1"),
    ({"seed": 2**40}, r"seed must be an integer in \[0, 4\.29497e\+09\]"),
    ({"num_workers": -1}, r"num_workers must be an integer >= 0, got -1; 0 loads in the main process"),
    ({"eval_batch_size": 10**20}, r"eval_batch_size is out of range"),
    ({"epochs": 10**400}, r"epochs is out of range"),
    ({"epochs": 3, "save_at": [1.7]}, r"save_at epoch must be an integer, got 1\.7"),
])
def test_configs_check_every_field_against_its_type(kwargs, match):
    # The Python API gets the same type checks as --config files: a string never reads as True, a float is no int,
    # numbers that no library downstream takes are refused with the setting's name (not numpy's or islice's error).
    from timm_remem.train import FinetuneConfig

    with pytest.raises(ConfigError, match=match):
        FinetuneConfig(model="test_vit", **kwargs)


def test_study_config_bools_take_only_bools():
    from timm_remem.study import StudyConfig

    with pytest.raises(ConfigError, match="progress must be True or False, got 'false'"):
        StudyConfig(quick=True, progress="false")


def test_paths_given_as_pathlib_are_recorded_as_text():
    # Python callers pass pathlib.Path for folders; the settings are recorded as JSON and compared on resume.
    from pathlib import Path

    from timm_remem.study import StudyConfig
    from timm_remem.train import DistillConfig, FinetuneConfig

    cfg = FinetuneConfig(model="test_vit", output=Path("runs/a"), data_dir=Path("data"), resume=Path("runs/a/x"))
    assert (cfg.output, cfg.data_dir, cfg.resume) == ("runs/a", "data", "runs/a/x")
    assert DistillConfig(model="test_resnet", teacher=Path("runs/a/checkpoints/epoch-001")).teacher == \
        "runs/a/checkpoints/epoch-001"
    assert StudyConfig(teacher="test_vit", student="test_resnet", output=Path("s")).output == "s"
