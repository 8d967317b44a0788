"""Start-up and the package's front door: ``timm-remem --help``, ``--version`` and argument errors answer with the
right exit codes; ``import timm_remem`` registers the one-pass SAM in timm's optimizer factory in either import
order and changes nothing else outside the package; the top level is small and every name that left it still works,
with a DeprecationWarning naming its room.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys

import pytest

import timm_remem
import timm_remem.cli as cli

COMMANDS = [module.__name__.rsplit(".", 1)[1] for module in cli._COMMAND_MODULES]

# Runs ``main(argv)`` for each argv in one fresh interpreter and records the exit code and stderr.
PROBE = """
import contextlib, io, json, os
from timm_remem.cli import main
records = []
for argv in json.loads(os.environ["ARGVS"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(argv)
    records.append({"argv": argv, "code": code, "err": err.getvalue()})
print(json.dumps(records))
"""


def fresh_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, check=False,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    return done


def test_help_version_and_argument_errors(tmp_path):
    argvs = [["--help"], ["--version"], [], *([c, "--help"] for c in COMMANDS),
             ["finetune", "--epochs", "x"],  # argparse: not an int
             ["distill", "--model", "m", "--bogus"],  # argparse: unknown flag
             ["finetune", "--model", "test_vit", "--epochs", "0"],  # the config class refuses it
             ["select", "ckpts"],  # --model missing
             ["finetune", "--config", str(tmp_path / "missing.yaml")],
             ["demo", "--threads", "-1"], ["analyze", "test_vit", "--noise", "0"]]
    records = json.loads(fresh_python(PROBE, {"ARGVS": json.dumps(argvs)}).stdout)
    codes = {json.dumps(r["argv"]): r.get("code") for r in records}
    assert codes[json.dumps(["--help"])] == 0 and codes[json.dumps(["--version"])] == 0
    assert all(codes[json.dumps([c, "--help"])] == 0 for c in COMMANDS)
    for r in records[-7:]:  # the refused inputs: exit 2, one line
        assert (r["code"], r["err"].count("\n")) == (2, 1), r


ORDERS = {
    "timm_remem-then-timm": "import timm_remem\nimport timm",
    "timm-then-timm_remem": "import timm\nimport timm_remem",
}


@pytest.mark.parametrize("order", list(ORDERS), ids=list(ORDERS))
def test_sam_is_in_timms_factory_in_either_import_order(order):
    code = f"""
import sys
{ORDERS[order]}
import torch
opt = timm.optim.create_optimizer_v2(torch.nn.Linear(2, 2), "samsgd", lr=0.1, rho=0.07)
from timm_remem.sam import OnePassSAMSGD
assert type(opt) is OnePassSAMSGD and opt.param_groups[0]["rho"] == 0.07, opt
print("ok")
"""
    assert fresh_python(code).stdout == "ok\n"


GLOBAL_STATE = """
import json, logging, sys, warnings, torch
def snapshot():
    import huggingface_hub.utils._http as http
    loggers = {name: (len(lg.handlers), len(lg.filters), lg.level) for name, lg in
               [("", logging.getLogger()), *logging.root.manager.loggerDict.items()] if isinstance(lg, logging.Logger)}
    return {"meta_path": [type(f).__name__ for f in sys.meta_path], "path_hooks": len(sys.path_hooks),
            "warning_filters": len(warnings.filters), "loggers": loggers,
            "threads": torch.get_num_threads(), "dtype": str(torch.get_default_dtype()),
            "forward_hooks": len(torch.nn.modules.module._global_forward_hooks),
            "forward_pre_hooks": len(torch.nn.modules.module._global_forward_pre_hooks),
            "hub_factory": getattr(http, "_GLOBAL_CLIENT_FACTORY", None) is not None
                           and http._GLOBAL_CLIENT_FACTORY.__module__}
import timm, timm.optim, huggingface_hub
before = snapshot()
names = set(timm.optim.list_optimizers())
import timm_remem
after = snapshot()
new = sorted(set(timm.optim.list_optimizers()) - names)
print(json.dumps({"before": before, "after": after, "new": new}))
"""


def test_import_changes_nothing_outside_the_package_but_timms_registry():
    out = json.loads(fresh_python(GLOBAL_STATE).stdout)
    before, after = out["before"], out["after"]
    # timm's registry logger may gain a level entry when first used by the registration: compare the rest
    assert {k: v for k, v in after.items() if k != "loggers"} == {k: v for k, v in before.items() if k != "loggers"}
    # loggers that modules create on import are fine; none may gain a handler, a filter or a level
    changed = {name: (before["loggers"].get(name), value) for name, value in after["loggers"].items()
               if before["loggers"].get(name, [0, 0, 0]) != value}
    assert changed == {}
    assert out["new"] == ["sam", "samadam", "samadamw", "sammomentum", "samsgd"]


def test_the_top_level_is_small_and_every_public_name_resolves():
    assert len(timm_remem.__all__) <= 25
    for name in timm_remem.__all__:
        assert getattr(timm_remem, name) is not None, name
    assert set(timm_remem.__all__) <= set(dir(timm_remem))
    assert timm_remem.data.DigitsDataset.__module__ == "timm_remem.data"  # rooms stay reachable as attributes
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        timm_remem.nope  # noqa: B018


@pytest.mark.parametrize("name", sorted(timm_remem._MOVED))
def test_moved_names_still_work_and_warn(name):
    room = timm_remem._MOVED[name]
    with pytest.warns(DeprecationWarning, match=f"timm_remem.{name} is deprecated.*from timm_remem.{room} import"):
        value = getattr(timm_remem, name)
    assert value is getattr(importlib.import_module(f"timm_remem.{room}"), name)


def test_nothing_of_ours_uses_a_deprecated_name():
    fresh_python("import warnings\nwarnings.simplefilter('error', DeprecationWarning)\n"
                 "import timm_remem, timm_remem.train, timm_remem.study, timm_remem.analysis, timm_remem.cli")


def test_the_version_is_read_without_importing_the_package():
    # pip builds the metadata in an isolated environment without torch; `import timm_remem` imports torch, so the
    # version must come from a module setuptools reads statically (a literal assignment).
    import configparser
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    assert cfg["metadata"]["version"] == "attr: timm_remem._version.__version__"
    tree = ast.parse((root / "timm_remem" / "_version.py").read_text())
    assert [type(node).__name__ for node in tree.body if not isinstance(node, ast.Expr)] == ["Assign"]
