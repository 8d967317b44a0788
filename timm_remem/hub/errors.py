"""One :class:`~timm_remem.errors.HubError` for every way the Hub can fail, with what happened and what to do.

huggingface_hub's and httpx2's errors are recognised by class anywhere in the chain of causes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager

import httpx2
from huggingface_hub import constants
from huggingface_hub.errors import (
    FileMetadataError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..errors import HubError, RememError
from ._common import CONFIG_NAME
from ._network import (
    ENV_MIN_SPEED,
    ENV_RETRY_BUDGET,
    ENV_TIMEOUT,
    HubLimits,
    NoAnswerTimeout,
    Operation,
    RetryBudgetExhausted,
    TrickleTimeout,
    bounded,
)

__all__ = ["TOKEN_HELP", "NETWORK_ERRORS", "hub_errors", "explain_hub_error", "find_in_chain"]

TOKEN_HELP = "pass token=..., set the HF_TOKEN environment variable or run `hf auth login`"
# A request that got no answer: the connection failed, timed out or broke (httpx2.RequestError covers the
# transport errors; HTTPStatusError, an answer with an error status, is not one of them).
NETWORK_ERRORS = (httpx2.RequestError, ConnectionError, TimeoutError)


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` and the exceptions it was raised from (``__cause__``, else ``__context__``), outermost first."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def find_in_chain(err: BaseException, *classes: type[BaseException]) -> BaseException | None:
    """The first exception in ``err``'s chain of causes that is an instance of one of ``classes``, or ``None``."""
    return next((e for e in _chain(err) if isinstance(e, classes)), None)


@contextmanager
def hub_errors(action: str, repo_id: str, revision: str | None, endpoint: str, pushing: bool = False,
               limits: HubLimits | None = None) -> Iterator:
    """Run Hub calls bounded by ``limits`` (default: :meth:`HubLimits.resolve`); the Hub's errors become one
    :class:`HubError` (timm-remem's own errors, and errors that are not the Hub's, pass through).

    Example:
        >>> from huggingface_hub.errors import LocalTokenNotFoundError
        >>> with hub_errors("download", "alice/vit", None, "https://huggingface.co"):  # doctest: +ELLIPSIS
        ...     raise LocalTokenNotFoundError()
        Traceback (most recent call last):
        ...
        timm_remem.errors.HubError: cannot download 'alice/vit' on https://huggingface.co without a token: ...
    """
    with bounded(limits or HubLimits.resolve()) as operation:
        try:
            yield
        except RememError:
            raise
        except Exception as err:
            message = explain_hub_error(err, action, repo_id, revision, endpoint, pushing, operation)
            if message is None:
                raise
            raise HubError(message) from None


def explain_hub_error(err: BaseException, action: str, repo_id: str, revision: str | None, endpoint: str,
                      pushing: bool = False, operation: Operation | None = None) -> str | None:
    """What ``err`` means for someone trying to ``action`` (``"download"``, ``"push to"``) ``repo_id``, or ``None``
    when it is not the Hub's. ``pushing`` adds what became of the push; ``operation`` tells what the attempts met."""
    where = f"{repo_id!r} on {endpoint}"
    undone = (" The push did not complete; it is a single commit, so the repository shows the previous revision "
              "(or the complete new one if the Hub applied it just before the failure): run it again.") if pushing \
        else ""
    if find_in_chain(err, OfflineModeIsEnabled) and pushing:
        return f"cannot {action} {where}: offline mode is on (HF_HUB_OFFLINE=1); unset it to reach the Hub."
    if find_in_chain(err, LocalTokenNotFoundError):
        return f"cannot {action} {where} without a token: {TOKEN_HELP}."
    http = find_in_chain(err, HfHubHTTPError)
    status = getattr(getattr(http, "response", None), "status_code", None)
    server = (getattr(http, "server_message", None) or "").strip()
    server = f" (the Hub said: {server})" if server else ""
    if find_in_chain(err, RevisionNotFoundError):
        return (f"revision {revision or 'main'!r} does not exist in {where}: check the branch, tag or commit id "
                "(list them with huggingface_hub.HfApi().list_repo_refs).")
    if find_in_chain(err, RepositoryNotFoundError, GatedRepoError):
        return (f"repository {where} was not found, or it is private and "
                + ("no token was sent" if status == 401 else "your token cannot see it")
                + f": check the name; for a private repository {TOKEN_HELP} with access to it.")
    if find_in_chain(err, RemoteEntryNotFoundError):
        return (f"{where} has no {CONFIG_NAME}: it is not a timm model repository (publish teachers with "
                "timm_remem.push_to_hub).")
    if status == 401:
        return f"the Hub rejected the token (401 Unauthorized) for {where}: it is invalid, expired or revoked; " \
               f"{TOKEN_HELP} with a valid token.{server}"
    if status == 403:
        namespace = repo_id.split("/")[0]
        return (f"the Hub refused to let your token {action} {where} (403 Forbidden): it has no write access to the "
                f"namespace {namespace!r} (another user's namespace, or a token with the read role). Push to your own "
                f"namespace or an organisation where you may write, with a token that has the write role.{server}")
    misbehaving = _misbehaviour(err, operation)
    if misbehaving is not None:
        return f"cannot {action} {where}: {misbehaving}{undone}"
    if status is not None and status >= 500:
        return (f"the Hub answered {status} (a server error) when trying to {action} {where}{server}: the Hub "
                f"or the server at HF_ENDPOINT is failing; try again later.{undone}")
    if find_in_chain(err, LocalEntryNotFoundError):
        if constants.HF_HUB_OFFLINE:
            return (f"{repo_id!r} is not in the local Hub cache and offline mode is on (HF_HUB_OFFLINE=1): download "
                    "it once online (or point cache_dir at a cache that has it).")
        return (f"cannot reach the Hub at {endpoint} to download {repo_id!r}, and it is not in the local cache: "
                "check the network connection, HF_ENDPOINT and proxy settings, or set HF_HUB_OFFLINE=1 to use a "
                "cached copy.")
    if pushing and any("xet-write-token" in str(e) for e in _chain(err)):
        return (f"cannot {action} {where}: the server offers no Xet storage (its xet-write-token route answered "
                "404). For a Hub-compatible server without Xet, set HF_HUB_DISABLE_XET=1 in the environment before "
                "Python starts (huggingface_hub reads it at import) so that uploads use plain git-LFS.")
    network = find_in_chain(err, *NETWORK_ERRORS)
    if network is not None:
        return (f"cannot {action} {where}: the connection to the Hub failed ({type(network).__name__}: "
                f"{network}). Check the network connection, HF_ENDPOINT and proxy settings.{undone}")
    if http is not None and status is not None:
        return f"the Hub answered {status} when trying to {action} {where}{server}.{undone}"
    if any(isinstance(e, ValueError) and str(e).startswith(_OUTSIDE_CACHE) for e in _chain(err)):
        return (f"cannot {action} {where}: the server sent a commit id that would place files outside the Hub "
                "cache (huggingface_hub refused it; nothing was read). Point HF_ENDPOINT at a Hugging Face Hub you "
                "trust.")
    return None


# What huggingface_hub (2.x) says when the commit id a server sent would lead out of the cache's snapshots folder.
_OUTSIDE_CACHE = "Invalid pointer path"


_SLOW_HELP = (f"check the network, HF_ENDPOINT and proxy settings, or raise {ENV_TIMEOUT} (seconds, now {{t:g}}) "
              f"and {ENV_RETRY_BUDGET} on a slow link")


def _misbehaviour(err: BaseException, operation: Operation | None) -> str | None:
    """What a server that is not behaving like a Hub did (no answer, trickle, garbage, HTML, 5xx), or ``None``."""
    limits = operation.limits if operation is not None else HubLimits.resolve()
    last = operation.last_failure if operation is not None else None
    budget = find_in_chain(err, RetryBudgetExhausted)
    tried = f" ({operation.spent()})" if operation is not None and operation.failures > 1 else ""
    slow = _SLOW_HELP.format(t=limits.timeout)
    if find_in_chain(err, TrickleTimeout) or (budget and last == "trickle"):
        return (f"the server answers, but trickles its bytes (slower than {limits.min_speed:g} bytes/s, "
                f"{ENV_MIN_SPEED}){tried}: a broken proxy or server; {slow}.")
    if find_in_chain(err, NoAnswerTimeout) or (budget and last == "no answer"):
        return (f"the server accepted the connection but sent no answer within {limits.timeout:g} s ({ENV_TIMEOUT})"
                f"{tried}: it is hung or overloaded; {slow}.")
    if find_in_chain(err, httpx2.RemoteProtocolError) or (budget and last == "protocol"):
        return (f"the server's answer is not valid HTTP (garbage bytes){tried}: HF_ENDPOINT points at something "
                "that is not a web server (or a broken proxy is in between); check HF_ENDPOINT and proxy settings.")
    if budget and last == "connect":
        return (f"no connection to the server could be made{tried}: check the network connection, HF_ENDPOINT "
                "and proxy settings.")
    if budget and last is not None and last.startswith("status "):
        return (f"the server answered {operation.last_status} (a server error) to every attempt{tried}: the Hub or "
                "the server at HF_ENDPOINT is failing; try again later.")
    types_ = operation.content_types if operation is not None else []
    html = any("html" in t for t in types_)
    if find_in_chain(err, json.JSONDecodeError, FileMetadataError):
        if html:
            return ("the server answered an HTML page instead of the Hub's JSON API: HF_ENDPOINT points at a web "
                    "site, a captive portal or a proxy's error page, not at a Hugging Face Hub; check HF_ENDPOINT "
                    "and proxy settings.")
        return ("the server's answer is not what a Hugging Face Hub sends (unreadable JSON or missing Hub headers): "
                "HF_ENDPOINT does not point at a Hub-compatible server; check HF_ENDPOINT and proxy settings.")
    if budget:
        return f"the requests kept failing{tried}: check the network connection, HF_ENDPOINT and proxy settings."
    return None
