"""``timm-remem study``: its flags (registered on our own parser), the config file under them, and --quick end to
end with intervals a test recomputes from the JSON."""

from __future__ import annotations

import argparse
import json

import pytest
import scipy.stats

from timm_remem.cli import build_parser, main
from timm_remem.cli import study as study_cmd
from timm_remem.errors import ConfigError
from timm_remem.study import study_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _parser():
    parser = argparse.ArgumentParser(prog="timm-remem")
    study_cmd.register(parser.add_subparsers(dest="command"))
    return parser


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"teacher": "vit_small_patch16_224", "student": "resnet18", "seeds": 5,
                                "finetune": {"lr": 0.01, "epochs": 9}}))
    args = _parser().parse_args(["study", "--config", str(path), "--seeds", "4", "--finetune", "lr=1e-4",
                                 "--epochs", "2", "--schedule", "exponential", "constant", "--no-mi",
                                 "--confidence", "0.9", "--device", "cpu", "--amp"])
    opts = study_cmd.options(args)
    assert opts == {"teacher": "vit_small_patch16_224", "student": "resnet18", "seeds": 4,
                    "finetune": {"lr": 1e-4, "epochs": 2}, "distill": {"epochs": 2}, "mi": None,
                    "schedule": ["exponential", "constant"], "confidence": 0.9, "device": "cpu", "amp": True}


def test_onepass_and_the_sharpness_options_from_flags_and_the_config_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("quick: true\narms: [plain, onepass]\nsharpness: {iters: 9, batches: 2}\n")
    args = _parser().parse_args(["study", "--config", str(path), "--sharpness", "batch-size=8", "iters=3",
                                 "rho=null"])
    opts = study_cmd.options(args)
    assert opts == {"quick": True, "arms": ["plain", "onepass"],
                    "sharpness": {"iters": 3, "batches": 2, "batch_size": 8, "rho": None}}
    cfg = study_config(**opts)
    assert cfg.arms == ["plain", "onepass"] and cfg.sharpness == {"batches": 2, "batch_size": 8, "iters": 3,
                                                                  "rho": None}
    off = study_cmd.options(_parser().parse_args(["study", "--config", str(path), "--no-sharpness"]))
    assert off["sharpness"] is None and study_config(**off).sharpness is None
    flags = study_cmd.options(_parser().parse_args(["study", "--quick", "--arms", "onepass", "sam"]))
    assert study_config(**flags).arms == ["sam", "onepass"]


def test_bad_sharpness_option_on_the_command_line_is_a_config_error(tmp_path):
    args = _parser().parse_args(["study", "--quick", "--sharpness", "iters=0", "--output", str(tmp_path / "s")])
    with pytest.raises(ConfigError, match="sharpness iters must be a positive integer, got 0"):
        args.func(args)
    assert not (tmp_path / "s").exists()


def test_a_flag_left_out_is_not_passed():
    assert study_cmd.options(_parser().parse_args(["study", "--quick"])) == {"quick": True}


def test_confidence_none_turns_intervals_off():
    args = _parser().parse_args(["study", "--quick", "--seeds", "1", "--confidence", "none"])
    assert study_cmd.options(args)["confidence"] is None


def test_bad_key_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["study", "--finetune", "lr"])
    assert "--finetune takes KEY=VALUE items such as lr=1e-3, got 'lr'" in capsys.readouterr().err


@pytest.mark.parametrize("debug", [[], ["--debug"]], ids=["plain", "with-debug"])
def test_a_setting_of_the_main_parser_is_not_a_study_setting(debug):
    args = build_parser().parse_args([*debug, "study", "--quick", "--seeds", "2"])
    assert study_cmd.options(args) == {"quick": True, "seeds": 2}


def test_quick_end_to_end_prints_the_table_and_writes_recomputable_intervals(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["study", "--quick", "--no-progress", "--output", str(out)]) == 0  # the real entry point
    text = capsys.readouterr().out
    assert "| arm " in text and f"wrote: {out / 'study.json'}" in text
    data = json.loads((out / "study.json").read_text())
    assert [a["arm"] for a in data["arms"]] == ["plain", "reweight", "sam", "remem", "student"]
    for arm in data["arms"]:
        values = [r["student_acc"] for r in data["runs"] if r["arm"] == arm["arm"]]
        assert len(values) == 2
        iv = arm["student_acc"]
        if values[0] == values[1]:
            assert iv["low"] == iv["high"] == values[0]
        else:
            low, high = scipy.stats.t.interval(0.95, 1, loc=sum(values) / 2, scale=scipy.stats.sem(values))
            assert (iv["low"], iv["high"]) == (pytest.approx(low), pytest.approx(high))
    assert set(data["stage_times_s"]) == {"teacher", "mi", "sharpness", "student"}
    assert "| arm " in text and "SAM increase (rho 0.05)" in text  # the sharpness table, printed too


def test_run_refuses_unknown_arms_before_anything_runs(tmp_path):
    args = _parser().parse_args(["study", "--quick", "--arms", "plain", "distilled", "--output", str(tmp_path / "s")])
    with pytest.raises(ConfigError, match=r"unknown arm\(s\) \['distilled'\]"):
        args.func(args)
    assert not (tmp_path / "s").exists()
