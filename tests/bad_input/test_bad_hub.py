"""Bad input to the Hub room (``push_to_hub``, ``load_teacher``, ``save_pretrained``, ``timm-remem push``): one
clear error each, never a hang or a raw error from huggingface_hub / httpx2 / peft.

Misbehaving servers are :class:`hub_server.MisbehavingServer` on 127.0.0.1 with short limits (0.5 s timeout, 1 s
retry budget, no waits between retries). Each case checks the exception's exact type and the quoted part of its
message; "kept" cases also check that the folder written to is as it was.
"""

from __future__ import annotations

import argparse
import re
import time

import pytest
import timm
from hub_server import ALICE_WRITE, MisbehavingServer, no_retry_waits, serving, use_hub

import timm_remem
from timm_remem.cli import push as push_cli
from timm_remem.errors import ConfigError, HubError
from timm_remem.hub import load_teacher, push_to_hub, save_pretrained
from timm_remem.hub._network import HubLimits

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning", "ignore::UserWarning")]

LIMITS = dict(timeout=0.5, retry_budget=1.0)
BASE = "vit_base_patch16_224.augreg_in21k"


def _model():
    return timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=5)


def _raises(error, match, call):
    with pytest.raises(error, match=f"(?s){match}") as info:
        call()
    assert type(info.value) is error, f"expected exactly {error.__name__}, got {type(info.value).__name__}"
    return info.value


@pytest.mark.parametrize(("mode", "action", "match"), [
    pytest.param("silent", "push", r"the server accepted the connection but sent no answer within 0\.5 s "
                 r"\(TIMM_REMEM_HUB_TIMEOUT\).*raise TIMM_REMEM_HUB_TIMEOUT", id="push-server-never-answers"),
    pytest.param("trickle", "push", r"the server answers, but trickles its bytes \(slower than 1024 bytes/s",
                 id="push-server-trickles"),
    pytest.param("html", "push", r"the server answered an HTML page instead of the Hub's JSON API: HF_ENDPOINT "
                 r"points at a web site, a captive portal", id="push-server-answers-html"),
    pytest.param("garbage", "push", r"the server's answer is not valid HTTP \(garbage bytes\)",
                 id="push-server-answers-garbage"),
    pytest.param("5xx", "push", r"the Hub answered 503 \(a server error\).*try again later",
                 id="push-server-answers-503"),
    pytest.param("silent", "load", r"cannot download 'alice/vit'.*sent no answer within 0\.5 s",
                 id="download-server-never-answers"),
    pytest.param("trickle", "load", r"cannot download 'alice/vit'.*trickles its bytes",
                 id="download-server-trickles"),
    pytest.param("html", "load", r"cannot download 'alice/vit'.*answered an HTML page", id="download-server-html"),
    pytest.param("5xx", "load", r"the Hub answered 503 \(a server error\) when trying to download",
                 id="download-server-answers-503"),
])
def test_hub_rejects_misbehaving_server(mode, action, match, tmp_path, monkeypatch):
    no_retry_waits(monkeypatch)
    with MisbehavingServer(mode) as server:
        use_hub(monkeypatch, server.endpoint, tmp_path / "hf_home")
        start = time.monotonic()
        if action == "push":
            _raises(HubError, match, lambda: push_to_hub(_model(), "alice/vit", token="hf_x", **LIMITS))
        else:
            _raises(HubError, match, lambda: load_teacher("hf-hub:alice/vit", **LIMITS))
        assert time.monotonic() - start < 8  # bounded: nothing hangs


@pytest.mark.parametrize(("call", "error", "match"), [
    pytest.param(lambda: HubLimits.resolve(timeout=0), ConfigError,
                 r"timeout must be a finite number of seconds > 0 \(see docs/hub.md, 'Timeouts'\), got 0",
                 id="timeout-zero"),
    pytest.param(lambda: HubLimits.resolve(retry_budget=-5), ConfigError,
                 r"retry_budget must be a finite number of seconds >= 0", id="retry-budget-negative"),
    pytest.param(lambda: push_to_hub(_model(), "alice/vit", token="hf_x", timeout="10"), ConfigError,
                 r"timeout must be a finite number of seconds > 0 .*got '10'", id="push-timeout-string"),
    pytest.param(lambda: load_teacher("hf-hub:alice/vit", retry_budget=float("nan")), ConfigError,
                 r"retry_budget must be a finite number of seconds >= 0 .*got nan", id="load-retry-budget-nan"),
    pytest.param(lambda: push_to_hub(_model(), "alice/vit--x", token="hf_x"), ConfigError,
                 r"repo_id must be 'namespace/name' .*got 'alice/vit--x'", id="repo-id-double-dash"),
    pytest.param(lambda: push_to_hub(_model(), "alice/", token="hf_x"), ConfigError,
                 r"repo_id must be 'namespace/name' .*got 'alice/'", id="repo-id-empty-name"),
    pytest.param(lambda: save_pretrained(_model(), "unused", adapter_only=1), ConfigError,
                 r"adapter_only must be True or False, got 1", id="adapter-only-not-bool"),
    pytest.param(lambda: save_pretrained(_model(), "unused", merge="no"), ConfigError,
                 r"merge must be True or False, got 'no'", id="merge-not-bool"),
    pytest.param(lambda: save_pretrained(_model(), "unused", adapter_only=True, base_model=BASE), ConfigError,
                 r"adapter_only=True needs a peft.PeftModel .* without adapters: publish the merged checkpoint",
                 id="adapter-only-plain-model"),
    pytest.param(lambda: save_pretrained(_model(), "unused", base_model=""), ConfigError,
                 r"base_model must be a non-empty string or None, got ''", id="base-model-empty"),
])
def test_hub_rejects(call, error, match, monkeypatch):
    monkeypatch.delenv("TIMM_REMEM_HUB_TIMEOUT", raising=False)
    _raises(error, match, call)


@pytest.mark.parametrize(("value", "match"), [
    pytest.param("ten", "the environment variable TIMM_REMEM_HUB_TIMEOUT must be a finite number of seconds > 0",
                 id="env-timeout-not-a-number"),
    pytest.param("-1", "the environment variable TIMM_REMEM_HUB_TIMEOUT must be .* got -1.0",
                 id="env-timeout-negative"),
])
def test_hub_rejects_environment(value, match, monkeypatch):
    monkeypatch.setenv("TIMM_REMEM_HUB_TIMEOUT", value)
    _raises(ConfigError, match, lambda: push_to_hub(_model(), "alice/vit", token="hf_x"))


def test_hub_rejects_adapter_of_a_random_init_base_and_keeps_the_folder(tmp_path):
    peft = pytest.importorskip("peft")
    adapted = peft.get_peft_model(_model(), peft.LoraConfig(r=2, target_modules=["qkv"]))
    (tmp_path / "notes.txt").write_text("mine")
    _raises(ConfigError, r"adapter_only=True needs base_model=\.\.\.: a LoRA adapter only reproduces the teacher "
            r"on the exact weights it was trained on.*base_model=None: trained from random initialisation",
            lambda: save_pretrained(adapted, tmp_path, adapter_only=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # kept


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="timm-remem")
    push_cli.register(parser.add_subparsers(dest="command"))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code)
    return args.func(args)


@pytest.mark.parametrize(("argv", "code", "match"), [
    pytest.param(["REPO", "alice/vit"], 2, "needs a Hugging Face token with the write role: pass --token TOKEN",
                 id="cli-push-no-token"),
    pytest.param(["REPO", "alice/vit", "--token", ALICE_WRITE, "--timeout", "0"], 2,
                 "argument --timeout: --timeout expects a number of seconds > 0, got '0'", id="cli-push-timeout-zero"),
    pytest.param(["REPO", "alice/vit", "--token", ALICE_WRITE, "--retry-budget", "soon"], 2,
                 "argument --retry-budget: --retry-budget expects a number of seconds >= 0, got 'soon'",
                 id="cli-push-retry-budget-word"),
    pytest.param(["REPO", "alice", "--token", ALICE_WRITE], 2, "repo_id must be 'namespace/name'",
                 id="cli-push-repo-id-without-namespace"),
    pytest.param(["REPO", "alice/vit", "--token", "hf_wrong"], 1, "the Hub rejected the token .*pass --token TOKEN",
                 id="cli-push-rejected-token"),
    pytest.param(["REPO", "bob/vit", "--token", ALICE_WRITE], 1, r"refused to let your token push to 'bob/vit' on "
                 r"\S+ \(403 Forbidden\)", id="cli-push-foreign-namespace"),
])
def test_hub_cli_push_exit_codes(argv, code, match, tmp_path, monkeypatch, capsys):
    save_pretrained(_model(), tmp_path / "t")
    argv = [str(tmp_path / "t") if a == "REPO" else a for a in argv]
    with serving(tmp_path / "hf_home", monkeypatch):
        assert _cli(["push", *argv]) == code
    err = capsys.readouterr().err
    assert re.search(match, err), err
    assert "Traceback" not in err and "token=" not in err


def test_hub_cli_push_unreachable_hub_exits_1(tmp_path, monkeypatch, capsys):
    no_retry_waits(monkeypatch)
    save_pretrained(_model(), tmp_path / "t")
    with MisbehavingServer("silent") as server:
        use_hub(monkeypatch, server.endpoint, tmp_path / "hf_home")
        code = _cli(["push", str(tmp_path / "t"), "alice/vit", "--token", ALICE_WRITE, "--timeout", "0.3",
                     "--retry-budget", "0.5"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "sent no answer within 0.3 s" in err


def test_hub_random_init_export_claims_no_base(tmp_path):
    folder = timm_remem.save_pretrained(_model(), tmp_path)
    text = (folder / "README.md").read_text() + (folder / "config.json").read_text()
    assert "test_vit.r160_in1k" not in text and "trained from random initialisation" in text


# ---------------------------------------------------------------------------------- the folder save_pretrained writes

def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_folder(folder):
    """A training run's folder (as a run leaves it: its .timm-remem marker, config.json, metrics.jsonl)."""
    from timm_remem._io import claim_output_dir

    claim_output_dir(folder, "run")
    (folder / "config.json").write_text('{"model": "test_vit"}\n')
    (folder / "metrics.jsonl").write_text('{"epoch": 1}\n')
    return folder


@pytest.mark.parametrize(("prepare", "match"), [
    pytest.param(lambda d: (d.mkdir(), (d / "config.json").write_text('{"mine": 1}'),
                            (d / "notes.txt").write_text("x")),
                 r"folder '.*mine' is not empty and not a timm-remem export folder: it holds config\.json, "
                 r"notes\.txt\. timm-remem writes only into a folder it created, an empty one, or one it marked as its "
                 r"own \(a \.timm-remem file\), so that nothing of yours is overwritten: choose another folder",
                 id="save-into-a-users-folder"),
    pytest.param(lambda d: _run_folder(d),
                 r"folder '.*mine' is a training run folder \(finetune / distill\) \(its \.timm-remem marker says "
                 r"so\), not a model folder \(save_pretrained / a run's export\): choose another folder",
                 id="save-into-a-run-folder"),
])
def test_hub_save_refuses_a_folder_it_does_not_own(prepare, match, tmp_path):
    folder = tmp_path / "mine"
    prepare(folder)
    before = _snapshot(folder)
    _raises(ConfigError, match, lambda: save_pretrained(_model(), folder))
    assert _snapshot(folder) == before


def test_hub_save_refuses_an_empty_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _raises(ConfigError, r"path is empty \(''\), which would write into the current folder: name the folder to "
            r"write, e\.g\. path='teachers/vit-remem'",
            lambda: save_pretrained(_model(), ""))
    assert list(tmp_path.iterdir()) == []


def test_hub_save_never_writes_through_a_symlink(tmp_path):
    """A teacher folder whose config.json (and weights) became symlinks to files outside: the files outside are
    kept, the folder gets regular files (the probe: save_pretrained wrote through the link, then replaced it)."""
    folder = save_pretrained(_model(), tmp_path / "teacher")
    outside = {}
    for name in ("config.json", "model.safetensors"):
        outside[name] = tmp_path / f"outside-{name}"
        outside[name].write_bytes(b"the user's own file")
        (folder / name).unlink()
        (folder / name).symlink_to(outside[name])
    save_pretrained(_model(), folder)
    assert all(p.read_bytes() == b"the user's own file" for p in outside.values())  # kept
    assert not any((folder / name).is_symlink() for name in outside)
    assert timm.create_model(f"local-dir:{folder}", pretrained=True).num_classes == 5


def test_hub_save_of_a_compiled_model(tmp_path):
    import torch

    model = _model().eval()
    folder = save_pretrained(torch.compile(model), tmp_path / "teacher")
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_hub_save_on_a_full_disk_keeps_the_folder(tmp_path, monkeypatch):
    import timm.models._hub as timm_hub
    from safetensors import SafetensorError

    from timm_remem.errors import CheckpointError

    folder = save_pretrained(_model(), tmp_path / "teacher")
    before = _snapshot(folder)

    def no_space(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')

    monkeypatch.setattr(timm_hub.safetensors.torch, "save_file", no_space)
    _raises(CheckpointError, r"could not write the teacher folder '.*teacher': No space left on device\. Free disk "
            r"space or make the folder writable \(or choose another path\); its earlier files are kept",
            lambda: save_pretrained(_model(), folder))
    assert _snapshot(folder) == before and sorted(p.name for p in folder.iterdir()) == sorted(before)
    _raises(CheckpointError, r"No space left on device", lambda: save_pretrained(_model(), tmp_path / "new"))
    assert not (tmp_path / "new").exists()  # the folder made for a save that failed is removed again
