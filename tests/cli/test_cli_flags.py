"""The finetune / distill / select flags generated from the config dataclasses (timm_remem.cli._config_flags).

The expected flag lists are written out by hand (the flags of the 0.1 command line, which the README and docs use),
so a field that loses its flag, a renamed flag or a flag that leaks into ``select`` fails here.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field

import pytest

import timm_remem.cli as cli
from timm_remem.cli._config_flags import add_config_flags, config_options
from timm_remem.train import DistillConfig, FinetuneConfig

COMMON = [
    "--model", "--model-kwargs", "--pretrained", "--dataset", "--data-dir", "--download", "--img-size",
    "--num-classes", "--output", "--epochs", "--batch-size", "--eval-batch-size", "--opt", "--lr", "--weight-decay",
    "--momentum", "--sched", "--warmup-epochs", "--min-lr", "--smoothing", "--augment", "--mixup", "--cutmix", "--rho",
    "--adaptive", "--sam", "--amp", "--clip-grad", "--seed", "--device", "--workers", "--limit-train-batches",
    "--no-progress", "--log", "--config", "--debug", "--train-per-class", "--train-imbalance", "--subset-seed",
]
RUN_ONLY = ["--ema", "--ema-decay", "--save-at", "--checkpoint-every", "--keep-last", "--resume",
            "--resume-mismatch"]
DISTILLATION = ["--teacher-kwargs", "--no-teacher-pretrained", "--method", "--temperature", "--task-weight",
                "--distill-weight", "--cache-teacher", "--labels-per-class"]
FLAGS = {
    "finetune": COMMON + RUN_ONLY + ["--alpha", "--schedule", "--top-k", "--learnable", "--lora-rank", "--lora-alpha",
                                     "--lora-dropout", "--lora-targets"],
    "distill": COMMON + RUN_ONLY + ["--teacher"] + DISTILLATION,
    "select": COMMON + DISTILLATION + ["--mi-score"],
}


def help_entries(command: str, capsys, monkeypatch) -> dict[str, str]:
    """``{flag: its help text, whitespace normalised}`` from ``timm-remem COMMAND --help``."""
    monkeypatch.setenv("COLUMNS", "200")
    assert cli.main([command, "--help"]) == 0
    entries: dict[str, str] = {}
    current = None
    for line in capsys.readouterr().out.splitlines():
        start = re.match(r"^  (-[-\w]+(?:, --[-\w]+)?)(.*)$", line)
        if start:
            current = start.group(1).split(", ")[-1]
            entries[current] = start.group(2)
        elif current is not None and line.startswith("    "):
            entries[current] += " " + line
        else:
            current = None
    return {flag: " ".join(text.split()) for flag, text in entries.items()}


@pytest.mark.parametrize("command", sorted(FLAGS))
def test_every_flag_is_listed_with_its_default(command, capsys, monkeypatch):
    entries = help_entries(command, capsys, monkeypatch)
    assert sorted(entries) == sorted(FLAGS[command] + ["--help"])
    for flag in FLAGS[command]:
        note = "(required)" if flag == "--model" else "(default: "
        assert note in entries[flag], (flag, entries[flag])


@pytest.mark.parametrize(("command", "flag", "shown"), [
    ("finetune", "--epochs", "(default: 10)"),
    ("distill", "--epochs", "(default: 10)"),
    ("select", "--epochs", "(default: 3)"),  # select_teacher's own default
    ("finetune", "--output", "(default: runs/teacher)"),
    ("distill", "--output", "(default: runs/student)"),
    ("select", "--output", "(default: runs/select)"),
    ("distill", "--batch-size", "(default: 64)"),
    ("finetune", "--opt", "(default: adamw)"),
    ("finetune", "--lr", "(default: 0.001)"),
    ("finetune", "--schedule", "(default: exponential)"),
    ("finetune", "--alpha", "(default: unset)"),
    ("finetune", "--ema", "(default: off)"),
    ("finetune", "--no-progress", "(default: on)"),
    ("finetune", "--model-kwargs", "(default: {})"),
    ("distill", "--no-teacher-pretrained", "(default: on)"),
    ("distill", "--method", "(default: kd)"),
    ("select", "--cache-teacher", "(default: auto)"),
    ("select", "--mi-score", "(default: off)"),
])
def test_help_shows_the_library_default(command, flag, shown, capsys, monkeypatch):
    assert help_entries(command, capsys, monkeypatch)[flag].endswith(shown)


@pytest.mark.parametrize(("command", "cls"), [("finetune", FinetuneConfig), ("distill", DistillConfig),
                                              ("select", DistillConfig)])
def test_help_text_is_the_fields_metadata(command, cls, capsys, monkeypatch):
    entries = help_entries(command, capsys, monkeypatch)
    by_dest = {"optimizer": "--opt", "label_smoothing": "--smoothing", "num_workers": "--workers",
               "progress": "--no-progress", "teacher_pretrained": "--no-teacher-pretrained"}
    checked = 0
    for f in dataclasses.fields(cls):
        flag = by_dest.get(f.name, "--" + f.name.replace("_", "-"))
        if flag not in entries or f.name in ("model", "resume", "cache_teacher"):  # command-line wording of these
            continue
        assert " ".join(f.metadata["help"].split()) in entries[flag], (flag, entries[flag])
        checked += 1
    assert checked >= 35


def test_select_lists_only_the_flags_it_uses(capsys, monkeypatch):
    entries = help_entries("select", capsys, monkeypatch)
    for flag in ("--save-at", "--resume", "--ema", "--ema-decay", "--keep-last", "--checkpoint-every", "--teacher"):
        assert flag not in entries


@pytest.mark.parametrize("flag", ["--save-at", "--resume", "--ema", "--keep-last"])
def test_select_refuses_the_flags_it_does_not_use(flag, capsys):
    assert cli.main(["select", "ckpts", "--model", "test_resnet", flag, "x"]) == 2
    assert "unrecognized arguments" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the generator


@dataclass
class Toy:
    count: int = field(default=3, metadata={"help": "how many."})
    size: int | None = field(default=None, metadata={"help": "size; automatic when unset"})
    rate: float = field(default=0.5, metadata={"help": "rate in %"})
    name: str = field(default="abc", metadata={"help": "a name"})
    fast: bool = field(default=False, metadata={"help": "go fast"})
    verbose: bool = field(default=True, metadata={"help": "talk"})
    epochs: list[int] | None = field(default=None, metadata={"help": "epochs"})
    extra: dict = field(default_factory=dict, metadata={"help": "extra arguments"})
    mode: str = field(default="a", metadata={"help": "the mode", "choices": ("a", "b")})


def toy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_config_flags(parser, Toy)
    return parser


def test_types_come_from_the_annotations():
    args = toy_parser().parse_args(["--count", "4", "--size", "7", "--rate", "0.25", "--name", "x", "--fast",
                                    "--no-verbose", "--epochs", "1", "2", "--extra", '{"depth": 2}', "--mode", "b"])
    assert Toy(**config_options(args, Toy)) == Toy(count=4, size=7, rate=0.25, name="x", fast=True, verbose=False,
                                                   epochs=[1, 2], extra={"depth": 2}, mode="b")


def test_flags_left_out_are_left_out():
    assert config_options(toy_parser().parse_args([]), Toy) == {}
    assert config_options(toy_parser().parse_args(["--epochs"]), Toy) == {"epochs": []}


def test_help_of_the_generated_flags(capsys):
    with pytest.raises(SystemExit):
        toy_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("how many (default: 3)", "size; automatic when unset (default: unset)",
                     "rate in % (default: 0.5)", "a name (default: abc)", "go fast (default: off)",
                     "--no-verbose turn off: talk (default: on)", "extra arguments (default: {})",
                     "--mode {a,b} the mode (default: a)", "--extra JSON"):
        assert expected in text


def test_bad_choice_and_bad_json_are_argparse_errors(capsys):
    with pytest.raises(SystemExit):
        toy_parser().parse_args(["--mode", "c"])
    assert "argument --mode: invalid choice: 'c'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        toy_parser().parse_args(["--extra", "[1]"])
    assert "--extra must be a JSON object" in capsys.readouterr().err


@dataclass
class Odd:
    value: int | str = 0


def test_a_type_without_a_rule_names_the_table():
    with pytest.raises(TypeError, match=r"'value' .* needs an entry in cli\._config_flags\.SPECIAL"):
        add_config_flags(argparse.ArgumentParser(), Odd)
