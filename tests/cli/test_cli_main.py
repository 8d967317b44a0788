"""``timm-remem`` itself: the sub-command list, --version, exit codes and error lines (timm_remem.cli.main)."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import timm_remem
import timm_remem.cli as cli
from timm_remem.cli import distill, finetune
from timm_remem.errors import ConfigError

COMMANDS = ["finetune", "distill", "select", "demo", "study", "inspect", "analyze", "push"]


def test_help_lists_the_commands_in_order(capsys):
    assert cli.main(["--help"]) == 0
    listed = re.findall(r"^    (\w+)\s", capsys.readouterr().out, re.MULTILINE)
    assert listed == COMMANDS


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"timm-remem {timm_remem.__version__}\n"


def test_no_command_prints_the_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert capsys.readouterr().err.startswith("usage: timm-remem")


def test_unknown_command_exits_2(capsys):
    assert cli.main(["fnetune"]) == 2
    assert "invalid choice: 'fnetune'" in capsys.readouterr().err


def test_a_library_error_is_one_line_and_exit_2(monkeypatch, capsys):
    def refuse(**kwargs):
        raise ConfigError("lr must be a finite number > 0, got 0")

    monkeypatch.setattr(finetune, "finetune_teacher", refuse)
    assert cli.main(["finetune", "--model", "test_vit"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "timm-remem finetune: error: lr must be a finite number > 0, got 0\n"
    assert captured.out == ""


def test_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill, "distill_student", interrupted)
    assert cli.main(["distill", "--model", "test_resnet"]) == 130
    assert capsys.readouterr().err == "timm-remem distill: interrupted\n"


def test_python_dash_m_runs_the_command_line():
    done = subprocess.run([sys.executable, "-m", "timm_remem", "--version"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert (done.returncode, done.stdout) == (0, f"timm-remem {timm_remem.__version__}\n"), done.stderr


def test_importing_main_module_does_not_run_it():
    assert importlib.import_module("timm_remem.__main__").main is cli.main
