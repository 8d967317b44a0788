"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch
from hub_server import no_retry_waits, serving


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread for a module of tiny-model tests (faster on 2 cores, same kernels as children).

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A Hub-compatible server on loopback (tests/hub_server.py), the client pointed at it."""
    with serving(tmp_path / "hf_home", monkeypatch) as server:
        yield server


@pytest.fixture
def no_retry_wait(monkeypatch):
    """The client's retries without their waits (a test of an unreachable Hub takes no back-off time)."""
    no_retry_waits(monkeypatch)
