"""Bad command-line input: ``--config`` files and flag values (the rows of docs/bad-input.md, section "Command line:
config files and flags").

Each case runs ``timm_remem.cli.main`` and checks the exit status, that stderr is exactly one line matching the
message, that nothing went to stdout and that no run folder was written.
"""

from __future__ import annotations

import re
import sys

import pytest

import timm_remem.cli as cli

# name -> file contents, written to tmp_path/<name> before the case runs.
FILES = {
    "malformed.yaml": "model: test_vit\nepochs: [1, 2\n",
    "malformed.json": '{"model": "test_vit", "epochs": 2,}',
    "list.yaml": "- model: test_vit\n",
    "unknown-key.yaml": "model: test_vit\nbatch-size: 32\n",
    "typo-key.json": '{"model": "test_vit", "epoch": 2, "lrr": 0.1}',
    "wrong-type.yaml": "model: test_vit\nepochs: three\n",
    "wrong-list.yaml": "model: test_vit\nsave_at: 3\n",
    "wrong-bool.yaml": "model: test_vit\npretrained: maybe\n",
    "bad-word.yaml": "model: test_resnet\ncache_teacher: sometimes\n",
    "bad-json-text.yaml": "model: test_vit\nmodel_kwargs: '{depth: 2'\n",
    "out-of-range.yaml": "model: test_vit\nepochs: 0\n",
    "select-excluded.yaml": "model: test_resnet\nteacher: runs/t/checkpoints/epoch-001\n",
    "settings.toml": "model = 'test_vit'\n",
    "model.yaml": "model: test_vit\n",
    "folder.yaml/": "",
}

CONFIG_CASES = [
    pytest.param(["finetune", "--config", "{tmp}/missing.yaml"], 2,
                 r"^timm-remem finetune: error: --config .*missing\.yaml: no such file$", id="missing-file"),
    pytest.param(["finetune", "--config", "{tmp}/folder.yaml"], 2,
                 r"--config .*folder\.yaml: is a folder; pass a \.yaml or \.json file", id="a-folder"),
    pytest.param(["finetune", "--config", "{tmp}/settings.toml"], 2,
                 r"--config .*settings\.toml: expected a \.yaml, \.yml or \.json file, got '\.toml'",
                 id="not-yaml-or-json"),
    pytest.param(["finetune", "--config", "{tmp}/malformed.yaml"], 2,
                 r"--config .*malformed\.yaml: not valid YAML at line 3, column 1 \(expected ',' or '\]', but got",
                 id="malformed-yaml"),
    pytest.param(["distill", "--config", "{tmp}/malformed.json"], 2,
                 r"--config .*malformed\.json: not valid JSON at line 1, column 35 \(Expecting property name",
                 id="malformed-json"),
    pytest.param(["finetune", "--config", "{tmp}/list.yaml"], 2,
                 r"--config .*list\.yaml: expected a mapping of settings \(batch_size: 32, \.\.\.\), got list",
                 id="not-a-mapping"),
    pytest.param(["finetune", "--config", "{tmp}/unknown-key.yaml"], 2,
                 r"--config .*unknown-key\.yaml: unknown key 'batch-size' \(did you mean 'batch_size'\?\); valid "
                 r"keys are config field names: adaptive, alpha, amp, .*batch_size", id="unknown-key"),
    pytest.param(["finetune", "--config", "{tmp}/typo-key.json"], 2,
                 r"unknown key 'epoch' \(did you mean 'epochs'\?\) and 1 more \('lrr'\); valid keys",
                 id="two-unknown-keys"),
    pytest.param(["finetune", "--config", "{tmp}/wrong-type.yaml"], 2,
                 r"--config .*wrong-type\.yaml: epochs must be an integer, got 'three'$",
                 id="wrong-type"),
    pytest.param(["finetune", "--config", "{tmp}/wrong-list.yaml"], 2,
                 r"--config .*wrong-list\.yaml: save_at must be a list of integers or null, got 3$", id="not-a-list"),
    pytest.param(["finetune", "--config", "{tmp}/wrong-bool.yaml"], 2,
                 r"--config .*wrong-bool\.yaml: pretrained must be true or false, got 'maybe'$", id="not-a-bool"),
    pytest.param(["distill", "--config", "{tmp}/bad-word.yaml"], 2,
                 r"cache_teacher must be true or false or null, got 'sometimes' \(choose from auto, on, off\)",
                 id="unknown-word"),
    pytest.param(["finetune", "--config", "{tmp}/bad-json-text.yaml"], 2,
                 r"model_kwargs must be a mapping, got '\{depth: 2' \(Expecting property name", id="dict-as-bad-json"),
    pytest.param(["finetune", "--config", "{tmp}/out-of-range.yaml", "--output", "{tmp}/run"], 2,
                 r"^timm-remem finetune: error: epochs must be a positive integer, got 0 \(set by 'epochs' in "
                 r".*out-of-range\.yaml\)$", id="out-of-range"),
    pytest.param(["select", "ckpts", "--config", "{tmp}/select-excluded.yaml"], 2,
                 r"'teacher' does not apply to select \(select sets it itself\); remove it from the file$",
                 id="select-excluded-key"),
    pytest.param(["finetune", "--config", "{tmp}/model.yaml", "--epochs", "0", "--output", "{tmp}/run"], 2,
                 r"epochs must be a positive integer, got 0 \(set by --epochs\)$", id="flag-over-file-checked"),
    pytest.param(["finetune", "--config", "{tmp}/model.yaml", "--nope"], 2,
                 r"^timm-remem: error: unrecognized arguments: --nope \(see 'timm-remem --help'\)$",
                 id="unknown-flag-with-config"),
]


def write_files(root) -> None:
    for name, text in FILES.items():
        if name.endswith("/"):
            (root / name.rstrip("/")).mkdir()
        else:
            (root / name).write_text(text)


def check(argv, code, match, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # a default output folder would land here
    write_files(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == code
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert re.search(match, captured.err.rstrip("\n")), captured.err
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()  # refused before anything ran


@pytest.mark.parametrize(("argv", "code", "match"), CONFIG_CASES)
def test_cli_config_rejects(argv, code, match, tmp_path, monkeypatch, capsys):
    check(argv, code, match, tmp_path, monkeypatch, capsys)


def test_cli_config_yaml_needs_pyyaml(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "yaml", None)
    check(["finetune", "--config", "{tmp}/model.yaml"], 2,
          r"^timm-remem finetune: error: --config .*model\.yaml: reading YAML needs PyYAML: pip install "
          r"timm-remem\[config\] \(or pass a \.json file\)$", tmp_path, monkeypatch, capsys)


FLAG_CASES = [
    pytest.param(["finetune", "--model", "test_vit", "--epochs", "0"], 2,
                 r"^timm-remem finetune: error: epochs must be a positive integer, got 0 \(set by --epochs\)$",
                 id="epochs-zero"),
    pytest.param(["finetune", "--model", "test_vit", "--lr", "nan"], 2,
                 r"lr must be a finite number > 0, got nan \(set by --lr\)$", id="lr-nan"),
    pytest.param(["finetune", "--model", "test_vit", "--lora-alpha", "8"], 2,
                 r"lora_alpha, lora_dropout and lora_targets configure LoRA: also pass lora_rank \(e\.g\. 8\) \(set "
                 r"by --lora-alpha\)$", id="lora-alpha-without-rank"),
    pytest.param(["finetune", "--model", "test_vit", "--lora-rank", "4", "--lora-targets", ","], 2,
                 r"argument --lora-targets: --lora-targets needs at least one name, e\.g\. --lora-targets "
                 r"qkv,proj,fc1,fc2", id="lora-targets-empty"),
    pytest.param(["distill", "--model", "test_resnet", "--log", "mlflow"], 2,
                 r"argument --log: invalid choice: 'mlflow' \(choose from 'tensorboard', 'wandb'\)", id="log-unknown"),
    pytest.param(["distill", "--model", "test_resnet", "--temperature", "0"], 2,
                 r"temperature must be a finite number > 0, got 0\.0 \(set by --temperature\)$",
                 id="temperature-zero"),
    pytest.param(["select", "ckpts", "--epochs", "2"], 2,
                 r"^timm-remem select: error: the following arguments are required: --model \(on the command line "
                 r"or as 'model' in a --config file\)$", id="select-without-model"),
    pytest.param(["finetune", "--model", "test_vit", "--batch-size", "1.5"], 2,
                 r"^timm-remem finetune: error: argument --batch-size: invalid int value: '1\.5' \(see 'timm-remem "
                 r"finetune --help'\)$", id="int-flag-given-a-float"),
    pytest.param(["--debug"], 2, r"^usage: timm-remem ", id="debug-without-command"),
]


@pytest.mark.parametrize(("argv", "code", "match"), FLAG_CASES)
def test_cli_flag_rejects(argv, code, match, tmp_path, monkeypatch, capsys):
    if argv == ["--debug"]:  # no command: the help goes to stderr (several lines), exit 2
        assert cli.main(argv) == code
        assert re.search(match, capsys.readouterr().err)
        return
    check(argv, code, match, tmp_path, monkeypatch, capsys)
