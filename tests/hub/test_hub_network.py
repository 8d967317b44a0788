"""Bounded Hub traffic (issue 11 item 8): a server that never answers, trickles, answers HTML or garbage, or
answers 5xx ends a push or a download in one HubError that names what happened, quickly, and never hangs.

The servers are :class:`hub_server.MisbehavingServer` on 127.0.0.1; the limits are short (0.5 s timeout, 1 s retry
budget) and huggingface_hub's waits between retries are made instant, so each case takes about a second.
"""

from __future__ import annotations

import time

import pytest
import timm
from hub_server import MisbehavingServer, use_hub

import timm_remem
from timm_remem.errors import ConfigError, HubError
from timm_remem.hub import fetch_teacher_files
from timm_remem.hub._network import ENV_RETRY_BUDGET, ENV_TIMEOUT, HubLimits

LIMITS = dict(timeout=0.5, retry_budget=1.0)
# What each misbehaviour must be called in the error, and the advice that goes with it.
EXPECTED = {
    "silent": ("the server accepted the connection but sent no answer within 0.5 s", "raise TIMM_REMEM_HUB_TIMEOUT"),
    "trickle": ("the server answers, but trickles its bytes (slower than 1024 bytes/s", "TIMM_REMEM_HUB_MIN_SPEED"),
    "html": ("the server answered an HTML page instead of the Hub's JSON API", "check HF_ENDPOINT"),
    "garbage": ("the server's answer is not valid HTTP (garbage bytes)", "check HF_ENDPOINT"),
    "5xx": ("the Hub answered 503 (a server error)", "try again later"),
}


@pytest.fixture(scope="module")
def model():
    return timm.create_model("test_vit", pretrained=False, img_size=32)


@pytest.fixture
def broken(request, tmp_path, monkeypatch, no_retry_wait):
    with MisbehavingServer(request.param) as server:
        use_hub(monkeypatch, server.endpoint, tmp_path / "hf_home")
        yield server


def _timed(call):
    start = time.monotonic()
    with pytest.raises(HubError) as info:
        call()
    return str(info.value), time.monotonic() - start


@pytest.mark.parametrize("broken", list(EXPECTED), indirect=True)
def test_push_to_a_misbehaving_server_is_one_clear_error(broken, model):
    message, seconds = _timed(lambda: timm_remem.push_to_hub(model, "alice/vit", token="hf_x", **LIMITS))
    what, advice = EXPECTED[broken.mode]
    assert message.startswith(f"cannot push to 'alice/vit' on {broken.endpoint}: {what}") or \
        message.startswith(what), message
    assert advice in message and "The push did not complete" in message
    assert seconds < 8 and broken.requests >= 1


@pytest.mark.parametrize("broken", list(EXPECTED), indirect=True)
def test_download_from_a_misbehaving_server_is_one_clear_error(broken):
    message, seconds = _timed(lambda: timm_remem.load_teacher("hf-hub:alice/vit", **LIMITS))
    what, advice = EXPECTED[broken.mode]
    assert what in message and advice in message and "alice/vit" in message, message
    assert "cannot reach the Hub" not in message  # the server was reached: it misbehaved
    assert seconds < 8


@pytest.mark.parametrize("broken", ["silent"], indirect=True)
def test_retry_budget_ends_the_retries(broken):
    # huggingface_hub tries the metadata request once, then up to 6 more times; a budget of 0 s stops at the first
    # failure, a budget of 1 s allows the retries that fit in it (each takes the 0.3 s timeout).
    message, seconds = _timed(lambda: fetch_teacher_files("hf-hub:alice/vit", timeout=0.3, retry_budget=0))
    assert broken.requests == 1 and seconds < 2
    assert "sent no answer within 0.3 s" in message
    broken.requests = 0
    _timed(lambda: fetch_teacher_files("hf-hub:alice/vit", timeout=0.3, retry_budget=1.0))
    assert 3 <= broken.requests <= 6


@pytest.mark.parametrize("broken", ["silent"], indirect=True)
def test_limits_come_from_the_environment(broken, model, monkeypatch):
    monkeypatch.setenv(ENV_TIMEOUT, "0.3")
    monkeypatch.setenv(ENV_RETRY_BUDGET, "0.5")
    message, seconds = _timed(lambda: timm_remem.push_to_hub(model, "alice/vit", token="hf_x"))
    assert "sent no answer within 0.3 s (TIMM_REMEM_HUB_TIMEOUT)" in message and seconds < 3


def test_a_dead_port_is_a_connection_failure(model, tmp_path, monkeypatch, no_retry_wait):
    server = MisbehavingServer("silent")
    endpoint = server.endpoint
    server.stop()  # nothing listens there any more
    use_hub(monkeypatch, endpoint, tmp_path / "hf_home")
    message, seconds = _timed(lambda: timm_remem.push_to_hub(model, "alice/vit", token="hf_x", **LIMITS))
    assert "the connection to the Hub failed (ConnectError" in message and seconds < 5


def test_default_limits_fail_within_about_a_minute():
    limits = HubLimits.resolve()
    assert (limits.timeout, limits.retry_budget, limits.min_speed) == (10.0, 45.0, 1024.0)
    assert limits.timeout + limits.retry_budget <= 60


@pytest.mark.parametrize(("kwargs", "env", "match"), [
    ({"timeout": 0}, None, "timeout must be a finite number of seconds > 0"),
    ({"retry_budget": float("inf")}, None, "retry_budget must be a finite number of seconds >= 0"),
    ({}, "ten", "the environment variable TIMM_REMEM_HUB_TIMEOUT must be a finite number of seconds > 0"),
])
def test_bad_limits_are_config_errors(kwargs, env, match, monkeypatch):
    if env is not None:
        monkeypatch.setenv(ENV_TIMEOUT, env)
    with pytest.raises(ConfigError, match=match):
        HubLimits.resolve(**kwargs)
