"""One error contract for every command (timm_remem.cli.main): bad input or usage exits 2, a failure while running
exits 1, each with one line on stderr; ``--debug``, before or after the command, adds the traceback.

The library call of each command is replaced by one that raises, so every command is checked the same way.
"""

from __future__ import annotations

import pytest

import timm_remem.cli as cli
from timm_remem.cli import analyze, demo, distill, finetune, inspect, select
from timm_remem.errors import CheckpointError, ConfigError, HubError, TrainingError, UnsupportedModelError

# command -> (argv that reaches the library call, the module and name of that call)
COMMANDS = {
    "finetune": (["finetune", "--model", "test_vit"], finetune, "finetune_teacher"),
    "distill": (["distill", "--model", "test_resnet"], distill, "distill_student"),
    "select": (["select", "ckpts", "--model", "test_resnet"], select, "select_teacher"),
    "demo": (["demo", "--quick"], demo, "run_demo"),
    "inspect": (["inspect", "test_vit"], inspect, "create_timm_model"),
    "analyze": (["analyze", "test_vit"], analyze, "run_analyses"),
}
ERRORS = [
    pytest.param(ConfigError("lr must be a finite number > 0, got 0"), 2, id="ConfigError"),
    pytest.param(UnsupportedModelError("ResNet has no transformer MLP residual branch"), 2, id="UnsupportedModel"),
    pytest.param(TrainingError("the loss is nan at step 3"), 1, id="TrainingError"),
    pytest.param(CheckpointError("checkpoint 'x' is truncated"), 1, id="CheckpointError"),
    pytest.param(HubError("the Hub answered 503"), 1, id="HubError"),
    pytest.param(OSError(28, "No space left on device"), 1, id="OSError"),
    pytest.param(ImportError("plots need matplotlib: pip install timm-remem[demo]"), 1, id="ImportError"),
]


def raising(monkeypatch, command: str, error: BaseException) -> list[str]:
    argv, module, name = COMMANDS[command]

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(module, name, fail)
    return argv


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize(("error", "code"), ERRORS)
def test_each_error_is_one_line_and_its_exit_status(command, error, code, monkeypatch, capsys):
    assert cli.main(raising(monkeypatch, command, error)) == code
    captured = capsys.readouterr()
    assert captured.err == f"timm-remem {command}: error: {error}\n"
    assert captured.out == ""


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unexpected_error_names_its_type_and_asks_for_debug(command, monkeypatch, capsys):
    assert cli.main(raising(monkeypatch, command, RuntimeError("shape mismatch\nin layer 3"))) == 1
    assert capsys.readouterr().err == (f"timm-remem {command}: error: RuntimeError: shape mismatch in layer 3 "
                                       "(unexpected: rerun with --debug and report the traceback)\n")


@pytest.mark.parametrize("where", ["before", "after"])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_debug_adds_the_traceback(command, where, monkeypatch, capsys):
    argv = raising(monkeypatch, command, TrainingError("the loss is nan at step 3"))
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "TrainingError: the loss is nan" in err
    assert err.splitlines()[-1] == f"timm-remem {command}: error: the loss is nan at step 3"


def test_debug_off_by_default_after_the_command():
    assert cli.build_parser().parse_args(["finetune", "--model", "m"]).debug is False
    assert cli.build_parser().parse_args(["--debug", "finetune", "--model", "m"]).debug is True


@pytest.mark.parametrize("command", list(COMMANDS))
def test_usage_errors_are_one_line_with_the_flag_and_exit_2(command, capsys):
    argv = [*COMMANDS[command][0], "--seed", "x"] if command != "inspect" else ["inspect", "test_vit", "--top-k", "x"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    flag = "--top-k" if command == "inspect" else "--seed"
    assert err == (f"timm-remem {command}: error: argument {flag}: invalid int value: 'x' "
                   f"(see 'timm-remem {command} --help')\n")


def test_a_refused_value_names_the_flag_that_set_it(capsys):
    assert cli.main(["finetune", "--model", "test_vit", "--epochs", "2", "--save-at", "5"]) == 2
    assert capsys.readouterr().err == ("timm-remem finetune: error: save_at epochs [5] are outside 1..epochs=2; pick "
                                       "epochs in range (set by --epochs; --save-at)\n")


def test_exit_code_is_by_kind():
    assert [cli.exit_code(e) for e in (ConfigError(), UnsupportedModelError(), TrainingError(), OSError(),
                                       KeyError())] == [2, 2, 1, 1, 1]
