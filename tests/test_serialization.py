"""Dataclass (de)serialisation of ``timm_remem._serialization``."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from timm_remem._serialization import dataclass_from_dict, dataclass_to_dict
from timm_remem._version import __version__


@dataclass
class _Cfg:
    b: int = 1
    a: list = field(default_factory=lambda: [1, 2])


def test_to_dict_sorted_and_stamped():
    assert list(dataclass_to_dict(_Cfg())) == ["a", "b"]
    assert dataclass_to_dict(_Cfg(), stamp_version=True) == {"a": [1, 2], "b": 1, "version": __version__}


def test_from_dict_drops_unknown_keys_with_a_warning():
    with pytest.warns(UserWarning, match=r"_Cfg: ignoring unknown keys \['new_field'\]"):
        cfg = dataclass_from_dict(_Cfg, {"b": 3, "new_field": 1})
    assert cfg == _Cfg(b=3)


def test_from_dict_ignored_keys_are_silent(recwarn):
    assert dataclass_from_dict(_Cfg, {"b": 2, "version": "9.9"}, ignore=("version",)) == _Cfg(b=2)
    assert not recwarn.list
