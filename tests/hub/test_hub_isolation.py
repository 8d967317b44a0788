"""timm-remem bounds its own Hub requests only: a user's client factory and Hub calls behave as without timm-remem,
before, during (on another thread) and after timm-remem's calls.

The user's factory is the one ``huggingface_hub.set_client_factory`` documents: a function returning an
``httpx2.Client``; here it records every request its clients send and the clients it made. The user's calls go to
the test Hub server (tests/hub_server.py); timm-remem's to the same server or to a ``MisbehavingServer`` that never
answers, with short limits, so that a user's call that outlasts timm-remem's timeout shows which limits applied.
"""

from __future__ import annotations

import threading
import time

import httpx2
import pytest
from hub_server import ALICE_WRITE, MisbehavingServer, use_hub
from huggingface_hub import HfApi, close_session, get_session, hf_hub_download, set_client_factory
from huggingface_hub.utils import _http as hf_http

import timm_remem
from timm_remem.errors import HubError
from timm_remem.hub import fetch_teacher_files

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's own call

USER_REPO = "alice/user-notes"


class UserFactory:
    """A user's client factory: no timeout (huggingface_hub's default), a hook that records each request."""

    def __init__(self, timeout: float | None = None) -> None:
        self.timeout = timeout
        self.clients: list[httpx2.Client] = []
        self.seen: list[tuple[str, str]] = []  # (thread name, URL) of every request of the user's clients

    def __call__(self) -> httpx2.Client:
        def record(request: httpx2.Request) -> None:
            self.seen.append((threading.current_thread().name, str(request.url)))

        client = httpx2.Client(event_hooks={"request": [record]}, follow_redirects=True, timeout=self.timeout)
        self.clients.append(client)
        return client


@pytest.fixture
def shared_client(monkeypatch):
    """huggingface_hub's factory and shared client as they were before the test, put back after it."""
    monkeypatch.setattr(hf_http, "_GLOBAL_CLIENT_FACTORY", hf_http._GLOBAL_CLIENT_FACTORY)
    monkeypatch.setattr(hf_http, "_GLOBAL_CLIENT", None)
    yield
    close_session()


@pytest.fixture
def user(shared_client, hub):
    """The user's factory, set before any timm-remem call, and a repository of the user's with one file."""
    factory = UserFactory()
    set_client_factory(factory)
    api = HfApi(token=ALICE_WRITE)
    api.create_repo(USER_REPO)
    api.upload_file(path_or_fileobj=b"mine\n", path_in_repo="notes.txt", repo_id=USER_REPO)
    return factory


def _user_download(hub, cache) -> bytes:
    path = hf_hub_download(USER_REPO, "notes.txt", endpoint=hub.endpoint, cache_dir=cache)
    with open(path, "rb") as f:
        return f.read()


def test_before_and_after_the_users_factory_and_client_stay_in_charge(user, hub, teacher, tmp_path):
    assert _user_download(hub, tmp_path / "before") == b"mine\n"
    before = get_session()
    assert user.clients == [before] and any("notes.txt" in url for _, url in user.seen)  # the user's client
    seen = len(user.seen)
    timm_remem.push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE)
    timm_remem.load_teacher("hf-hub:alice/vit-remem")
    assert user.seen[seen:] == []  # none of timm-remem's requests went through the user's client
    assert get_session() is before and not before.is_closed  # the same client, still open
    assert _user_download(hub, tmp_path / "cache") == b"mine\n"
    assert all(USER_REPO in url for _, url in user.seen[seen:])  # ... made by the user's client
    close_session()
    assert get_session() is user.clients[-1] and len(user.clients) == 2  # the user's factory is still the one


def test_without_a_user_factory_huggingface_hubs_default_client_is_left_alone(shared_client, hub, teacher):
    before = get_session()
    timm_remem.push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE, timeout=3)
    assert get_session() is before and before.timeout == httpx2.Timeout(None)  # no timm-remem limit on it
    close_session()
    assert get_session().timeout == httpx2.Timeout(None)  # huggingface_hub's own factory made the next one


def _timm_remem_call_in_progress(source: str, requests, **limits) -> tuple[threading.Thread, dict]:
    """``load_teacher(source)`` running on another thread, once its server has received ``requests()`` > 0."""
    outcome: dict = {}

    def call() -> None:
        try:
            outcome["model"] = timm_remem.load_teacher(source, **limits)
        except HubError as err:
            outcome["error"] = str(err)

    thread = threading.Thread(target=call, name="timm-remem")
    thread.start()
    deadline = time.monotonic() + 5
    while requests() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert requests() >= 1
    return thread, outcome


def test_during_a_timm_remem_call_the_users_calls_on_another_thread_keep_their_own_limits(
        user, hub, tmp_path, monkeypatch, no_retry_wait):
    client = get_session()
    with MisbehavingServer("silent") as dead:
        use_hub(monkeypatch, dead.endpoint, tmp_path / "hf_home")  # timm-remem's calls go to the dead server
        thread, outcome = _timm_remem_call_in_progress("hf-hub:alice/vit", lambda: dead.requests, timeout=1.0,
                                                       retry_budget=30)
        hub.delay = 1.5  # each answer of the user's server now takes longer than timm-remem's 1 s timeout
        start = time.monotonic()
        assert _user_download(hub, tmp_path / "cache") == b"mine\n"  # under timm-remem's limits it would fail
        assert time.monotonic() - start >= 1.5 and thread.is_alive()  # slow, and timm-remem's call ran meanwhile
        user_threads = {name for name, url in user.seen if "notes.txt" in url}
        assert user_threads == {threading.current_thread().name}  # through the user's own client (its hook)
        close_session()  # the user's own close_session() closes the user's client, as without timm-remem
        assert client.is_closed and get_session() is not client
        hub.delay = 0.0
        assert _user_download(hub, tmp_path / "cache2") == b"mine\n" and len(user.clients) == 2
        thread.join(30)
    assert not thread.is_alive()
    assert "sent no answer within 1 s" in outcome["error"]  # timm-remem's call kept its own limits throughout
    assert not any(dead.endpoint in url for _, url in user.seen)  # and never used the user's client
    assert get_session() is user.clients[-1]  # the user's client (made by the user's factory) is back in place


def test_a_factory_set_during_a_timm_remem_call_stays_in_effect(user, hub, teacher, tmp_path):
    timm_remem.push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE)
    hub.delay, before = 0.3, len(hub.requests)  # the download below takes a few answers of 0.3 s
    thread, outcome = _timm_remem_call_in_progress("hf-hub:alice/vit-remem", lambda: len(hub.requests) - before)
    later = UserFactory()
    set_client_factory(later)  # the rest of timm-remem's call runs through it (see _network.bounded)
    thread.join(30)
    assert not thread.is_alive() and "model" in outcome
    assert user.clients[0].is_closed  # set_client_factory closed the client it replaced, as without timm-remem
    assert get_session() is later.clients[-1]  # the factory the user set is the one in effect afterwards
    hub.delay = 0.0
    assert _user_download(hub, tmp_path / "cache") == b"mine\n"


def test_a_push_sends_nothing_through_the_users_client_even_when_every_file_is_large(user, hub, teacher):
    """With two or more LFS files, huggingface_hub's upload_folder uploads from worker threads of its own."""
    hub.all_lfs = True
    seen = len(user.seen)
    timm_remem.push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE)
    assert user.seen[seen:] == []
    repo = hub.repo("alice/vit-remem")
    files = repo.commits[repo.branches["main"]].files
    assert {p for p, f in files.items() if f.sha256} == {"config.json", "model.safetensors", "README.md"}


def test_concurrent_timm_remem_and_user_calls_each_keep_their_own_client(user, hub, teacher, tmp_path):
    timm_remem.push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE)
    before, seen = get_session(), len(user.seen)
    errors: list[BaseException] = []

    def run(work) -> None:
        try:
            for _ in range(3):
                work()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    ours = [lambda i=i: fetch_teacher_files("hf-hub:alice/vit-remem", cache_dir=tmp_path / f"ours{i}")
            for i in range(3)]
    theirs = [lambda i=i: _user_download(hub, tmp_path / f"theirs{i}") for i in range(3)]
    threads = [threading.Thread(target=run, args=(work,)) for work in ours + theirs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and not any(thread.is_alive() for thread in threads)
    assert all(USER_REPO in url for _, url in user.seen[seen:]) and len(user.seen) - seen >= 9
    assert get_session() is before and user.clients == [before] and not before.is_closed
