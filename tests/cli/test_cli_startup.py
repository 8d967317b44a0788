"""Start-up: ``timm-remem --help``, ``--version``, ``COMMAND --help`` and argument errors import neither torch nor timm
(each checked in a fresh interpreter, by ``sys.modules``), and the lazy ``timm_remem`` package still registers SAM in
timm's optimizer factory whichever of the two is imported first.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import timm_remem
import timm_remem.cli as cli

HEAVY = ("torch", "timm", "numpy", "safetensors", "huggingface_hub", "peft", "matplotlib")
COMMANDS = [module.__name__.rsplit(".", 1)[1] for module in cli._COMMAND_MODULES]
# Modules imported only when a command runs (they hold the library calls).
RUN_TIME_MODULES = ("timm_remem.cli._runtime", "timm_remem.cli._analyze_run", "timm_remem.cli._push_run")

# Runs ``main(argv)`` for each argv in one fresh interpreter; after each, records the exit code and which heavy
# packages are in sys.modules; then imports every start-up module of timm_remem.cli and records again.
PROBE = """
import contextlib, importlib, io, json, os, pkgutil, sys
heavy = lambda: sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(os.environ["HEAVY"])))
import timm_remem
records = [{"argv": "import timm_remem", "heavy": heavy()}]
from timm_remem.cli import main
import timm_remem.cli
for argv in json.loads(os.environ["ARGVS"]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(argv)
    records.append({"argv": argv, "code": code, "err": err.getvalue(), "heavy": heavy()})
for info in pkgutil.iter_modules(timm_remem.cli.__path__, "timm_remem.cli."):
    if info.name not in json.loads(os.environ["RUN_TIME"]):
        importlib.import_module(info.name)
records.append({"argv": "every start-up module of timm_remem.cli", "heavy": heavy()})
print(json.dumps(records))
"""


def fresh_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240, check=False,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    return done


def test_help_version_and_argument_errors_import_neither_torch_nor_timm(tmp_path):
    argvs = [["--help"], ["--version"], [], *([c, "--help"] for c in COMMANDS),
             ["finetune", "--epochs", "x"],  # argparse: not an int
             ["distill", "--model", "m", "--bogus"],  # argparse: unknown flag
             ["finetune", "--model", "test_vit", "--epochs", "0"],  # the config class refuses it
             ["select", "ckpts"],  # --model missing
             ["finetune", "--config", str(tmp_path / "missing.yaml")],
             ["demo", "--threads", "-1"], ["analyze", "test_vit", "--noise", "0"]]
    done = fresh_python(PROBE, {"ARGVS": json.dumps(argvs), "HEAVY": json.dumps(HEAVY),
                                "RUN_TIME": json.dumps(RUN_TIME_MODULES)})
    records = json.loads(done.stdout)
    assert [r for r in records if r["heavy"]] == []
    codes = {json.dumps(r["argv"]): r.get("code") for r in records}
    assert codes[json.dumps(["--help"])] == 0 and codes[json.dumps(["--version"])] == 0
    for r in records[-8:-1]:  # the refused inputs: exit 2, one line
        assert (r["code"], r["err"].count("\n")) == (2, 1), r


ORDERS = {
    "timm_remem-then-timm": "import timm_remem\nassert 'torch' not in sys.modules\nimport timm",
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
assert type(timm.__spec__.loader).__name__ == type(timm.__loader__).__name__ == "SourceFileLoader"
assert not [f for f in sys.meta_path if type(f).__module__ == "timm_remem"], sys.meta_path
print("ok")
"""
    assert fresh_python(code).stdout == "ok\n"


def test_import_timm_remem_alone_loads_nothing_heavy():
    code = ("import json, sys, timm_remem\n"
            f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(HEAVY)!r}))))")
    assert json.loads(fresh_python(code).stdout) == []


def test_every_public_name_resolves_and_is_listed():
    for name in timm_remem.__all__:
        assert getattr(timm_remem, name) is not None, name
    assert set(timm_remem.__all__) <= set(dir(timm_remem))
    assert timm_remem.data.DigitsDataset.__module__ == "timm_remem.data"  # rooms stay reachable as attributes
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        timm_remem.nope  # noqa: B018


def test_the_type_checking_imports_match_the_lazy_table():
    tree = ast.parse(Path(timm_remem.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    seen = {alias.name: f"timm_remem.{node.module}" for node in block.body if node.module
            for alias in node.names}
    assert seen == timm_remem._LAZY


def test_moved_names_still_warn():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        create_dataset = timm_remem.create_dataset
    assert create_dataset.__module__ == "timm_remem.data"
    assert "deprecated at the top level" in str(caught[0].message)
