"""Bounded Hub traffic: every request timm-remem makes has a timeout, a minimum speed and a total retry budget.

huggingface_hub's shared client has no timeout and its retries cannot stop a server that trickles, so each
timm-remem operation runs its requests through a client of its own whose transport applies :class:`HubLimits`;
nothing changes for the rest of the process (see :func:`bounded` and docs/hub.md, 'Timeouts').

Example:
    >>> HubLimits.resolve(timeout=2.0)
    HubLimits(timeout=2.0, retry_budget=45.0, min_speed=1024.0)
    >>> HubLimits.resolve(retry_budget=-1)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    timm_remem.errors.ConfigError: retry_budget must be a finite number of seconds >= 0 ..., got -1.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpcore2
import httpx2
from huggingface_hub import __version__ as _HF_VERSION
from huggingface_hub import constants, get_session
from huggingface_hub.utils import _http as _hf_http  # the shared client's internals: see bounded()

from ..errors import ConfigError, HubError

__all__ = ["HubLimits", "ENV_TIMEOUT", "ENV_RETRY_BUDGET", "ENV_MIN_SPEED", "Operation", "bounded",
           "RetryBudgetExhausted", "TrickleTimeout", "NoAnswerTimeout", "ClosedWithoutAnswer", "RETRY_STATUSES"]

ENV_TIMEOUT = "TIMM_REMEM_HUB_TIMEOUT"
ENV_RETRY_BUDGET = "TIMM_REMEM_HUB_RETRY_BUDGET"
ENV_MIN_SPEED = "TIMM_REMEM_HUB_MIN_SPEED"
# The status codes huggingface_hub's http_backoff retries (a server that is down or overloaded), read from it.
RETRY_STATUSES: tuple[int, ...] = tuple(getattr(_hf_http, "_DEFAULT_RETRY_ON_STATUS_CODES",
                                                (408, 429, 500, 502, 503, 504)))


@dataclass(frozen=True)
class HubLimits:
    """Seconds without a byte before a request fails; seconds an operation keeps retrying after its first failure;
    bytes per second an answer must average after its first ``timeout`` seconds."""

    timeout: float = float(constants.DEFAULT_REQUEST_TIMEOUT)
    retry_budget: float = 45.0
    min_speed: float = 1024.0

    @classmethod
    def resolve(cls, timeout: float | None = None, retry_budget: float | None = None,
                min_speed: float | None = None) -> HubLimits:
        """The limits from the arguments, else the environment variables, else the defaults; checked."""
        values = {}
        for name, value, env, strict in (("timeout", timeout, ENV_TIMEOUT, True),
                                         ("retry_budget", retry_budget, ENV_RETRY_BUDGET, False),
                                         ("min_speed", min_speed, ENV_MIN_SPEED, False)):
            source = name
            if value is None and os.environ.get(env, "").strip():
                value, source = os.environ[env].strip(), f"the environment variable {env}"
                with contextlib.suppress(ValueError):
                    value = float(value)
            if value is None:
                continue
            unit = "bytes per second" if name == "min_speed" else "seconds"
            number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            if not number or (value <= 0 if strict else value < 0):
                raise ConfigError(f"{source} must be a finite number of {unit} "
                                  f"{'> 0' if strict else '>= 0'} (see docs/hub.md, 'Timeouts'), got {value!r}.")
            values[name] = float(value)
        return cls(**values)


class RetryBudgetExhausted(httpx2.TransportError):
    """The operation failed for longer than its retry budget (not retried by huggingface_hub's http_backoff)."""


class TrickleTimeout(httpcore2.ReadTimeout):
    """An answer that started but arrives slower than the minimum speed."""


class NoAnswerTimeout(httpcore2.ReadTimeout):
    """A request was sent and nothing at all came back within the timeout."""


class ClosedWithoutAnswer(httpcore2.ReadError):
    """The server closed the connection before sending a single byte of its answer (it died, or dropped us)."""


@dataclass
class Operation:
    """One timm-remem operation: its limits, its own bounded client, and what happened to its requests."""

    limits: HubLimits
    failing_since: float | None = None
    failures: int = 0
    last_failure: str | None = None  # "connect", "no answer", "trickle", "protocol", "status <code>"
    last_status: int | None = None
    content_types: list[str] = field(default_factory=list)  # of the answers received, the last few
    client: httpx2.Client | None = field(default=None, repr=False)  # made at the first request, closed at the end

    def failed(self, what: str, status: int | None = None) -> bool:
        """Record a failure; ``True`` when the retry budget is spent (the operation must stop now)."""
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
        self.failures += 1
        self.last_failure, self.last_status = what, status
        return now - self.failing_since >= self.limits.retry_budget

    def left(self) -> float | None:
        """Seconds of retry budget left (``None`` while nothing has failed)."""
        if self.failing_since is None:
            return None
        return self.failing_since + self.limits.retry_budget - time.monotonic()

    def spent(self) -> str:
        return (f"{self.failures} failed attempt{'s' if self.failures != 1 else ''} within the retry budget of "
                f"{self.limits.retry_budget:g} s ({ENV_RETRY_BUDGET})")

    def session(self) -> httpx2.Client:
        """huggingface_hub's default client (its request hook: offline mode, request ids), bounded."""
        if self.client is None:
            self.client = httpx2.Client(event_hooks={"request": [_hf_http.hf_request_event_hook]},
                                        follow_redirects=True, timeout=self.limits.timeout,
                                        transport=BoundedTransport(self))
        return self.client

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()


_OPERATION: contextvars.ContextVar[Operation | None] = contextvars.ContextVar("timm_remem_hub_operation",
                                                                              default=None)


@contextmanager
def bounded(limits: HubLimits) -> Iterator[Operation]:
    """Run the Hub calls of one operation under ``limits``; yields the :class:`Operation` record.

    huggingface_hub offers no per-call client, so while at least one operation runs (on any thread), its shared
    client slot holds a stand-in (:class:`_Session`) that hands the operation's thread the operation's own bounded
    client and every other thread the client of the user's own factory. When the last operation ends, the user's
    factory and client (never closed by us) are put back. Not guaranteed (see docs/hub.md, 'Timeouts'): the
    stand-in is not the user's client object; a factory the user sets meanwhile takes over at once; requests from
    huggingface_hub's own worker threads, and Xet transfers, are not bounded (downloads fetch one file per call and
    a push pre-uploads one file at a time to avoid those threads).
    """
    _start()
    operation = Operation(limits)
    token = _OPERATION.set(operation)
    try:
        yield operation
    finally:
        _OPERATION.reset(token)
        operation.close()
        _finish()


class _Installation:
    """The user's factory and client, kept while our operations run (see :func:`bounded`)."""

    def __init__(self) -> None:
        self.user_factory: Callable[[], httpx2.Client] = _hf_http._GLOBAL_CLIENT_FACTORY
        self.client: httpx2.Client | None = _hf_http._GLOBAL_CLIENT  # the user's live client, if made yet
        self.lock = threading.Lock()
        self.factory = functools.partial(_Session, self)  # what stands in for the user's factory meanwhile
        self.finished = False  # the user's factory and client are back in huggingface_hub's slots

    def user_client(self) -> Any:
        with self.lock:
            if not self.finished:
                if self.client is None:
                    self.client = self.user_factory()
                return self.client
        return get_session()  # a stand-in still held by a user's call after our last operation ended

    def close_user_client(self) -> None:
        with self.lock:
            client, self.client = self.client, None
        if client is not None:
            client.close()


class _Session:
    """What ``get_session()`` returns while an operation runs: the operation's client or the user's, by thread."""

    def __init__(self, installation: _Installation) -> None:
        self._installation = installation

    def _client(self) -> httpx2.Client:
        operation = _OPERATION.get()
        return operation.session() if operation is not None else self._installation.user_client()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client(), name)

    def close(self) -> None:  # huggingface_hub's close_session(): close the caller's client only
        operation = _OPERATION.get()
        if operation is not None:
            operation.close()
        else:
            self._installation.close_user_client()


_LOCK = threading.Lock()
_installation: _Installation | None = None
_running = 0  # operations in progress, on all threads
_NEEDED = ("_CLIENT_LOCK", "_GLOBAL_CLIENT_FACTORY", "_GLOBAL_CLIENT", "hf_request_event_hook")


def _start() -> None:
    global _installation, _running
    missing = [name for name in _NEEDED if not hasattr(_hf_http, name)]
    if missing:
        raise HubError(f"timm-remem cannot bound its Hub requests with huggingface_hub {_HF_VERSION}: its shared "
                       f"client works differently (no {', '.join(missing)} in huggingface_hub.utils._http); "
                       "install a huggingface_hub 2.x release that timm-remem supports (pip install "
                       "'huggingface_hub>=2,<3').")
    with _LOCK:
        if _running == 0:
            with _hf_http._CLIENT_LOCK:
                _installation = _Installation()
                _hf_http._GLOBAL_CLIENT_FACTORY = _installation.factory
                _hf_http._GLOBAL_CLIENT = _installation.factory()
        _running += 1


def _finish() -> None:
    global _installation, _running
    with _LOCK:
        _running -= 1
        if _running:
            return
        installation, _installation = _installation, None
        with _hf_http._CLIENT_LOCK, installation.lock:
            installation.finished = True
            client, installation.client = installation.client, None  # huggingface_hub's slot owns it again
            if _hf_http._GLOBAL_CLIENT_FACTORY is installation.factory:
                _hf_http._GLOBAL_CLIENT_FACTORY = installation.user_factory
                _hf_http._GLOBAL_CLIENT = client
                return
    if client is not None:  # the user set a factory meanwhile: their old client is unreachable now
        client.close()


# The transport: an httpcore2 connection pool whose sockets watch the speed of each answer.


class _WatchedStream(httpcore2.NetworkStream):
    """A socket stream that fails an answer that never starts, or that trickles."""

    def __init__(self, inner: httpcore2.NetworkStream, limits: HubLimits) -> None:
        self._inner, self._limits = inner, limits
        self._first_byte: float | None = None
        self._received = 0

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._first_byte, self._received = None, 0  # a new request: its answer is watched from scratch
        self._inner.write(buffer, timeout)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            data = self._inner.read(max_bytes, timeout)
        except httpcore2.ReadTimeout as err:
            if self._received == 0:
                raise NoAnswerTimeout(f"the server accepted the connection but sent no answer within "
                                      f"{timeout:g} s") from err
            raise
        if not data and self._received == 0:
            raise ClosedWithoutAnswer("the server closed the connection without answering")
        now = time.monotonic()
        if self._first_byte is None:
            self._first_byte = now
        self._received += len(data)
        limits = self._limits
        elapsed = now - self._first_byte
        if elapsed > limits.timeout and self._received < limits.min_speed * elapsed:
            raise TrickleTimeout(f"the server sent {self._received} bytes in {elapsed:.1f} s, below the minimum of "
                                 f"{limits.min_speed:g} bytes/s ({ENV_MIN_SPEED})")
        return data

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore2.NetworkStream:
        return _WatchedStream(self._inner.start_tls(ssl_context, server_hostname, timeout), self._limits)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _WatchedBackend(httpcore2.SyncBackend):
    def __init__(self, limits: HubLimits) -> None:
        self._limits = limits

    def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore2.NetworkStream:
        return _WatchedStream(super().connect_tcp(*args, **kwargs), self._limits)

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore2.NetworkStream:
        return _WatchedStream(super().connect_unix_socket(*args, **kwargs), self._limits)


# httpcore2's exceptions and the httpx2 ones of the same name that the client expects, most specific first.
_EXCEPTIONS = tuple((getattr(httpcore2, name), getattr(httpx2, name)) for name in (
    "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "ConnectError", "ReadError", "WriteError",
    "RemoteProtocolError", "LocalProtocolError", "UnsupportedProtocol", "ProxyError", "TimeoutException",
    "NetworkError", "ProtocolError"))


def _kind(err: BaseException) -> str:
    """What a failed request ran into, in words (the cause of the httpx2 error tells no answer from a trickle)."""
    cause = err.__cause__
    if isinstance(cause, TrickleTimeout):
        return "trickle"
    if isinstance(cause, NoAnswerTimeout):
        return "no answer"
    if isinstance(err, (httpx2.ConnectError, httpx2.ConnectTimeout)):
        return "connect"
    if isinstance(err, httpx2.ProtocolError):
        return "protocol"
    return "network"


@contextmanager
def _counted(operation: Operation) -> Iterator[None]:
    """Raise httpcore2's errors as httpx2's, each one a failure of ``operation`` (past its budget: the end)."""
    try:
        try:
            yield
        except tuple(core for core, _ in _EXCEPTIONS) as err:
            mapped = next(ours for core, ours in _EXCEPTIONS if isinstance(err, core))
            raise mapped(str(err)) from err
    except httpx2.TransportError as err:
        if operation.failed(_kind(err)):
            raise RetryBudgetExhausted(operation.spent()) from err
        raise


class _ResponseStream(httpx2.SyncByteStream):
    def __init__(self, inner: Any, operation: Operation) -> None:
        self._inner, self._operation = inner, operation

    def __iter__(self) -> Iterator[bytes]:
        with _counted(self._operation):
            yield from self._inner

    def close(self) -> None:
        if hasattr(self._inner, "close"):
            self._inner.close()


class BoundedTransport(httpx2.BaseTransport):
    """An httpx2 transport whose requests obey the :class:`HubLimits` of one :class:`Operation`."""

    def __init__(self, operation: Operation) -> None:
        self._operation = operation
        self._pool = httpcore2.ConnectionPool(ssl_context=httpx2.create_ssl_context(),
                                              network_backend=_WatchedBackend(operation.limits))

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        operation = self._operation
        timeout = operation.limits.timeout
        left = operation.left()
        if left is not None:
            if left <= 0:
                raise RetryBudgetExhausted(operation.spent())
            timeout = min(timeout, left)
        request.extensions["timeout"] = httpx2.Timeout(timeout).as_dict()
        core = httpcore2.Request(
            method=request.method,
            url=httpcore2.URL(scheme=request.url.raw_scheme, host=request.url.raw_host, port=request.url.port,
                              target=request.url.raw_path),
            headers=request.headers.raw, content=request.stream, extensions=request.extensions,
        )
        with _counted(operation):
            answer = self._pool.handle_request(core)
        response = httpx2.Response(status_code=answer.status, headers=answer.headers,
                                   stream=_ResponseStream(answer.stream, operation), extensions=answer.extensions)
        operation.content_types = [*operation.content_types[-3:], response.headers.get("content-type", "")]
        if answer.status in RETRY_STATUSES:
            if operation.failed(f"status {answer.status}", answer.status):
                response.close()
                raise RetryBudgetExhausted(operation.spent())
        elif answer.status < 500:
            operation.failing_since = None  # the server answers: a later failure gets a fresh budget
        return response

    def close(self) -> None:
        self._pool.close()
