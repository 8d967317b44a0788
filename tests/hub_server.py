"""A Hugging Face Hub-compatible HTTP server for the test suite, plus the pytest fixtures that use it.

The server speaks the part of the Hub protocol that the real ``huggingface_hub`` client uses for model, dataset and
space repositories: accounts and tokens with ``read``/``write`` roles, repository creation and deletion, settings,
README metadata validation, repository info, trees, paths-info, branches and commits listing, pre-upload (``lfs`` or
``regular``), the git-LFS batch API (basic transfer with upload and verify actions), ndjson commits and
``resolve`` downloads with the headers the client checks (``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``,
``X-Linked-Size``, ``Range``). Errors carry ``X-Error-Code`` so the client raises its typed errors.

A commit is applied atomically: files uploaded through LFS are invisible until the commit that references them is
applied, and ``crash_on`` makes the server die on a chosen route (dropping every connection and refusing new ones)
to test that an interrupted upload leaves nothing published. ``restart`` brings it back with its state.
``lie`` makes ``resolve`` send hostile headers (an ``ETag``, ``X-Linked-Etag`` or commit id holding ``../``),
``delay`` slows every answer down and ``all_lfs`` makes pre-upload send every file through LFS.

The server uses the standard library only; the test helpers at the end patch huggingface_hub.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import json
import re
import secrets
import socket
import threading
import time
import traceback
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = [
    "HubServer",
    "HubHTTPError",
    "MisbehavingServer",
    "MISBEHAVIOURS",
    "ALICE",
    "BOB",
    "ORG",
    "ALICE_WRITE",
    "ALICE_READ",
    "BOB_WRITE",
    "use_hub",
    "serving",
    "no_retry_waits",
]

_LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub refuses regular (non-LFS) files above 10 MB
_GITATTRIBUTES = "\n".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text"
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.npz", "*.zip", "*.gz")
) + "\n"
_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_ID = r"(?P<ns>[^/]+)/(?P<name>[^/]+?)"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


class HubHTTPError(Exception):
    """Raised inside a handler to answer with an error status, message and optional ``X-Error-Code``."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass(frozen=True)
class _File:
    size: int
    oid: str  # git blob sha1 (of the LFS pointer for LFS files)
    data: bytes = b""  # content of a regular file
    sha256: str | None = None  # set for LFS files; their content lives in the repo's LFS store

    @property
    def etag(self) -> str:
        return self.sha256 or self.oid


@dataclass
class _Commit:
    id: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict[str, _File]


@dataclass
class _Repo:
    type: str
    id: str
    private: bool
    created_at: str
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)
    gated: bool | str = False

    @property
    def namespace(self) -> str:
        return self.id.split("/")[0]

    @property
    def url_id(self) -> str:
        return _URL_PREFIX[self.type] + self.id


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, hub: HubServer):
        self.hub = hub
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        if self.hub.running:  # connections dropped on purpose by a crash are not errors
            super().handle_error(request, client_address)

    def drop_connections(self) -> None:
        with self.connections_lock:
            for conn in list(self.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self.connections.clear()


class _Crash(Exception):
    """Unwinds a handler after the server was made to crash; no response is sent."""


class HubServer:
    """An in-memory Hugging Face Hub on ``127.0.0.1``, served from a background thread.

    Example:
        >>> server = HubServer().start()
        >>> server.add_user("alice"); server.add_token("hf_a", "alice", role="write")
        >>> server.endpoint.startswith("http://127.0.0.1:")
        True
        >>> server.stop()
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.users: dict[str, set[str]] = {}  # user name -> organisations
        self.tokens: dict[str, tuple[str, str]] = {}  # token -> (user, "read" | "write")
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request received
        self.lock = threading.RLock()
        self._tickets: dict[str, tuple[tuple[str, str], str, int]] = {}  # LFS upload URL -> (repo, oid, size)
        self._crash: tuple[str, re.Pattern, int | None] | None = None
        self._counter = itertools.count()
        self._httpd: _HTTPServer | None = None
        self._dying: threading.Thread | None = None  # closes the listening socket of a crashed server
        # A hostile server: headers that ``resolve`` sends instead of the true ones, for the files whose path
        # matches the key's pattern (e.g. {"config.json": {"ETag": '"../../../escaped"'}}); see ``lie``.
        self.lies: dict[str, dict[str, str]] = {}
        self.delay = 0.0  # seconds every answer waits (a slow but working Hub)
        self.all_lfs = False  # pre-upload answers "lfs" for every file (a server with unusual LFS rules)

    # ----------------------------------------------------------------------------------------------- lifecycle
    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> HubServer:
        """Start serving (on an ephemeral port the first time, on the same port after a crash or stop)."""
        if self._httpd is not None:
            return self
        if self._dying is not None:
            self._dying.join(timeout=5)
            self._dying = None
        self._httpd = _HTTPServer((self.host, self.port), _Handler, self)
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving: close the listening socket and every open connection. The state is kept."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
            httpd.drop_connections()
        if self._dying is not None:
            self._dying.join(timeout=5)
            self._dying = None

    def restart(self) -> HubServer:
        """Serve again on the same port with the same repositories, users and tokens."""
        self.stop()
        return self.start()

    def crash_on(self, method: str, path_pattern: str, *, after_bytes: int | None = None) -> None:
        """Make the server die on the next request matching ``method`` and the regex ``path_pattern``.

        The server reads the request body (only its first ``after_bytes`` bytes when given), then drops every
        connection without answering and stops listening, like a killed process. Nothing of that request is applied.
        """
        self._crash = (method.upper(), re.compile(path_pattern), after_bytes)

    def lie(self, path_pattern: str, **headers: str) -> None:
        """Make ``resolve`` answer ``headers`` (``ETag``, ``X_Linked_Etag``, ``X_Repo_Commit``: ``_`` for ``-``)
        instead of the true ones for the files matching the regex ``path_pattern``, like a hostile server would.

        The body is still the true content, so only what the client makes of the headers is tested.
        """
        self.lies[path_pattern] = {name.replace("_", "-"): value for name, value in headers.items()}

    def _die(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return

        def _shutdown() -> None:
            httpd.shutdown()
            httpd.server_close()

        dying = threading.Thread(target=_shutdown, daemon=True)
        dying.start()
        self._dying = dying  # set before any client can see the crash, so that restart() waits for the port
        httpd.drop_connections()

    # ---------------------------------------------------------------------------------------- accounts, data
    def add_user(self, name: str, orgs: tuple[str, ...] | list[str] = ()) -> None:
        self.users[name] = set(orgs)

    def add_token(self, token: str, user: str, role: str = "write") -> None:
        if role not in ("read", "write"):
            raise ValueError(f"role must be 'read' or 'write', got {role!r}")
        self.tokens[token] = (user, role)

    def repo(self, repo_id: str, repo_type: str = "model") -> _Repo:
        """The stored repository (raises KeyError when missing): for assertions in tests."""
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Path -> content of the files visible at ``revision``: for assertions in tests."""
        repo = self.repo(repo_id, repo_type)
        commit = repo.commits[repo.branches.get(revision, revision)]
        return {path: (repo.lfs[f.sha256] if f.sha256 else f.data) for path, f in commit.files.items()}

    def _new_commit(self, repo: _Repo, parent: str | None, files: dict[str, _File], title: str, message: str,
                    author: str) -> _Commit:
        digest = hashlib.sha1(
            json.dumps([repo.id, parent, sorted((p, f.oid) for p, f in files.items()), title, next(self._counter),
                        time.time()]).encode()
        ).hexdigest()
        commit = _Commit(digest, parent, title, message, author, _now(), files)
        repo.commits[digest] = commit
        return commit

    def _regular(self, data: bytes) -> _File:
        return _File(size=len(data), oid=_git_sha1(data), data=data)

    def _lfs_file(self, sha256: str, size: int) -> _File:
        return _File(size=size, oid=_git_sha1(_lfs_pointer(sha256, size)), sha256=sha256)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format, *args):  # keep test output clean
        pass

    # ------------------------------------------------------------------------------------------------ plumbing
    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query, keep_blank_values=True)
        self.route_path = split.path
        self._body = None  # one handler serves every request of a keep-alive connection
        self.hub.requests.append((method, split.path))
        try:
            crash = self.hub._crash
            if crash is not None and crash[0] == method and crash[1].search(split.path):
                self.hub._crash = None
                self._read_body(limit=crash[2])
                self.hub._die()
                raise _Crash
            self._read_body()  # always consume the body, so that an early error keeps the connection usable
            if self.hub.delay:
                time.sleep(self.hub.delay)
            for route_method, pattern, handler in _ROUTES:
                if route_method == method or (route_method == "GET" and method == "HEAD"):
                    match = pattern.fullmatch(split.path)
                    if match:
                        handler(self, **{k: v if v is None else unquote(v) for k, v in match.groupdict().items()})
                        return
            raise HubHTTPError(404, f"Sorry, we can't find the page you are looking for ({method} {split.path}).")
        except HubHTTPError as err:
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = err.message
            self._json({"error": err.message}, status=err.status, headers=headers)
        except _Crash:
            self.close_connection = True
        except Exception as err:  # a bug in this server: answer 500 (and print the traceback) rather than hang up
            traceback.print_exc()
            self._json({"error": f"Internal server error: {err!r}"}, status=500)

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _read_body(self, limit: int | None = None) -> bytes:
        if self._body is not None:
            return self._body
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
                if limit is not None and sum(map(len, parts)) >= limit:
                    break
            body = b"".join(parts)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length if limit is None else min(limit, length))
        self._body = body
        return body

    def _json_body(self) -> dict:
        raw = self._read_body()
        try:
            return json.loads(raw or b"{}")
        except json.JSONDecodeError:
            raise HubHTTPError(400, "Request body is not valid JSON.") from None

    def _send(self, status: int, body: bytes, headers: dict | None = None, content_type: str = "application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload, status: int = 200, headers: dict | None = None, content_type: str = "application/json"):
        self._send(status, json.dumps(payload).encode(), headers, content_type)

    # ---------------------------------------------------------------------------------------------------- auth
    def _user(self) -> tuple[str | None, str | None]:
        """(user, role) of the bearer token; (None, None) when anonymous; 401 for an unknown token."""
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None, None
        token = auth[7:] if auth.lower().startswith("bearer ") else auth
        if token not in self.hub.tokens:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        return self.hub.tokens[token]

    def _can_write_namespace(self, user: str | None, role: str | None, namespace: str) -> bool:
        return user is not None and role == "write" and (namespace == user or namespace in self.hub.users[user])

    def _readable(self, repo_type: str, repo_id: str) -> tuple[_Repo, str | None, str | None]:
        user, role = self._user()
        repo = self.hub.repos.get((repo_type, repo_id))
        member = user is not None and repo is not None and (
            repo.namespace == user or repo.namespace in self.hub.users[user]
        )
        if repo is None or (repo.private and not member):
            # Like the Hub: a private repository is indistinguishable from a missing one.
            raise HubHTTPError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo, user, role

    def _writable(self, repo_type: str, repo_id: str) -> tuple[_Repo, str]:
        repo, user, role = self._readable(repo_type, repo_id)
        if user is None:
            raise HubHTTPError(401, "You must be authenticated to write to this repository.")
        if role != "write":
            raise HubHTTPError(403, f"Your token has the read role: it cannot write to {repo_id}.")
        if not self._can_write_namespace(user, role, repo.namespace):
            raise HubHTTPError(403, f"You don't have the rights to write to {repo_id}.")
        return repo, user

    def _resolve(self, repo: _Repo, revision: str) -> _Commit:
        sha = repo.branches.get(revision, revision)
        if sha not in repo.commits:
            raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[sha]

    def _endpoint(self) -> str:
        return self.hub.endpoint

    # -------------------------------------------------------------------------------------------------- routes
    def whoami(self):
        user, role = self._user()
        if user is None:
            raise HubHTTPError(401, "Invalid credentials in Authorization header")
        self._json({
            "type": "user", "id": hashlib.md5(user.encode()).hexdigest()[:24], "name": user, "fullname": user,
            "email": None, "emailVerified": False, "isPro": False, "canPay": False, "avatarUrl": "",
            "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": "write"} for org in
                     sorted(self.hub.users[user])],
            "auth": {"type": "access_token", "accessToken": {"displayName": f"{user}-{role}", "role": role}},
        })

    def agent_harnesses(self):
        self._json({"standardEnvVars": [], "harnesses": {}})

    def validate_yaml(self):
        content = self._json_body().get("content", "")
        if content.startswith("---") and not re.search(r"^---\s*$", content[3:], re.MULTILINE):
            self._json({"errors": [{"message": "The YAML metadata block is not closed by a '---' line."}]},
                       status=400)
            return
        self._json({"errors": [], "warnings": []})

    def create_repo(self):
        body = self._json_body()
        user, role = self._user()
        repo_type = body.get("type") or "model"
        if repo_type not in _URL_PREFIX:
            raise HubHTTPError(400, f"Invalid repo type {repo_type!r}.")
        name = body.get("name") or ""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name) or "--" in name or ".." in name:
            raise HubHTTPError(400, f"Invalid repository name {name!r}.")
        if user is None:
            raise HubHTTPError(401, "You must be authenticated to create a repository.")
        namespace = body.get("organization") or user
        if not self._can_write_namespace(user, role, namespace):
            raise HubHTTPError(403, f"You don't have the rights to create a {repo_type} under the namespace "
                                    f'"{namespace}".')
        repo_id = f"{namespace}/{name}"
        with self.hub.lock:
            key = (repo_type, repo_id)
            url = f"{self._endpoint()}/{_URL_PREFIX[repo_type]}{repo_id}"
            if key in self.hub.repos:
                self._json({"error": f"You already created this {repo_type} repo", "url": url}, status=409)
                return
            private = body.get("private", body.get("visibility") == "private") or False
            repo = _Repo(repo_type, repo_id, bool(private), _now())
            commit = self.hub._new_commit(repo, None, {".gitattributes": self.hub._regular(_GITATTRIBUTES.encode())},
                                          "initial commit", "", user)
            repo.branches["main"] = commit.id
            self.hub.repos[key] = repo
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def delete_repo(self):
        body = self._json_body()
        repo_type = body.get("type") or "model"
        user, _ = self._user()
        repo_id = f"{body.get('organization') or user}/{body.get('name')}"
        self._writable(repo_type, repo_id)
        with self.hub.lock:
            del self.hub.repos[(repo_type, repo_id)]
        self._send(200, b"")

    def settings(self, kind, ns, name):
        repo, _ = self._writable(_REPO_TYPES[kind], f"{ns}/{name}")
        body = self._json_body()
        if "private" in body:
            repo.private = bool(body["private"])
        if "visibility" in body:
            repo.private = body["visibility"] == "private"
        if "gated" in body:
            repo.gated = body["gated"]
        self._json({})

    def info(self, kind, ns, name, rev=None):
        repo, _, _ = self._readable(_REPO_TYPES[kind], f"{ns}/{name}")
        commit = self._resolve(repo, rev or "main")
        with_blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path, f in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if with_blobs:
                sibling.update(size=f.size, blobId=f.oid)
                if f.sha256:
                    sibling["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": len(_lfs_pointer(f.sha256,
                                                                                                      f.size))}
            siblings.append(sibling)
        meta = _front_matter(commit.files["README.md"].data) if "README.md" in commit.files else {}
        self._json({
            "_id": hashlib.md5(repo.id.encode()).hexdigest()[:24], "id": repo.id, "modelId": repo.id,
            "author": repo.namespace, "sha": commit.id, "lastModified": commit.date, "createdAt": repo.created_at,
            "private": repo.private, "gated": repo.gated, "disabled": False, "downloads": 0, "likes": 0,
            "tags": meta.get("tags", []), "library_name": meta.get("library_name"),
            "pipeline_tag": meta.get("pipeline_tag"), "siblings": siblings,
        })

    def _entry(self, repo: _Repo, commit: _Commit, path: str, expand: bool) -> dict | None:
        entry: dict
        if path in commit.files:
            f = commit.files[path]
            entry = {"type": "file", "oid": f.oid, "size": f.size, "path": path}
            if f.sha256:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(_lfs_pointer(f.sha256, f.size))}
        elif path == "" or any(p.startswith(path.rstrip("/") + "/") for p in commit.files):
            entry = {"type": "directory", "oid": hashlib.sha1(f"{commit.id}:{path}".encode()).hexdigest(), "size": 0,
                     "path": path}
        else:
            return None
        if expand:
            entry["lastCommit"] = {"id": commit.id, "title": commit.title, "date": commit.date}
        return entry

    def tree(self, kind, ns, name, rest):  # ``rest`` is re-split raw: the revision is quoted, the path is not
        repo, _, _ = self._readable(_REPO_TYPES[kind], f"{ns}/{name}")
        raw_rev, _, raw_path = self.route_path.split("/tree/", 1)[1].partition("/")
        commit = self._resolve(repo, unquote(raw_rev))
        folder = unquote(raw_path).strip("/")
        if folder and self._entry(repo, commit, folder, False) is None:
            raise HubHTTPError(404, f"{folder} does not exist on {raw_rev}", "EntryNotFound")
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = self.query.get("expand", ["false"])[0].lower() in ("1", "true")
        prefix = folder + "/" if folder else ""
        paths: set[str] = set()
        for path in commit.files:
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts) + 1 if recursive else 2):
                paths.add(prefix + "/".join(parts[:depth]))
        self._json([self._entry(repo, commit, p, expand) for p in sorted(paths)])

    def paths_info(self, kind, ns, name, rev):
        repo, _, _ = self._readable(_REPO_TYPES[kind], f"{ns}/{name}")
        commit = self._resolve(repo, rev)
        raw = self._read_body()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            body = json.loads(raw or b"{}")
            paths, expand = body.get("paths", []), bool(body.get("expand"))
        else:
            form = parse_qs(raw.decode(), keep_blank_values=True)
            paths, expand = form.get("paths", []), form.get("expand", ["False"])[0].lower() in ("1", "true")
        entries = [self._entry(repo, commit, p.strip("/"), expand) for p in paths]
        self._json([e for e in entries if e is not None])

    def refs(self, kind, ns, name):
        repo, _, _ = self._readable(_REPO_TYPES[kind], f"{ns}/{name}")
        self._json({
            "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in repo.branches.items()],
            "converts": [], "tags": [], "pullRequests": [],
        })

    def commits(self, kind, ns, name, rev):
        repo, _, _ = self._readable(_REPO_TYPES[kind], f"{ns}/{name}")
        commit: _Commit | None = self._resolve(repo, rev)
        history = []
        while commit is not None:
            history.append({"id": commit.id, "title": commit.title, "message": commit.message,
                            "authors": [{"user": commit.author}], "date": commit.date})
            commit = repo.commits.get(commit.parent) if commit.parent else None
        self._json(history)

    def branch(self, kind, ns, name, branch):
        repo, user = self._writable(_REPO_TYPES[kind], f"{ns}/{name}")
        body = self._json_body()
        with self.hub.lock:
            if branch in repo.branches:
                raise HubHTTPError(409, f"Reference refs/heads/{branch} already exists")
            if body.get("emptyBranch"):
                commit = self.hub._new_commit(repo, None, {}, f"Create branch {branch}", "", user)
            else:
                commit = self._resolve(repo, body.get("startingPoint") or "main")
            repo.branches[branch] = commit.id
        self._json({})

    def preupload(self, kind, ns, name, rev):
        repo, _ = self._writable(_REPO_TYPES[kind], f"{ns}/{name}")
        commit = self._resolve(repo, rev)
        attributes = commit.files.get(".gitattributes")
        patterns = [line.split()[0] for line in (attributes.data.decode() if attributes else "").splitlines()
                    if "filter=lfs" in line]
        answers = []
        for item in self._json_body().get("files", []):
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample", ""))
            lfs = self.hub.all_lfs or size > _LFS_SIZE_THRESHOLD or b"\0" in sample or any(
                fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path.rsplit("/", 1)[-1], p) for p in patterns
            )
            existing = commit.files.get(path)
            oid = None if existing is None else (existing.sha256 or existing.oid)
            answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": oid})
        self._json({"files": answers, "commitOid": commit.id})

    def lfs_batch(self, prefix, ns, name):
        repo_type = _REPO_TYPES.get(prefix or "models", "model")
        repo, _ = self._writable(repo_type, f"{ns}/{name}")
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HubHTTPError(422, "Only the upload operation is supported by this server.")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj.get("oid"), obj.get("size")
            if not (isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid) and isinstance(size, int)):
                objects.append({"oid": str(oid), "size": int(size or 0),
                                "error": {"code": 422, "message": "Invalid object oid or size."}})
            elif oid in repo.lfs and len(repo.lfs[oid]) == size:
                objects.append({"oid": oid, "size": size})  # already stored: no action
            else:
                ticket = secrets.token_urlsafe(16)
                with self.hub.lock:
                    self.hub._tickets[ticket] = ((repo_type, repo.id), oid, size)
                objects.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                    "upload": {"href": f"{self._endpoint()}/__lfs_upload/{ticket}", "header": {}},
                    "verify": {"href": f"{self._endpoint()}/{repo.url_id}.git/info/lfs/objects/verify",
                               "header": {}},
                }})
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   content_type="application/vnd.git-lfs+json")

    def lfs_upload(self, ticket):
        with self.hub.lock:
            target = self.hub._tickets.pop(ticket, None)
        if target is None:
            raise HubHTTPError(403, "This upload URL is invalid or was already used.")
        key, oid, size = target
        data = self._read_body()
        if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
            raise HubHTTPError(400, f"Uploaded content does not match oid {oid} and size {size}.")
        with self.hub.lock:
            repo = self.hub.repos.get(key)
            if repo is not None:
                repo.lfs[oid] = data
        self._send(200, b"", {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def lfs_verify(self, prefix, ns, name):
        repo, _ = self._writable(_REPO_TYPES.get(prefix or "models", "model"), f"{ns}/{name}")
        body = self._json_body()
        data = repo.lfs.get(body.get("oid", ""))
        if data is None or len(data) != body.get("size"):
            raise HubHTTPError(404, f"Object {body.get('oid')} was not uploaded.")
        self._json({})

    def commit(self, kind, ns, name, rev):
        repo, user = self._writable(_REPO_TYPES[kind], f"{ns}/{name}")
        if self.query.get("create_pr"):
            raise HubHTTPError(501, "Pull requests are not supported by this test server.")
        lines = [json.loads(line) for line in self._read_body().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line.get("key") == "header"), None)
        if header is None or not header.get("summary"):
            raise HubHTTPError(400, "The commit has no header line with a summary.")
        with self.hub.lock:
            if rev not in repo.branches:
                raise HubHTTPError(404, f"Invalid rev id: {rev} (commits go to a branch)", "RevisionNotFound")
            head = repo.commits[repo.branches[rev]]
            parent = header.get("parentCommit")
            if parent is not None and parent != head.id:
                raise HubHTTPError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for line in lines:
                key, value = line.get("key"), line.get("value", {})
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HubHTTPError(400, f"Unsupported encoding {value.get('encoding')!r}.")
                    files[value["path"]] = self.hub._regular(base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    oid = value["oid"]
                    if oid not in repo.lfs:
                        raise HubHTTPError(422, f"Your push was rejected: the LFS object {oid} of "
                                                f"{value['path']} was never uploaded.")
                    files[value["path"]] = self.hub._lfs_file(oid, len(repo.lfs[oid]))
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubHTTPError(404, f"A file with this name doesn't exist: {value['path']}",
                                           "EntryNotFound")
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    for path in [p for p in files if p.startswith(folder)]:
                        del files[path]
                elif key != "header":
                    raise HubHTTPError(400, f"Unknown commit operation {key!r}.")
            commit = self.hub._new_commit(repo, head.id, files, header["summary"], header.get("description", ""),
                                          user)
            repo.branches[rev] = commit.id
        self._json({"success": True, "commitOid": commit.id, "pullRequestUrl": None, "hookOutput": "",
                    "commitUrl": f"{self._endpoint()}/{repo.url_id}/commit/{commit.id}"})

    def resolve(self, prefix, ns, name, rev, path):
        repo, _, _ = self._readable(_REPO_TYPES.get(prefix or "models", "model"), f"{ns}/{name}")
        commit = self._resolve(repo, rev)
        f = commit.files.get(path)
        lies = {k: v for pattern, told in self.hub.lies.items() if re.search(pattern, path) for k, v in told.items()}
        if f is None:
            raise HubHTTPError(404, f"Entry not found: {path}", "EntryNotFound",
                               {"X-Repo-Commit": commit.id, **{k: v for k, v in lies.items() if k == "X-Repo-Commit"}})
        data = repo.lfs[f.sha256] if f.sha256 else f.data
        headers = {"X-Repo-Commit": commit.id, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes",
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}"}
        if f.sha256:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
        headers.update(lies)
        status = 200
        range_header = self.headers.get("Range")
        if range_header:
            match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", range_header)
            start, end = (match.group(1), match.group(2)) if match else ("", "")
            if match and start:
                first, last = int(start), min(int(end) if end else len(data) - 1, len(data) - 1)
            elif match and end:
                first, last = max(len(data) - int(end), 0), len(data) - 1
            else:
                first, last = 1, 0
            if first > last or first >= len(data):
                headers["Content-Range"] = f"bytes */{len(data)}"
                self._send(416, b"", headers, "text/plain")
                return
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
            data, status = data[first:last + 1], 206
        self._send(status, data, headers, "application/octet-stream")


def _front_matter(readme: bytes) -> dict:
    """Top-level scalars and simple lists of a README's YAML metadata block (enough for info routes)."""
    text = readme.decode("utf-8", "replace")
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    meta: dict = {}
    current = None
    for line in (match.group(1) if match else "").splitlines():
        if re.match(r"^[A-Za-z_][\w-]*:", line):
            key, _, value = line.partition(":")
            value = value.strip().strip("'\"")
            meta[key], current = (value if value else []), key
        elif line.startswith("- ") and isinstance(meta.get(current), list):
            meta[current].append(line[2:].strip().strip("'\""))
    return meta


_K = r"(?P<kind>models|datasets|spaces)"
_P = r"(?:(?P<prefix>datasets|spaces)/)?"
_ROUTES = [
    ("GET", re.compile(r"/api/whoami-v2"), _Handler.whoami),
    ("GET", re.compile(r"/api/agent-harnesses"), _Handler.agent_harnesses),
    ("POST", re.compile(r"/api/validate-yaml"), _Handler.validate_yaml),
    ("POST", re.compile(r"/api/repos/create"), _Handler.create_repo),
    ("DELETE", re.compile(r"/api/repos/delete"), _Handler.delete_repo),
    ("PUT", re.compile(rf"/api/{_K}/{_ID}/settings"), _Handler.settings),
    ("GET", re.compile(rf"/api/{_K}/{_ID}(?:/revision/(?P<rev>[^/]+))?"), _Handler.info),
    ("GET", re.compile(rf"/api/{_K}/{_ID}/tree/(?P<rest>.+)"), _Handler.tree),
    ("POST", re.compile(rf"/api/{_K}/{_ID}/paths-info/(?P<rev>[^/]+)"), _Handler.paths_info),
    ("GET", re.compile(rf"/api/{_K}/{_ID}/refs"), _Handler.refs),
    ("GET", re.compile(rf"/api/{_K}/{_ID}/commits/(?P<rev>[^/]+)"), _Handler.commits),
    ("POST", re.compile(rf"/api/{_K}/{_ID}/branch/(?P<branch>[^/]+)"), _Handler.branch),
    ("POST", re.compile(rf"/api/{_K}/{_ID}/preupload/(?P<rev>[^/]+)"), _Handler.preupload),
    ("POST", re.compile(rf"/api/{_K}/{_ID}/commit/(?P<rev>[^/]+)"), _Handler.commit),
    ("POST", re.compile(rf"/{_P}{_ID}\.git/info/lfs/objects/batch"), _Handler.lfs_batch),
    ("POST", re.compile(rf"/{_P}{_ID}\.git/info/lfs/objects/verify"), _Handler.lfs_verify),
    ("PUT", re.compile(r"/__lfs_upload/(?P<ticket>[^/]+)"), _Handler.lfs_upload),
    ("GET", re.compile(rf"/{_P}{_ID}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), _Handler.resolve),
]

# ------------------------------------------------------------------------------------ a server that misbehaves
MISBEHAVIOURS = ("silent", "trickle", "html", "garbage", "5xx")


class MisbehavingServer:
    """A server on ``127.0.0.1`` that answers every request in one broken way, to test that nothing hangs.

    Modes: ``silent`` (accepts the connection, reads the request, never answers), ``trickle`` (starts a valid
    answer, then sends one byte of a header every ``interval`` seconds), ``html`` (a 200 HTML page, like a
    captive portal), ``garbage`` (bytes that are not HTTP, then hangs up) and ``5xx`` (``503 Service
    Unavailable``). Every loop ends when :meth:`stop` is called.

    Example:
        >>> with MisbehavingServer("5xx") as server:
        ...     server.endpoint.startswith("http://127.0.0.1:")
        True
    """

    def __init__(self, mode: str, interval: float = 0.05) -> None:
        if mode not in MISBEHAVIOURS:
            raise ValueError(f"mode must be one of {MISBEHAVIOURS}, got {mode!r}")
        self.mode, self.interval = mode, interval
        self.requests = 0
        self._stop = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self._threads: list[threading.Thread] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> MisbehavingServer:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(timeout=2)
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _read_request(self, conn: socket.socket) -> str | None:
        """Read one request's head and body; its method, or None when the client hung up or the server stops."""
        data = b""
        while b"\r\n\r\n" not in data:
            if self._stop.is_set():
                return None
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        missing = int(length.group(1)) - len(body) if length else 0
        while missing > 0 and not self._stop.is_set():
            try:
                chunk = conn.recv(min(missing, 65536))
            except TimeoutError:
                continue
            if not chunk:
                return None
            missing -= len(chunk)
        self.requests += 1
        return head.split(b" ", 1)[0].decode("ascii", "replace")

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.05)
        try:
            while method := self._read_request(conn):
                if self.mode == "silent":
                    self._stop.wait()
                elif self.mode == "trickle":
                    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Trickle: ")
                    while not self._stop.wait(self.interval):
                        conn.sendall(b"a")
                elif self.mode == "garbage":
                    conn.sendall(b"\x00\xff\x13\x37 this is not HTTP \x00\r\n\r\n")
                    return
                else:
                    status, kind, body = (("200 OK", "text/html; charset=utf-8",
                                           b"<!DOCTYPE html><html><body>Welcome to the hotel Wi-Fi</body></html>")
                                          if self.mode == "html" else
                                          ("503 Service Unavailable", "application/json",
                                           b'{"error": "Service Unavailable"}'))
                    conn.sendall(f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                                 f"\r\n".encode() + (b"" if method == "HEAD" else body))
        except OSError:
            pass
        finally:
            conn.close()


# --------------------------------------------------------------------------------------- accounts and fixtures
ALICE, BOB, ORG = "alice", "bob", "remem-lab"
ALICE_WRITE, ALICE_READ, BOB_WRITE = "hf_alice_write_token", "hf_alice_read_token", "hf_bob_write_token"


def use_hub(monkeypatch, endpoint: str, home) -> None:
    """Point huggingface_hub at ``endpoint`` with an empty cache and no token under ``home``, for one test.

    huggingface_hub reads its environment variables once, at import: setting them now has no effect, so the
    module-level values they produced are patched instead (and the variables too, for code that reads them).
    """
    from huggingface_hub import constants

    home = str(home)
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", home)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    values = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,  # a Hub-compatible server without Xet needs the plain LFS protocol
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": home,
        "HF_HUB_CACHE": f"{home}/hub",
        "HUGGINGFACE_HUB_CACHE": f"{home}/hub",
        "HF_ASSETS_CACHE": f"{home}/assets",
        "HF_XET_CACHE": f"{home}/xet",
        "HF_TOKEN_PATH": f"{home}/token",
        "HF_STORED_TOKENS_PATH": f"{home}/stored_tokens",
    }
    for name, value in values.items():
        monkeypatch.setattr(constants, name, value)


def no_retry_waits(monkeypatch) -> None:
    """huggingface_hub retries failed requests after waiting 1, 2, 4, 8 and 8 s: make those waits instant."""
    import huggingface_hub.utils._http as client_http

    monkeypatch.setattr(client_http, "time", types.SimpleNamespace(sleep=lambda seconds: None, time=time.time,
                                                                   monotonic=time.monotonic))


@contextmanager
def serving(home, monkeypatch) -> Iterator[HubServer]:
    """Run a fresh Hub server for one test, with the client pointed at it (cache and token isolated in ``home``).

    Accounts: ``alice`` (member of the ``remem-lab`` organisation; tokens ``ALICE_WRITE`` and ``ALICE_READ``) and
    ``bob`` (token ``BOB_WRITE``). Use it from a fixture::

        @pytest.fixture
        def hub(tmp_path, monkeypatch):
            with serving(tmp_path / "hf_home", monkeypatch) as server:
                yield server
    """
    server = HubServer()
    server.add_user(ALICE, orgs=[ORG])
    server.add_user(BOB)
    server.add_token(ALICE_WRITE, ALICE, "write")
    server.add_token(ALICE_READ, ALICE, "read")
    server.add_token(BOB_WRITE, BOB, "write")
    server.start()
    use_hub(monkeypatch, server.endpoint, home)
    try:
        yield server
    finally:
        server.stop()
