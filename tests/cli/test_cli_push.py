"""Tests for ``timm-remem push`` (timm_remem/cli/push.py) against the test Hub server on loopback.

References: the server's record of what was published, plain timm loading ``hf-hub:`` for the weights, and a
reference teacher with forward hooks (the same perturbed ``test_vit`` scaled without timm-remem's wrappers).
"""

from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch
from hub_server import ALICE_WRITE, MisbehavingServer, use_hub
from hub_teachers import make_teacher, out

from timm_remem.cli import push as push_cli
from timm_remem.hub import save_pretrained

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's own call


@pytest.fixture(scope="module")
def teacher():
    return make_teacher()


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="timm-remem")
    push_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_push_keeps_saved_metadata_and_applies_overrides(hub, teacher, tmp_path, capsys):
    save_pretrained(teacher[0], tmp_path, merge=False, dataset="cifar100", rho=0.1)
    code = _cli(["push", str(tmp_path), "alice/vit-remem", "--token", ALICE_WRITE, "--rho", "0.2",
                 "--student-accuracy", "resnet18=78.5"])
    assert code == 0
    assert capsys.readouterr().out.strip().startswith(f"{hub.endpoint}/alice/vit-remem/commit/")
    remem = json.loads(hub.files("alice/vit-remem")["config.json"])["remem"]
    assert (remem["dataset"], remem["rho"], remem["student_accuracies"], remem["merged"]) == (
        "cifar100", 0.2, {"resnet18": 78.5}, True)
    torch.testing.assert_close(out(timm.create_model("hf-hub:alice/vit-remem", pretrained=True)), out(teacher[1]),
                               atol=1e-5, rtol=1e-5)


def test_cli_push_reports_hub_errors_in_one_line(hub, teacher, tmp_path, capsys):
    save_pretrained(teacher[0], tmp_path)
    assert _cli(["push", str(tmp_path), "alice/vit-remem", "--token", "hf_wrong"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("timm-remem push: error: the Hub rejected the token") and "Traceback" not in err
    assert "pass --token TOKEN, set the HF_TOKEN environment variable" in err and "token=" not in err


def test_cli_push_without_a_token_names_the_flag(hub, teacher, tmp_path, capsys):
    save_pretrained(teacher[0], tmp_path)
    assert _cli(["push", str(tmp_path), "alice/vit-remem"]) == 2  # usage: a missing --token
    err = capsys.readouterr().err
    assert err == ("timm-remem push: error: pushing to 'alice/vit-remem' needs a Hugging Face token with the write "
                   "role: pass --token TOKEN, set the HF_TOKEN environment variable or run `hf auth login`.\n")
    assert hub.requests == []


def test_cli_push_rejects_a_malformed_student_accuracy(tmp_path, teacher, capsys):
    save_pretrained(teacher[0], tmp_path)
    assert _cli(["push", str(tmp_path), "alice/vit-remem", "--student-accuracy", "resnet18"]) == 2
    assert "--student-accuracy expects MODEL=ACCURACY (e.g. resnet18=78.5), got 'resnet18'" in capsys.readouterr().err


def test_cli_push_bad_input_exits_2_with_one_line(tmp_path, capsys):
    # A source that is not a teacher folder: bad input, checked before any request.
    assert _cli(["push", str(tmp_path / "missing"), "alice/vit-remem", "--token", ALICE_WRITE]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("timm-remem push: error: ") and "is not an existing folder" in err


def test_cli_push_bad_repo_id_exits_2(teacher, tmp_path, capsys):
    save_pretrained(teacher[0], tmp_path)
    assert _cli(["push", str(tmp_path), "no-namespace", "--token", ALICE_WRITE]) == 2
    assert "repo_id must be 'namespace/name'" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "ten", "inf"])
def test_cli_push_bad_timeout_is_a_usage_error_naming_the_flag(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        _cli(["push", "dir", "alice/vit", "--timeout", value])
    assert exit_.value.code == 2
    assert f"argument --timeout: --timeout expects a number of seconds > 0, got '{value}'" in capsys.readouterr().err


def test_cli_push_unreachable_hub_exits_1_with_one_line(teacher, tmp_path, monkeypatch, capsys, no_retry_wait):
    save_pretrained(teacher[0], tmp_path / "t")
    with MisbehavingServer("silent") as server:
        use_hub(monkeypatch, server.endpoint, tmp_path / "hf_home")
        code = _cli(["push", str(tmp_path / "t"), "alice/vit-remem", "--token", ALICE_WRITE, "--timeout", "0.3",
                     "--retry-budget", "0.5"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("timm-remem push: error: cannot push to 'alice/vit-remem'")
    assert "sent no answer within 0.3 s" in err and "Traceback" not in err
