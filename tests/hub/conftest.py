"""Fixtures of the hub tests: a Hub-compatible server on loopback, and two teachers with references."""

from __future__ import annotations

import pytest
from hub_teachers import FACTORS, make_teacher


@pytest.fixture(scope="module")
def teacher():
    return make_teacher()


@pytest.fixture(scope="module")
def other():
    """A second teacher (other weights and factors), for pushes that replace or must not replace the first."""
    return make_teacher(seed=1, factors=FACTORS[::-1])
