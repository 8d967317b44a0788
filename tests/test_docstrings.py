"""Every docstring example in the library runs and prints what it says (the examples are part of the docs).

The modules are found by walking the installed package, so a new module's examples are checked without anyone
adding it to a list.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import timm_remem

# Shims that only warn and forward (their names are documented where they now live).
_SKIP = {"timm_remem.__main__", "timm_remem.pipeline"}


def _modules() -> list[str]:
    names = ["timm_remem"]
    for info in pkgutil.walk_packages(timm_remem.__path__, prefix="timm_remem."):
        if info.name not in _SKIP:
            names.append(info.name)
    return sorted(names)


MODULES = _modules()


def test_every_module_is_collected():
    """The walk finds the rooms (a broken walk would make the parametrized test below vacuous)."""
    for room in ("timm_remem.reweighting", "timm_remem.sam", "timm_remem.distill", "timm_remem.hub",
                 "timm_remem.analysis", "timm_remem.cli"):
        assert any(m == room or m.startswith(room + ".") for m in MODULES), room
    assert len(MODULES) >= 20


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed"
