"""Every docstring example in the library runs and prints what it says (the examples are part of the docs)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "timm_remem",
    "timm_remem.reweighting",
    "timm_remem.sam",
    "timm_remem.distill",
    "timm_remem.hub",
    "timm_remem.data",
    "timm_remem.checkpoint",
    "timm_remem.analysis.mi",
    "timm_remem.analysis.information",
    "timm_remem.analysis.expertness",
    "timm_remem.analysis.pruning",
    "timm_remem.analysis.dynamics",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed"
