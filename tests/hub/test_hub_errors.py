"""Tests for timm_remem.hub.errors: the Hub's exceptions, recognised by class anywhere in the chain of causes.

The errors are the client's own: raised by ``huggingface_hub.utils.hf_raise_for_status`` from HTTP responses built
here, by httpx2 for a refused connection, or by the test Hub server (tests/hub_server.py) answering an error.
"""

from __future__ import annotations

import re

import httpx2
import hub_server
import pytest
from hub_server import ALICE_WRITE
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
)
from huggingface_hub.utils import hf_raise_for_status

from timm_remem.errors import CheckpointError, HubError
from timm_remem.hub import push_to_hub
from timm_remem.hub.errors import explain_hub_error, find_in_chain, hub_errors

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")  # huggingface_hub's own call

ENDPOINT = "http://hub.test"


def _http_error(status: int, **headers: str) -> HfHubHTTPError:
    """The exception huggingface_hub raises for this answer (with httpx2's HTTPStatusError as its cause)."""
    response = httpx2.Response(status, headers=headers,
                               request=httpx2.Request("GET", f"{ENDPOINT}/api/models/alice/vit"))
    with pytest.raises(HfHubHTTPError) as info:
        hf_raise_for_status(response)
    return info.value


def _explain(err: BaseException, pushing: bool = False) -> str | None:
    return explain_hub_error(err, "push to" if pushing else "download", "alice/vit", None, ENDPOINT, pushing)


def _wrapped(err: BaseException) -> RuntimeError:
    """``err`` as the cause of another exception, the way libraries re-raise."""
    try:
        raise RuntimeError("outer") from err
    except RuntimeError as outer:
        return outer


def _refused_connection() -> httpx2.ConnectError:
    with pytest.raises(httpx2.ConnectError) as info:
        httpx2.get("http://127.0.0.1:9/", timeout=2)
    return info.value


@pytest.mark.parametrize(
    ("make", "pushing", "expected"),
    [
        (lambda: LocalTokenNotFoundError("no token"), False,
         "cannot download 'alice/vit' on http://hub.test without a token: pass token=..., set the HF_TOKEN "
         "environment variable or run `hf auth login`."),
        (lambda: OfflineModeIsEnabled("offline"), True,
         "cannot push to 'alice/vit' on http://hub.test: offline mode is on (HF_HUB_OFFLINE=1); unset it to reach "
         "the Hub."),
        (lambda: _http_error(404, **{"X-Error-Code": "RevisionNotFound"}), False,
         "revision 'main' does not exist in 'alice/vit' on http://hub.test: check the branch, tag or commit id "
         "(list them with huggingface_hub.HfApi().list_repo_refs)."),
        (lambda: _http_error(404, **{"X-Error-Code": "RepoNotFound"}), False,
         "repository 'alice/vit' on http://hub.test was not found, or it is private and your token cannot see it: "
         "check the name; for a private repository pass token=..., set the HF_TOKEN environment variable or run "
         "`hf auth login` with access to it."),
        (lambda: _http_error(404, **{"X-Error-Code": "EntryNotFound"}), False,
         "'alice/vit' on http://hub.test has no config.json: it is not a timm model repository (publish teachers "
         "with timm_remem.push_to_hub)."),
        (lambda: _http_error(401), True,
         "the Hub rejected the token (401 Unauthorized) for 'alice/vit' on http://hub.test: it is invalid, expired "
         "or revoked; pass token=..., set the HF_TOKEN environment variable or run `hf auth login` with a valid "
         "token."),
        (lambda: _http_error(403, **{"X-Error-Message": "no write"}), True,
         "the Hub refused to let your token push to 'alice/vit' on http://hub.test (403 Forbidden): it has no write "
         "access to the namespace 'alice' (another user's namespace, or a token with the read role). Push to your "
         "own namespace or an organisation where you may write, with a token that has the write role. (the Hub "
         "said: no write)"),
        (lambda: LocalEntryNotFoundError("not cached"), False,
         "cannot reach the Hub at http://hub.test to download 'alice/vit', and it is not in the local cache: check "
         "the network connection, HF_ENDPOINT and proxy settings, or set HF_HUB_OFFLINE=1 to use a cached copy."),
    ],
    ids=["no-token", "offline-push", "revision", "repository", "entry", "401", "403", "not-cached"],
)
def test_each_hub_error_gets_its_message_bare_or_wrapped(make, pushing, expected):
    assert _explain(make(), pushing) == expected
    assert _explain(_wrapped(make()), pushing) == expected


def test_errors_are_recognised_by_class_not_by_name():
    class EmbargoedRepo(GatedRepoError):  # a subclass the Hub client may add: still a missing repository
        pass

    class RepositoryNotFoundError(Exception):  # same name, another library: not the Hub's
        pass

    response = httpx2.Response(404, request=httpx2.Request("GET", ENDPOINT))
    assert _explain(EmbargoedRepo("gone", response=response)).startswith("repository 'alice/vit' on")
    assert _explain(RepositoryNotFoundError("gone")) is None


def test_a_refused_connection_is_a_network_error():
    message = _explain(_wrapped(_refused_connection()), pushing=True)
    assert message.startswith("cannot push to 'alice/vit' on http://hub.test: the connection to the Hub failed "
                              "(ConnectError: ")
    assert message.endswith("Check the network connection, HF_ENDPOINT and proxy settings. The push did not "
                            "complete; it is a single commit, so the repository shows the previous revision (or the "
                            "complete new one if the Hub applied it just before the failure): run it again.")


@pytest.mark.parametrize("status", [400, 409, 500])
def test_an_error_answer_is_not_mistaken_for_a_network_failure(status):
    """huggingface_hub raises its HTTP errors from httpx2's HTTPStatusError: that is an answer, not a failure."""
    err = _http_error(status, **{"X-Error-Message": "details"})
    assert isinstance(err.__cause__, httpx2.HTTPStatusError)
    advice = (": the Hub or the server at HF_ENDPOINT is failing; try again later." if status >= 500 else ".")
    what = " (a server error)" if status >= 500 else ""
    assert _explain(err) == (f"the Hub answered {status}{what} when trying to download 'alice/vit' on "
                             f"http://hub.test (the Hub said: details){advice}")


def test_other_errors_pass_through_unchanged():
    assert _explain(ValueError("not the Hub's")) is None
    with pytest.raises(ValueError, match="not the Hub's"), hub_errors("download", "alice/vit", None, ENDPOINT):
        raise ValueError("not the Hub's")
    with pytest.raises(CheckpointError, match="ours"), hub_errors("download", "alice/vit", None, ENDPOINT):
        raise CheckpointError("ours")


def test_hub_errors_raises_one_hub_error_without_the_internals():
    with pytest.raises(HubError, match="without a token") as info, hub_errors("download", "alice/vit", None,
                                                                              ENDPOINT):
        raise _wrapped(LocalTokenNotFoundError("no token"))
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_find_in_chain_follows_causes_and_contexts():
    try:
        try:
            raise KeyError("first")
        except KeyError:
            raise OSError("second")  # noqa: B904 (implicit context on purpose)
    except OSError as err:
        assert isinstance(find_in_chain(err, LookupError), KeyError)
        assert find_in_chain(err, OSError) is err
        assert find_in_chain(err, TypeError) is None


def test_push_refused_with_an_error_answer_names_the_status(hub, teacher, monkeypatch):
    def refuse(handler, **_):
        raise hub_server.HubHTTPError(400, "Invalid commit: the README is too large")

    route = ("POST", re.compile(r"/api/models/alice/vit-remem/commit/.*"), refuse)
    monkeypatch.setattr(hub_server, "_ROUTES", [route, *hub_server._ROUTES])
    with pytest.raises(HubError) as info:
        push_to_hub(teacher[0], "alice/vit-remem", token=ALICE_WRITE)
    assert str(info.value).startswith(
        f"the Hub answered 400 when trying to push to 'alice/vit-remem' on {hub.endpoint} (the Hub said: Invalid "
        "commit: the README is too large). The push did not complete")
    assert hub.repo("alice/vit-remem").branches["main"] == next(iter(hub.repo("alice/vit-remem").commits))
