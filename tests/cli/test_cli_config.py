"""``--config FILE.yaml|.json`` for finetune, distill and select: file values are the defaults, flags override them,
and a run's own ``config.json`` repeats the run (its metrics, time fields aside)."""

from __future__ import annotations

import json
import os
import sys

import pytest

import timm_remem.cli as cli
from timm_remem.cli import distill, finetune, select
from timm_remem.cli._config_file import file_options
from timm_remem.errors import ConfigError
from timm_remem.train import FinetuneConfig

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--img-size", "16", "--epochs", "1", "--limit-train-batches", "2", "--no-progress"]


def options(module, argv: list[str]) -> dict:
    return module.options(cli.build_parser().parse_args(argv))


def write(path, text: str):
    path.write_text(text)
    return str(path)


def test_yaml_values_become_the_settings(tmp_path):
    cfg = write(tmp_path / "teacher.yaml", """
model: test_vit
model_kwargs: {depth: 2}
epochs: 3
lr: 1e-3          # PyYAML reads 1e-3 as a string: read as --lr reads it
weight_decay: 0
save_at: [1, 3]
progress: false
lora_rank: 4
lora_targets: qkv,fc1
log: [tensorboard]
""")
    assert options(finetune, ["finetune", "--config", cfg]) == {
        "model": "test_vit", "model_kwargs": {"depth": 2}, "epochs": 3, "lr": 0.001, "weight_decay": 0,
        "save_at": [1, 3], "progress": False, "lora_rank": 4, "lora_targets": ["qkv", "fc1"], "log": ["tensorboard"],
    }


def test_flags_given_override_the_file(tmp_path):
    cfg = write(tmp_path / "student.yml", "model: test_resnet\nepochs: 3\nmethod: dist\ncache_teacher: auto\n")
    got = options(distill, ["distill", "--config", cfg, "--epochs", "5", "--cache-teacher", "off"])
    assert got == {"model": "test_resnet", "epochs": 5, "method": "dist", "cache_teacher": False}
    # the flag's place on the command line does not matter
    assert options(distill, ["distill", "--epochs", "5", "--config", cfg])["epochs"] == 5


def test_json_file_and_the_version_key_it_carries(tmp_path):
    cfg = write(tmp_path / "c.json", json.dumps({"model": "test_resnet", "cache_teacher": None, "version": "0.1.0",
                                                 "teacher_kwargs": {"img_size": 16}}))
    assert options(distill, ["distill", "--config", cfg]) == {"model": "test_resnet", "cache_teacher": None,
                                                               "teacher_kwargs": {"img_size": 16}}


def test_model_may_come_from_the_file_but_must_come_from_somewhere(tmp_path, capsys):
    cfg = write(tmp_path / "c.yaml", "epochs: 2\n")
    assert cli.main(["finetune", "--config", cfg]) == 2
    assert capsys.readouterr().err == ("timm-remem finetune: error: the following arguments are required: --model (on "
                                       "the command line or as 'model' in a --config file)\n")
    assert options(finetune, ["finetune", "--config", cfg, "--model", "test_vit"]) == {"epochs": 2,
                                                                                       "model": "test_vit"}


def test_select_takes_a_config_file_without_the_fields_it_sets_itself(tmp_path, capsys):
    cfg = write(tmp_path / "s.yaml", "model: test_resnet\nepochs: 2\nmethod: hard\n")
    args = cli.build_parser().parse_args(["select", "ckpts", "--config", cfg, "--no-progress"])
    assert select.options(args) == {"model": "test_resnet", "epochs": 2, "method": "hard", "progress": False}
    bad = write(tmp_path / "bad.yaml", "model: test_resnet\nsave_at: [1]\nema: true\n")
    assert cli.main(["select", "ckpts", "--config", bad]) == 2
    assert "'save_at', 'ema' do not apply to select (select sets them itself); remove them" in capsys.readouterr().err


def test_config_flag_is_in_every_training_commands_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    for command in ("finetune", "distill", "select"):
        assert cli.main([command, "--help"]) == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "--config FILE read settings from a YAML or JSON file" in text


def test_yaml_without_pyyaml_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now raises ImportError
    cfg = write(tmp_path / "c.yaml", "model: test_vit\n")
    assert cli.main(["finetune", "--config", cfg]) == 2  # like a missing peft for --lora-rank: a usage error
    assert "reading YAML needs PyYAML: pip install timm-remem[config]" in capsys.readouterr().err
    json_cfg = write(tmp_path / "c.json", '{"model": "test_vit"}')  # JSON needs nothing
    assert options(finetune, ["finetune", "--config", json_cfg]) == {"model": "test_vit"}


def metrics_without_times(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.endswith(("_s", "time"))} for row in rows]


def test_a_run_is_repeated_from_its_config_json(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    assert cli.main(["finetune", "--model", "test_vit", *TINY, "--epochs", "2", "--alpha", "0.8", "--rho", "0.05",
                     "--lr", "0.01", "--seed", "3", "--output", str(first)]) == 0
    assert cli.main(["finetune", "--config", str(first / "config.json"), "--output", str(second)]) == 0
    capsys.readouterr()
    a, b = metrics_without_times(first), metrics_without_times(second)
    assert len(a) == 2 and {"train_loss", "val_acc"} <= set(a[0])
    assert a == b
    saved = [json.loads((run / "config.json").read_text()) for run in (first, second)]
    assert saved[0].pop("output") == str(first) and saved[1].pop("output") == str(second)
    assert saved[0] == saved[1]
    assert (saved[0]["seed"], saved[0]["alpha"], saved[0]["lr"]) == (3, 0.8, 0.01)


def test_a_distill_run_is_repeated_from_its_config_json(tmp_path, capsys):
    first, second = tmp_path / "a", tmp_path / "b"
    assert cli.main(["distill", "--model", "test_resnet", *TINY, "--seed", "1", "--output", str(first)]) == 0
    assert cli.main(["distill", "--config", str(first / "config.json"), "--output", str(second)]) == 0
    capsys.readouterr()
    assert metrics_without_times(first) == metrics_without_times(second)


# ---------------------------------------------------------------------- untrusted files are read with bounds
def _bomb(levels: int = 9) -> str:
    lines = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\nmodel_kwargs: {{a: *l{levels - 1}}}\n"


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb())  # 9 ** 9 = 387 million strings if expanded
    assert len(path.read_bytes()) < 1000
    with pytest.raises(ConfigError, match="more than 64 YAML aliases"):
        file_options(str(path), FinetuneConfig)


def test_deep_nesting_and_huge_files_are_refused(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text('{"model": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConfigError, match="nested"):
        file_options(str(deep), FinetuneConfig)
    nested = tmp_path / "nested.json"
    nested.write_text('{"model_kwargs": ' + '{"a": ' * 17 + "1" + "}" * 17 + "}")
    with pytest.raises(ConfigError, match="nested 17 levels deep; a settings file needs at most 16"):
        file_options(str(nested), FinetuneConfig)
    huge = tmp_path / "huge.json"
    huge.write_text('{"model": "' + "x" * (2 << 20) + '"}')
    with pytest.raises(ConfigError, match="more than a settings file needs"):
        file_options(str(huge), FinetuneConfig)
    # what stat cannot size: a device (endless zeros) or a FIFO (blocks on open) is refused before it is read
    zeros = tmp_path / "zeros.yaml"
    zeros.symlink_to("/dev/zero")
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    for special in (zeros, fifo):
        with pytest.raises(ConfigError, match="not a regular file"):
            file_options(str(special), FinetuneConfig)


def test_error_messages_quote_values_briefly(tmp_path):
    path = tmp_path / "wide.json"
    path.write_text(json.dumps({"epochs": [list(range(300))] * 300}))
    with pytest.raises(ConfigError) as info:
        file_options(str(path), FinetuneConfig)
    assert "epochs must be an integer" in str(info.value) and len(str(info.value)) < 300


@pytest.mark.parametrize(("name", "text"), [
    ("dup.yaml", "epochs: 2\nlr: 0.1\nepochs: 5\n"),
    ("dup.json", '{"epochs": 2, "lr": 0.1, "epochs": 5}'),
    ("nested.yaml", "model_kwargs:\n  drop_rate: 0.1\n  drop_rate: 0.2\n"),
])
def test_a_key_given_twice_is_refused_not_silently_the_last(name, text, tmp_path):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match="is given twice"):
        file_options(str(path), FinetuneConfig)
