"""A local Hugging Face Hub emulator that the real, unmodified ``huggingface_hub`` client can talk to.

Tests and the demo run against it instead of huggingface.co. It speaks the subset of the Hub's HTTP protocol that
``huggingface_hub`` 2.4.0 uses for repos, refs, uploads (preupload, LFS batch, NDJSON commit) and downloads
(revision, tree, resolve), with real git object hashing so commit ids and blob ids look like the Hub's.

Stdlib only on purpose: test fixtures import this module *before* setting ``HF_ENDPOINT``, and the client reads
that variable once, at import, so importing ``huggingface_hub`` here would pin the wrong endpoint.

Design notes:

* Two ports. The API port answers everything that carries a token; LFS bytes are served and received on a second
  "CDN" port through HMAC-signed URLs, as production does. The client follows a ``resolve`` redirect only when it
  stays on the same origin, so a second port is what makes it stop at the redirect and drop its token for the GET.
* LFS vs regular: a file is "lfs" when it matches an LFS pattern of the ``.gitattributes`` at that revision (every
  repo starts with the Hub's default one, in an initial commit, like a real repo) or is larger than 10 MiB;
  everything else, and every empty file, is "regular".
* LFS objects are scoped to a repo: an object uploaded to repo A is not usable by a commit to repo B until it is
  uploaded there too or duplicated server-side. That keeps the cross-repo copy test honest.
* ``xetHash``: the client's cross-repo ``CommitOperationCopy`` reads the source file's ``xetHash`` from
  ``paths-info`` and refuses to copy without one. Downloads go through ``tree`` + ``resolve`` and switch to Xet
  only when a tree entry or a ``resolve`` answer carries Xet data. So ``xetHash`` (a synthetic 64-hex id derived
  from the sha256) is sent by ``paths-info`` only, never by ``tree`` or ``resolve``, and the duplicate endpoint
  checks it against the sha256. Clients must still set ``HF_HUB_DISABLE_XET=1``, or uploads go to Xet.
* State: content-addressed objects under ``root/objects`` and one JSON document per repo under ``root/repos``,
  written atomically, so a new ``LocalHub`` on the same root sees the same repos.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: nothing but the stdlib is imported at run time
    from typing_extensions import Self
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = [
    "DEFAULT_TOKEN",
    "FAULT_KINDS",
    "LFS_SIZE_THRESHOLD",
    "OTHER_TOKEN",
    "ROUTES",
    "LocalHub",
    "RequestRecord",
    "User",
]

DEFAULT_TOKEN = "hf_user_token"
OTHER_TOKEN = "hf_other_token"

ROUTES: frozenset[str] = frozenset(
    {
        "whoami",
        "model-info",
        "revision",
        "tree",
        "paths-info",
        "resolve",
        "cdn",
        "preupload",
        "validate-yaml",
        "lfs-batch",
        "lfs-upload",
        "lfs-verify",
        "commit",
        "create-repo",
        "delete-repo",
        "refs",
        "commits",
        "branch",
        "tag",
        "lfs-duplicate",
        "agent-harnesses",
        "other",
    }
)
FAULT_KINDS: frozenset[str] = frozenset({"500", "503", "429", "drop", "slow"})

# The real Hub sends files above 10 MB to LFS even when no .gitattributes pattern matches.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
_SIGNED_URL_TTL_S = 3600
_REPO_TYPES = ("model", "dataset", "space")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_PR_REF = re.compile(r"^refs/pr/(\d+)$")

# The default .gitattributes of a new Hub repo (abridged): these patterns decide "lfs" vs "regular" on preupload.
# A word list, because as a literal the formatter would spread it over 36 lines.
_LFS_PATTERNS = tuple(
    """
    *.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gguf *.gz *.h5 *.joblib *.lfs.* *.mlmodel *.model *.msgpack *.npy *.npz
    *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors saved_model/**/* *.tar.* *.tar *.tflite
    *.tgz *.wasm *.xz *.zip *.zst *tfevents*
    """.split()  # noqa: SIM905
)
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in _LFS_PATTERNS)


@dataclass(frozen=True)
class User:
    """An account of the emulated Hub. Write access: the user's own namespace and those of its orgs."""

    name: str
    orgs: tuple[str, ...] = ()

    def can_write(self, namespace: str) -> bool:
        return namespace == self.name or namespace in self.orgs


def _default_users() -> dict[str, User]:
    return {DEFAULT_TOKEN: User("user", ("my-org",)), OTHER_TOKEN: User("other")}


@dataclass(frozen=True)
class RequestRecord:
    """One answered (or dropped: status 0) request, for assertions on traffic."""

    method: str
    path: str
    route: str
    status: int
    bytes_in: int
    bytes_out: int
    repo_id: str | None


@dataclass
class _Fault:
    route: str
    kind: str
    nth: int
    times: int
    delay: float
    retry_after: int
    seen: int = 0


# --------------------------------------------------------------------------------------------------------------
# Git object hashing


def git_blob_sha1(data: bytes) -> str:
    """The git blob id of `data`, which the Hub reports as the `oid` of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The LFS pointer text git stores in place of an LFS file; its blob id is the tree `oid` of that file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def xet_hash_for(sha256: str) -> str:
    """A stable synthetic Xet id for an LFS object: only the duplicate endpoint ever reads it back."""
    return hashlib.sha256(b"hubsync-localhub-xet:" + sha256.encode()).hexdigest()


@dataclass(frozen=True)
class _Entry:
    """A file in a commit's tree. `blob` is the git blob id (of the pointer text for LFS files)."""

    sha256: str
    size: int
    lfs: bool
    blob: str

    @classmethod
    def regular(cls, data: bytes) -> _Entry:
        return cls(hashlib.sha256(data).hexdigest(), len(data), False, git_blob_sha1(data))

    @classmethod
    def lfs_object(cls, sha256: str, size: int) -> _Entry:
        return cls(sha256, size, True, git_blob_sha1(lfs_pointer(sha256, size)))

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "size": self.size, "lfs": self.lfs, "blob": self.blob}


class _PathClash(ValueError):
    """A commit would make one path both a file and a folder, which git trees cannot hold."""


def _hash_tree(tree: dict[str, _Entry]) -> dict[str, str]:
    """Git tree ids of every directory of `tree` ("" is the root). Raises _PathClash on a file/folder clash."""
    root: dict[str, Any] = {}
    for path, entry in tree.items():
        node = root
        *dirs, leaf = path.split("/")
        for part in dirs:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise _PathClash(f"'{path}' needs a folder where a file exists")
            node = child
        if isinstance(node.get(leaf), dict):
            raise _PathClash(f"'{path}' is a file where a folder exists")
        node[leaf] = entry
    out: dict[str, str] = {}

    def visit(node: dict[str, Any], prefix: str) -> str:
        items: list[tuple[bytes, bytes]] = []
        for name, child in node.items():
            raw = name.encode()
            if isinstance(child, dict):
                sha = visit(child, f"{prefix}{name}/")
                # git orders a folder as if its name ended with "/"
                items.append((raw + b"/", b"40000 " + raw + b"\0" + bytes.fromhex(sha)))
            else:
                items.append((raw, b"100644 " + raw + b"\0" + bytes.fromhex(child.blob)))
        body = b"".join(record for _, record in sorted(items))
        sha = hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()
        out[prefix.rstrip("/")] = sha
        return sha

    visit(root, "")
    return out


def _iso(ts: float) -> str:
    # The client's date parser wants exactly this shape; "+00:00" raises.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


@dataclass
class _Commit:
    id: str
    tree: dict[str, _Entry]
    parents: list[str]
    title: str
    message: str
    author: str
    date: float

    @classmethod
    def create(
        cls, tree: dict[str, _Entry], parents: list[str], title: str, description: str, author: str
    ) -> _Commit:
        tree_id = _hash_tree(tree)[""]
        now = time.time()
        message = title + (f"\n\n{description}" if description else "")
        ident = f"{author} <{author}@users.noreply.localhub> {int(now)} +0000"
        lines = [
            f"tree {tree_id}",
            *(f"parent {p}" for p in parents),
            f"author {ident}",
            f"committer {ident}",
        ]
        body = ("\n".join(lines) + f"\n\n{message}\n").encode()
        sha = hashlib.sha1(b"commit %d\0" % len(body) + body).hexdigest()
        return cls(sha, dict(tree), list(parents), title, message, author, now)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tree": {p: e.to_json() for p, e in self.tree.items()},
            "parents": self.parents,
            "title": self.title,
            "message": self.message,
            "author": self.author,
            "date": self.date,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> _Commit:
        tree = {p: _Entry(**e) for p, e in d["tree"].items()}
        return cls(d["id"], tree, d["parents"], d["title"], d["message"], d["author"], d["date"])


@dataclass
class _Repo:
    type: str
    id: str
    private: bool
    created: float
    gated: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pulls: dict[int, str] = field(default_factory=dict)
    commits: dict[str, _Commit] = field(default_factory=dict)
    lfs_oids: set[str] = field(default_factory=set)

    @property
    def namespace(self) -> str:
        return self.id.split("/", 1)[0]

    @property
    def key(self) -> str:
        return f"{self.type}s/{self.id}"

    def resolve(self, rev: str) -> str | None:
        """The commit id that `rev` (branch, tag, refs/..., PR ref or full sha) points to, if any."""
        for prefix, refs in (("refs/heads/", self.branches), ("refs/tags/", self.tags)):
            if rev.startswith(prefix) and rev[len(prefix) :] in refs:
                return refs[rev[len(prefix) :]]
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        if (m := _PR_REF.match(rev)) and int(m[1]) in self.pulls:
            return self.pulls[int(m[1])]
        if _HEX40.match(rev) and rev in self.commits:
            return rev
        return None

    def history(self, head: str) -> list[_Commit]:
        """Ancestors of `head` (included), newest first."""
        seen: set[str] = set()
        stack = [head]
        out: list[_Commit] = []
        while stack:
            sha = stack.pop()
            if sha in seen or sha not in self.commits:
                continue
            seen.add(sha)
            out.append(self.commits[sha])
            stack.extend(self.commits[sha].parents)
        out.sort(key=lambda c: c.date, reverse=True)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "id": self.id,
            "private": self.private,
            "created": self.created,
            "gated": self.gated,
            "branches": self.branches,
            "tags": self.tags,
            "pulls": {str(n): sha for n, sha in self.pulls.items()},
            "commits": {sha: c.to_json() for sha, c in self.commits.items()},
            "lfs_oids": sorted(self.lfs_oids),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> _Repo:
        return cls(
            type=d["type"],
            id=d["id"],
            private=d["private"],
            created=d["created"],
            gated=d.get("gated", False),
            branches=dict(d["branches"]),
            tags=dict(d["tags"]),
            pulls={int(n): sha for n, sha in d["pulls"].items()},
            commits={sha: _Commit.from_json(c) for sha, c in d["commits"].items()},
            lfs_oids=set(d["lfs_oids"]),
        )


def _lfs_patterns(gitattributes: bytes | None) -> list[str]:
    if gitattributes is None:
        return []
    patterns = []
    for line in gitattributes.decode("utf-8", "replace").splitlines():
        tokens = line.split()
        if tokens and not tokens[0].startswith("#") and "filter=lfs" in tokens[1:]:
            patterns.append(tokens[0])
    return patterns


def _matches_lfs(path: str, patterns: list[str]) -> bool:
    name = path.rsplit("/", 1)[-1]
    for pattern in patterns:
        # gitattributes semantics: a pattern without "/" matches the file name at any depth
        if "/" in pattern.strip("/"):
            if fnmatch.fnmatchcase(path, pattern.lstrip("/")):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


# --------------------------------------------------------------------------------------------------------------
# README front matter: a YAML subset, enough for model-card metadata (no PyYAML: stdlib only)


def _yaml_scalar(text: str) -> Any:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [_yaml_scalar(part) for part in inner.split(",")] if inner else []
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text in ("", "~", "null", "Null", "NULL"):
        return None
    if text in ("true", "True", "TRUE"):
        return True
    if text in ("false", "False", "FALSE"):
        return False
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _yaml_block(lines: list[str], i: int, indent: int) -> tuple[Any, int]:
    if lines[i][indent:].startswith("-"):
        items: list[Any] = []
        while i < len(lines) and _indent(lines[i]) == indent and lines[i][indent:].startswith("-"):
            item = lines[i][indent + 1 :].strip()
            if not item:
                value, i = _yaml_block(lines, i + 1, _indent(lines[i + 1]))
            elif ":" in item and item[0] not in "'\"[":
                # "- key: value" opens a mapping whose keys sit two columns right of the dash
                lines[i] = " " * (indent + 2) + item
                value, i = _yaml_block(lines, i, indent + 2)
            else:
                value, i = _yaml_scalar(item), i + 1
            items.append(value)
        return items, i
    mapping: dict[str, Any] = {}
    while i < len(lines) and _indent(lines[i]) == indent and not lines[i][indent:].startswith("-"):
        key, sep, rest = lines[i].strip().partition(":")
        if not sep:
            raise ValueError(f"not a mapping line: {lines[i]!r}")
        key = key.strip().strip("'\"")
        i += 1
        if rest.strip():
            mapping[key] = _yaml_scalar(rest)
        elif i < len(lines) and (
            _indent(lines[i]) > indent or (_indent(lines[i]) == indent and lines[i][indent:].startswith("-"))
        ):
            mapping[key], i = _yaml_block(lines, i, _indent(lines[i]))
        else:
            mapping[key] = None
    return mapping, i


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def parse_card_data(readme: bytes) -> dict[str, Any] | None:
    """The YAML front matter of a README as a dict, or None when absent or beyond the supported subset."""
    text = readme.decode("utf-8", "replace")
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    try:
        end = next(n for n in range(1, len(lines)) if lines[n].strip() == "---")
        body = [ln for ln in lines[1:end] if ln.strip() and not ln.lstrip().startswith("#")]
        if not body:
            return {}
        value, consumed = _yaml_block(body, 0, _indent(body[0]))
    except (StopIteration, ValueError, IndexError):
        return None
    return value if isinstance(value, dict) and consumed == len(body) else None


# --------------------------------------------------------------------------------------------------------------
# HTTP plumbing


class _HttpError(Exception):
    def __init__(
        self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


class _Drop(Exception):
    """Close the connection without (finishing) an answer."""


@dataclass
class _Response:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: Path | None = None  # streamed from disk instead of `body`
    offset: int = 0
    length: int = 0

    @classmethod
    def json(cls, payload: Any, status: int = 200, content_type: str = "application/json") -> _Response:
        return cls(status, {"Content-Type": content_type}, json.dumps(payload).encode())


@dataclass
class _Route:
    name: str
    action: Callable[[_Request], _Response] | None = None
    repo_type: str | None = None
    repo_id: str | None = None
    args: tuple[str, ...] = ()


class _Request:
    """What an endpoint sees of one HTTP request."""

    def __init__(self, handler: _Handler, method: str, query: dict[str, list[str]], route: _Route) -> None:
        self.handler = handler
        self.method = method
        self.query = query
        self.route = route
        self.headers = handler.headers

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None

    def flag(self, name: str) -> bool:
        return (self.param(name) or "").lower() in ("1", "true")

    def iter_body(self) -> Iterator[bytes]:
        return self.handler.body_chunks()

    def body(self) -> bytes:
        return b"".join(self.handler.body_chunks())

    def json(self) -> Any:
        raw = self.body()
        try:
            return json.loads(raw) if raw.strip() else {}
        except ValueError as err:
            raise _HttpError(400, f"Invalid JSON body: {err}") from err

    @property
    def token(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        scheme, _, value = auth.partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], hub: LocalHub, is_cdn: bool) -> None:
        super().__init__(address, _Handler)
        self.hub = hub
        self.is_cdn = is_cdn
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    # Open keep-alive connections are tracked so that stop() really stops: otherwise a pooled client connection
    # would go on being served by its handler thread after the listening socket is closed.
    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._open_lock:
            open_now = list(self._open)
        for conn in open_now:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client pools connections
    timeout = 60  # idle keep-alive sockets eventually free their thread
    server: _Server
    _body_iter: Iterator[bytes] | None = None
    _bytes_in = 0
    _bytes_out = 0
    _record: RequestRecord | None = None
    _route: _Route
    _log_path = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log is `LocalHub.log`

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    # -- body -------------------------------------------------------------------------------------------------

    def body_chunks(self) -> Iterator[bytes]:
        # One generator per request, so a partly read body (a dropped upload) is never read twice.
        if self._body_iter is None:
            self._body_iter = self._read_body()
        return self._body_iter

    def _read_body(self) -> Iterator[bytes]:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                size = int(self.rfile.readline(1 << 16).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1 << 16) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                remaining = size
                while remaining:
                    data = self.rfile.read(min(remaining, 1 << 20))
                    if not data:
                        raise _Drop()
                    remaining -= len(data)
                    self._bytes_in += len(data)
                    yield data
                self.rfile.readline(1 << 16)
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                data = self.rfile.read(min(remaining, 1 << 20))
                if not data:
                    raise _Drop()
                remaining -= len(data)
                self._bytes_in += len(data)
                yield data

    def _has_body(self) -> bool:
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        return chunked or int(self.headers.get("Content-Length") or 0) > 0

    # -- serving ----------------------------------------------------------------------------------------------

    def _serve(self, method: str) -> None:
        hub = self.server.hub
        self._body_iter = None
        self._bytes_in = 0
        self._bytes_out = 0
        self._record = None
        split = urlsplit(self.path)
        parts = [unquote(p) for p in split.path.split("/")[1:]]
        route = hub._route(method, parts, self.server.is_cdn)
        self._route = route
        self._log_path = split.path
        req = _Request(self, method, parse_qs(split.query, keep_blank_values=True), route)
        try:
            fault = hub._take_fault(route.name)
            if fault is not None and fault.kind == "slow":
                time.sleep(fault.delay)
                fault = None
            if fault is not None and fault.kind != "drop":
                for _ in self.body_chunks():
                    pass
                headers = {"Retry-After": str(fault.retry_after)} if fault.kind == "429" else {}
                error = _HttpError(int(fault.kind), f"Injected {fault.kind} fault", None, headers)
                self._write(method, hub._error_response(error))
                return
            if fault is not None and self._has_body():
                # drop mid-upload: take about half of the payload, then hang up
                expected = int(self.headers.get("Content-Length") or 0)
                if expected:
                    self._bytes_in += len(self.rfile.read(max(expected // 2, 1)))
                else:
                    next(self.body_chunks(), None)  # chunked: one chunk is "mid-body" enough
                raise _Drop()
            if fault is not None and method == "HEAD":
                raise _Drop()
            try:
                if route.action is None:
                    raise _HttpError(404, f"Not found: {method} {split.path}")
                resp = route.action(req)
            except _HttpError as err:
                resp = hub._error_response(err)
            # an endpoint that answered early must not leave body bytes to be parsed as the next request
            for _ in self.body_chunks():
                pass
            self._write(method, resp, truncate=fault is not None)
        except _Drop:
            self._log(0, self._bytes_out)  # before hanging up: the client moves on only once it sees EOF
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        except (ConnectionError, TimeoutError):
            self._log(0, self._bytes_out)
            self.close_connection = True
        except Exception:  # noqa: BLE001 - a bug in the emulator: answer 500 with the traceback so tests show it
            message = traceback.format_exc()
            try:
                self._write(method, _Response(500, {"Content-Type": "text/plain"}, message.encode()))
            except OSError:
                self._log(0, self._bytes_out)
        finally:
            if self._record is None:
                self._log(0, self._bytes_out)

    def _log(self, status: int, bytes_out: int) -> None:
        """Record this request, or correct its record if one was written already."""
        route = self._route
        record = RequestRecord(
            self.command or "", self._log_path, route.name, status, self._bytes_in, bytes_out, route.repo_id
        )
        self.server.hub._record(record, replaces=self._record)
        self._record = record

    def _write(self, method: str, resp: _Response, truncate: bool = False) -> None:
        length = resp.length if resp.file is not None else len(resp.body)
        planned = 0 if method == "HEAD" else length // 2 if truncate else length
        if not truncate:
            # Logged before the first byte goes out: a client that has its answer must find it in the log.
            self._log(resp.status, planned)
        self.send_response(resp.status)
        for name, value in resp.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        try:
            if resp.file is not None:
                with open(resp.file, "rb") as fh:
                    fh.seek(resp.offset)
                    remaining = planned
                    while remaining > 0:
                        chunk = fh.read(min(remaining, 1 << 20))
                        if not chunk:
                            break
                        self.wfile.write(chunk)
                        self._bytes_out += len(chunk)
                        remaining -= len(chunk)
            elif planned:
                self.wfile.write(resp.body[:planned])
                self._bytes_out += planned
        except OSError:
            self._log(0, self._bytes_out)
            raise
        if truncate:
            self.wfile.flush()
            raise _Drop()


# --------------------------------------------------------------------------------------------------------------
# The emulator


class LocalHub:
    """A Hub on two loopback ports (API + CDN) with state under `root`. Use as a context manager or start/stop."""

    def __init__(
        self,
        root: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        cdn_port: int = 0,
        users: dict[str, User] | None = None,
    ) -> None:
        self.root = Path(root)
        self.users: dict[str, User] = dict(users) if users is not None else _default_users()
        self.log: list[RequestRecord] = []
        self._host = host
        self._port = port
        self._cdn_port = cdn_port
        self._lock = threading.RLock()  # guards repos, files under root/repos, faults and the log
        self._repos: dict[str, _Repo | None] = {}
        self._faults: list[_Fault] = []
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []
        self._tree_cache: dict[str, dict[str, str]] = {}
        self.endpoint = ""
        self.cdn_endpoint = ""
        for sub in ("objects", "repos", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        key_file = self.root / "signing.key"
        if not key_file.exists():
            self._write_atomic(key_file, secrets.token_hex(32).encode())
        # kept on disk so that signed URLs handed out before a restart stay valid after it
        self._secret = key_file.read_bytes()

    # -- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> Self:
        if self._servers:
            return self
        api = _Server((self._host, self._port), self, is_cdn=False)
        cdn = _Server((self._host, self._cdn_port), self, is_cdn=True)
        self._servers = [api, cdn]
        self.endpoint = f"http://{self._host}:{api.server_address[1]}"
        self.cdn_endpoint = f"http://{self._host}:{cdn.server_address[1]}"
        for server in self._servers:
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
            server.close_connections()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers, self._threads = [], []

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client_env(self, hf_home: Path, token: str | None = DEFAULT_TOKEN) -> dict[str, str]:
        """Environment for a client process: this endpoint, no Xet, no telemetry, an isolated cache."""
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_SYMLINKS_WARNING": "1",
            # explicit values, so that settings inherited from a developer's shell cannot leak in
            "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_ETAG_TIMEOUT": "5",
            "HF_HOME": str(hf_home),
            "HF_HUB_CACHE": str(Path(hf_home) / "hub"),
            # "" reads as "no token" in the client, and overrides a token inherited from the parent
            "HF_TOKEN": token or "",
        }

    # -- traffic log and faults -------------------------------------------------------------------------------

    def _record(self, record: RequestRecord, replaces: RequestRecord | None = None) -> None:
        with self._lock:
            if replaces is None:
                self.log.append(record)
                return
            # newest first: a correction is for a request that is still in flight; gone means the log was cleared
            for n in range(len(self.log) - 1, -1, -1):
                if self.log[n] is replaces:
                    self.log[n] = record
                    return

    def clear_log(self) -> None:
        with self._lock:
            self.log.clear()

    def bytes_received(self, route: str | None = None, repo_id: str | None = None) -> int:
        with self._lock:
            return sum(
                r.bytes_in
                for r in self.log
                if (route is None or r.route == route) and (repo_id is None or r.repo_id == repo_id)
            )

    def requests(self, route: str | None = None, repo_id: str | None = None) -> list[RequestRecord]:
        with self._lock:
            return [
                r
                for r in self.log
                if (route is None or r.route == route) and (repo_id is None or r.repo_id == repo_id)
            ]

    def inject_fault(
        self,
        route: str,
        *,
        kind: str,
        nth: int = 1,
        times: int = 1,
        delay: float = 0.0,
        retry_after: int = 1,
    ) -> None:
        """Fail the `nth` request of `route` from now on, and the `times - 1` after it.

        kind: "500" | "503" | "429" (with Retry-After) | "drop" (hang up; mid-body for payloads) | "slow" (sleep
        `delay`, then answer normally).
        """
        if route not in ROUTES:
            raise ValueError(f"Unknown route {route!r}; expected one of {sorted(ROUTES)}")
        if kind not in FAULT_KINDS:
            raise ValueError(f"Unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        if nth < 1 or times < 1:
            raise ValueError("nth and times count from 1")
        with self._lock:
            self._faults.append(_Fault(route, kind, nth, times, delay, retry_after))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, route: str) -> _Fault | None:
        with self._lock:
            hit: _Fault | None = None
            for fault in self._faults:
                if fault.route != route:
                    continue
                fault.seen += 1
                if hit is None and fault.nth <= fault.seen < fault.nth + fault.times:
                    hit = fault
            # a fault whose last firing has just happened is spent
            self._faults = [f for f in self._faults if f.seen < f.nth + f.times - 1]
            return hit

    # -- assertions helpers -----------------------------------------------------------------------------------

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return self._load(repo_type, repo_id) is not None

    def branch_head(self, repo_id: str, branch: str = "main", repo_type: str = "model") -> str | None:
        with self._lock:
            repo = self._load(repo_type, repo_id)
            return repo.resolve(branch) if repo is not None else None

    def list_files(
        self, repo_id: str, revision: str = "main", *, repo_type: str = "model", content: bool = True
    ) -> dict[str, bytes | int]:
        """Files at `revision`: path -> bytes (or size when content=False). Raises KeyError if unknown."""
        with self._lock:
            repo = self._load(repo_type, repo_id)
            sha = repo.resolve(revision) if repo is not None else None
            if repo is None or sha is None:
                raise KeyError(f"{repo_type} {repo_id}@{revision} does not exist")
            tree = dict(repo.commits[sha].tree)
        return {p: (self._object_path(e.sha256).read_bytes() if content else e.size) for p, e in tree.items()}

    def commit_count(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> int:
        """Commits reachable from `revision`, the repo's initial commit included."""
        with self._lock:
            repo = self._load(repo_type, repo_id)
            sha = repo.resolve(revision) if repo is not None else None
            if repo is None or sha is None:
                raise KeyError(f"{repo_type} {repo_id}@{revision} does not exist")
            return len(repo.history(sha))

    def set_gated(self, repo_id: str, gated: bool = True, *, repo_type: str = "model") -> None:
        """A gated repo answers 403 GatedRepo on resolve/tree to everyone but its namespace's members."""
        self._update_flag(repo_type, repo_id, gated=gated)

    def set_private(self, repo_id: str, private: bool = True, *, repo_type: str = "model") -> None:
        self._update_flag(repo_type, repo_id, private=private)

    def _update_flag(self, repo_type: str, repo_id: str, **flags: bool) -> None:
        with self._lock:
            repo = self._load(repo_type, repo_id)
            if repo is None:
                raise KeyError(f"{repo_type} {repo_id} does not exist")
            for name, value in flags.items():
                setattr(repo, name, value)
            self._save(repo)

    # -- storage ----------------------------------------------------------------------------------------------

    def _object_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256[:2] / sha256[2:]

    def _has_object(self, sha256: str) -> bool:
        return self._object_path(sha256).is_file()

    def _store_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if not self._has_object(sha):
            self._write_atomic(self._object_path(sha), data)
        return sha

    def _write_atomic(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp" if (self.root / "tmp").is_dir() else path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _repo_file(self, repo_type: str, repo_id: str) -> Path:
        return self.root / "repos" / f"{repo_type}s" / f"{repo_id}.json"

    def _load(self, repo_type: str, repo_id: str) -> _Repo | None:
        key = f"{repo_type}s/{repo_id}"
        if key not in self._repos:
            path = self._repo_file(repo_type, repo_id)
            self._repos[key] = _Repo.from_json(json.loads(path.read_text())) if path.is_file() else None
        return self._repos[key]

    def _save(self, repo: _Repo) -> None:
        self._write_atomic(self._repo_file(repo.type, repo.id), json.dumps(repo.to_json()).encode())
        self._repos[repo.key] = repo

    def _tree_ids(self, commit: _Commit) -> dict[str, str]:
        if commit.id not in self._tree_cache:
            self._tree_cache[commit.id] = _hash_tree(commit.tree)
        return self._tree_cache[commit.id]

    # -- routing ----------------------------------------------------------------------------------------------

    def _route(self, method: str, parts: list[str], is_cdn: bool) -> _Route:
        if is_cdn:
            if method in ("GET", "HEAD") and len(parts) == 5 and parts[0] == "lfs":
                return self._repo_route("cdn", self._cdn_get, parts[1], parts[2], parts[3], parts[4:])
            if method == "PUT" and len(parts) == 5 and parts[0] == "lfs-upload":
                return self._repo_route("lfs-upload", self._lfs_put, parts[1], parts[2], parts[3], parts[4:])
            return _Route("other")
        if parts[:1] == ["api"]:
            return self._api_route(method, parts[1:])
        prefix = "models"
        if parts[:1] in (["datasets"], ["spaces"]):
            prefix, parts = parts[0], parts[1:]
        if len(parts) == 6 and parts[1].endswith(".git") and parts[2:5] == ["info", "lfs", "objects"]:
            name = parts[1][: -len(".git")]
            if parts[5] == "batch" and method == "POST":
                return self._repo_route("lfs-batch", self._lfs_batch, prefix, parts[0], name, [])
            if parts[5] == "verify" and method == "POST":
                return self._repo_route("lfs-verify", self._lfs_verify, prefix, parts[0], name, [])
        if len(parts) >= 5 and parts[2] == "resolve" and method in ("GET", "HEAD"):
            return self._repo_route(
                "resolve", self._resolve, prefix, parts[0], parts[1], [parts[3], "/".join(parts[4:])]
            )
        return _Route("other")

    def _api_route(self, method: str, parts: list[str]) -> _Route:
        simple: dict[tuple[str, ...], tuple[str, str, Callable[[_Request], _Response]]] = {
            ("whoami-v2",): ("GET", "whoami", self._whoami),
            ("agent-harnesses",): ("GET", "agent-harnesses", self._agent_harnesses),
            ("validate-yaml",): ("POST", "validate-yaml", self._validate_yaml),
            ("repos", "create"): ("POST", "create-repo", self._create_repo),
            ("repos", "delete"): ("DELETE", "delete-repo", self._delete_repo),
        }
        if tuple(parts) in simple:
            want, name, action = simple[tuple(parts)]
            return _Route(name, action if method == want else None)
        if len(parts) < 3 or parts[0] not in ("models", "datasets", "spaces"):
            return _Route("other")
        prefix, ns, name, rest = parts[0], parts[1], parts[2], parts[3:]
        verb = rest[0] if rest else ""
        args = ["/".join(rest[1:])]
        table: dict[tuple[str, str], tuple[str, Callable[[_Request], _Response]]] = {
            ("GET", ""): ("model-info", self._repo_info),
            ("GET", "revision"): ("revision", self._repo_info),
            ("GET", "tree"): ("tree", self._tree),
            ("POST", "paths-info"): ("paths-info", self._paths_info),
            ("POST", "preupload"): ("preupload", self._preupload),
            ("POST", "commit"): ("commit", self._commit),
            ("GET", "refs"): ("refs", self._refs),
            ("GET", "commits"): ("commits", self._commits),
            ("POST", "branch"): ("branch", self._create_branch),
            ("DELETE", "branch"): ("branch", self._delete_branch),
            ("POST", "tag"): ("tag", self._create_tag),
            ("DELETE", "tag"): ("tag", self._delete_tag),
        }
        if verb == "tree":
            args = [rest[1] if len(rest) > 1 else "main", "/".join(rest[2:])]
        if verb == "lfs-files" and rest[1:] == ["duplicate"] and method == "POST":
            return self._repo_route("lfs-duplicate", self._lfs_duplicate, prefix, ns, name, [])
        if (method, verb) in table:
            route_name, action = table[(method, verb)]
            return self._repo_route(route_name, action, prefix, ns, name, args)
        return _Route("other", None, prefix[:-1], f"{ns}/{name}")

    @staticmethod
    def _repo_route(
        name: str, action: Callable[[_Request], _Response], prefix: str, ns: str, repo: str, args: list[str]
    ) -> _Route:
        repo_type = prefix[:-1] if prefix in ("models", "datasets", "spaces") else "model"
        return _Route(name, action, repo_type, f"{ns}/{repo}", tuple(args))

    # -- auth -------------------------------------------------------------------------------------------------

    def _user(self, req: _Request) -> User | None:
        token = req.token
        if token is None:
            return None
        if token not in self.users:
            raise _HttpError(401, "Invalid credentials in Authorization header")
        return self.users[token]

    def _readable(self, req: _Request, repo_type: str | None = None, repo_id: str | None = None) -> _Repo:
        """The repo, or the error the Hub gives: missing and private-to-others look alike (RepoNotFound)."""
        user = self._user(req)
        repo_type = repo_type or req.route.repo_type or "model"
        repo_id = repo_id or req.route.repo_id or ""
        repo = self._load(repo_type, repo_id)
        if repo is None or (repo.private and (user is None or not user.can_write(repo.namespace))):
            # anonymous callers get 401 like the real Hub; the client maps it by X-Error-Code
            raise _HttpError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _check_gate(self, req: _Request, repo: _Repo) -> None:
        user = self._user(req)
        if repo.gated and (user is None or not user.can_write(repo.namespace)):
            raise _HttpError(
                401 if user is None else 403,
                f"Access to model {repo.id} is restricted. You must have access to it and be authenticated.",
                "GatedRepo",
            )

    def _writable(self, req: _Request, repo_type: str | None = None, repo_id: str | None = None) -> _Repo:
        user = self._user(req)
        if user is None:
            raise _HttpError(401, "You must be authenticated to write to a repo")
        repo = self._readable(req, repo_type, repo_id)
        if not user.can_write(repo.namespace):
            raise _HttpError(403, f"You don't have the rights to write to {repo.type} {repo.id}")
        return repo

    def _revision(self, repo: _Repo, rev: str) -> str:
        sha = repo.resolve(rev)
        if sha is None:
            raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return sha

    def _error_response(self, err: _HttpError) -> _Response:
        resp = _Response.json({"error": err.message}, err.status)
        resp.headers["X-Error-Message"] = err.message.encode("latin-1", "replace").decode("latin-1")
        if err.code:
            resp.headers["X-Error-Code"] = err.code
        resp.headers.update(err.headers)
        return resp

    def _sign(self, *fields: str) -> str:
        return hmac.new(self._secret, "\n".join(fields).encode(), hashlib.sha256).hexdigest()

    def _check_signature(self, req: _Request, *fields: str) -> None:
        expires = req.param("expires") or "0"
        sig = req.param("sig") or ""
        if not expires.isdigit() or int(expires) < time.time():
            raise _HttpError(403, "Signed URL expired")
        if not hmac.compare_digest(sig, self._sign(*fields, expires)):
            raise _HttpError(403, "Bad signature")

    def _repo_url(self, repo: _Repo) -> str:
        prefix = "" if repo.type == "model" else f"{repo.type}s/"
        return f"{self.endpoint}/{prefix}{repo.id}"

    # -- account endpoints ------------------------------------------------------------------------------------

    def _whoami(self, req: _Request) -> _Response:
        user = self._user(req)
        if user is None:
            raise _HttpError(401, "Invalid credentials in Authorization header")
        return _Response.json(
            {
                "type": "user",
                "id": hashlib.sha1(user.name.encode()).hexdigest()[:24],
                "name": user.name,
                "fullname": user.name.title(),
                "email": f"{user.name}@localhub.invalid",
                "emailVerified": True,
                "isPro": False,
                "orgs": [
                    {"type": "org", "name": org, "fullname": org, "roleInOrg": "write"} for org in user.orgs
                ],
                "auth": {"type": "access_token", "accessToken": {"displayName": "localhub", "role": "write"}},
            }
        )

    def _agent_harnesses(self, req: _Request) -> _Response:
        return _Response.json({"standardEnvVars": [], "harnesses": {}})

    def _validate_yaml(self, req: _Request) -> _Response:
        req.body()
        return _Response.json({"errors": [], "warnings": []})

    # -- repo lifecycle ---------------------------------------------------------------------------------------

    def _create_repo(self, req: _Request) -> _Response:
        user = self._user(req)
        if user is None:
            raise _HttpError(401, "You must be authenticated to create a repo")
        payload = req.json()
        name = str(payload.get("name") or "")
        namespace = str(payload.get("organization") or user.name)
        repo_type = str(payload.get("type") or "model")
        if repo_type not in _REPO_TYPES or not _NAME.match(name) or not _NAME.match(namespace):
            raise _HttpError(400, f"Invalid repo name or type: {namespace}/{name} ({repo_type})")
        req.route.repo_id = f"{namespace}/{name}"
        if not user.can_write(namespace):
            raise _HttpError(
                403, f"You don't have the rights to create a repo under the namespace '{namespace}'"
            )
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        with self._lock:
            existing = self._load(repo_type, f"{namespace}/{name}")
            if existing is not None:
                resp = self._error_response(_HttpError(409, f"You already created this {repo_type} repo"))
                resp.body = json.dumps(
                    {"error": f"You already created this {repo_type} repo", "url": self._repo_url(existing)}
                ).encode()
                return resp
            repo = _Repo(repo_type, f"{namespace}/{name}", private, time.time())
            # like the real Hub, a new repo has one commit holding the default .gitattributes
            data = DEFAULT_GITATTRIBUTES.encode()
            self._store_bytes(data)
            first = _Commit.create(
                {".gitattributes": _Entry.regular(data)}, [], "initial commit", "", user.name
            )
            repo.commits[first.id] = first
            repo.branches["main"] = first.id
            self._save(repo)
        return _Response.json({"url": self._repo_url(repo), "name": repo.id, "id": repo.id})

    def _delete_repo(self, req: _Request) -> _Response:
        user = self._user(req)
        if user is None:
            raise _HttpError(401, "You must be authenticated to delete a repo")
        payload = req.json()
        repo_type = str(payload.get("type") or "model")
        repo_id = f"{payload.get('organization') or user.name}/{payload.get('name')}"
        req.route.repo_id = repo_id
        with self._lock:
            repo = self._writable(req, repo_type, repo_id)
            self._repo_file(repo.type, repo.id).unlink()
            self._repos[repo.key] = None
        return _Response.json({})

    # -- read endpoints ---------------------------------------------------------------------------------------

    def _repo_info(self, req: _Request) -> _Response:
        with self._lock:
            repo = self._readable(req)
            rev = req.route.args[0] if req.route.name == "revision" else "main"
            sha = self._revision(repo, rev)
            commit = repo.commits[sha]
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.key.encode()).hexdigest()[:24],
            "id": repo.id,
            "author": repo.namespace,
            "sha": sha,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.created),
            "private": repo.private,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
        }
        if repo.type == "model":
            info["modelId"] = repo.id
        blobs = req.flag("blobs")
        siblings = []
        for path, entry in sorted(commit.tree.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.blob)
                if entry.lfs:
                    sibling["lfs"] = {
                        "size": entry.size,
                        "sha256": entry.sha256,
                        "pointerSize": len(lfs_pointer(entry.sha256, entry.size)),
                    }
            siblings.append(sibling)
        info["siblings"] = siblings
        readme = commit.tree.get("README.md")
        if readme is not None and not readme.lfs:
            card = parse_card_data(self._object_path(readme.sha256).read_bytes())
            if card is not None:
                info["cardData"] = card
                for key in ("library_name", "pipeline_tag"):
                    if isinstance(card.get(key), str):
                        info[key] = card[key]
                if isinstance(card.get("tags"), list):
                    info["tags"] = [str(t) for t in card["tags"]]
        return _Response.json(info)

    def _tree_entry(self, path: str, entry: _Entry, with_xet: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "file", "oid": entry.blob, "size": entry.size, "path": path}
        if entry.lfs:
            out["lfs"] = {
                "oid": entry.sha256,
                "size": entry.size,
                "pointerSize": len(lfs_pointer(entry.sha256, entry.size)),
            }
            if with_xet:
                out["xetHash"] = xet_hash_for(entry.sha256)
        return out

    def _tree(self, req: _Request) -> _Response:
        rev, base = req.route.args
        base = base.strip("/")
        recursive = req.flag("recursive")
        with self._lock:
            repo = self._readable(req)
            self._check_gate(req, repo)
            commit = repo.commits[self._revision(repo, rev)]
            tree_ids = self._tree_ids(commit)
        if base and base not in tree_ids:
            raise _HttpError(
                404, f"{base} does not exist on {rev}", "EntryNotFound", {"X-Repo-Commit": commit.id}
            )
        prefix = f"{base}/" if base else ""
        entries: list[dict[str, Any]] = []
        for dir_path, tree_id in tree_ids.items():
            inside = dir_path.startswith(prefix) and dir_path != base
            if inside and (recursive or "/" not in dir_path[len(prefix) :]):
                entries.append({"type": "directory", "oid": tree_id, "size": 0, "path": dir_path})
        for path, entry in commit.tree.items():
            if path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :]):
                entries.append(self._tree_entry(path, entry))
        entries.sort(key=lambda e: e["path"])
        return _Response.json(entries)

    def _paths_info(self, req: _Request) -> _Response:
        rev = req.route.args[0]
        raw = req.body()
        if "json" in (req.headers.get("Content-Type") or ""):
            paths = [str(p) for p in (json.loads(raw or b"{}").get("paths") or [])]
        else:
            paths = parse_qs(raw.decode(), keep_blank_values=True).get("paths", [])
        with self._lock:
            repo = self._readable(req)
            commit = repo.commits[self._revision(repo, rev)]
            tree_ids = self._tree_ids(commit)
        out = []
        for path in paths:
            path = path.strip("/")
            if path in commit.tree:
                # xetHash here only: the cross-repo copy needs it, downloads never read paths-info
                out.append(self._tree_entry(path, commit.tree[path], with_xet=True))
            elif path in tree_ids:
                out.append({"type": "directory", "oid": tree_ids[path], "size": 0, "path": path})
        return _Response.json(out)

    def _refs(self, req: _Request) -> _Response:
        with self._lock:
            repo = self._readable(req)
            branches = [
                {"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in repo.branches.items()
            ]
            tags = [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": s} for t, s in repo.tags.items()]
            pulls = [
                {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": s}
                for n, s in sorted(repo.pulls.items())
            ]
        return _Response.json({"branches": branches, "converts": [], "tags": tags, "pullRequests": pulls})

    def _commits(self, req: _Request) -> _Response:
        with self._lock:
            repo = self._readable(req)
            history = repo.history(self._revision(repo, req.route.args[0] or "main"))
        return _Response.json(
            [
                {
                    "id": c.id,
                    "title": c.title,
                    "message": c.message,
                    "date": _iso(c.date),
                    "authors": [{"user": c.author}],
                }
                for c in history
            ]
        )

    def _resolve(self, req: _Request) -> _Response:
        rev, path = req.route.args
        with self._lock:
            repo = self._readable(req)
            self._check_gate(req, repo)
            sha = self._revision(repo, rev)
            entry = repo.commits[sha].tree.get(path)
        if entry is None:
            raise _HttpError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "Accept-Ranges": "bytes"}
        if entry.lfs:
            expires = str(int(time.time()) + _SIGNED_URL_TTL_S)
            sig = self._sign("GET", repo.key, entry.sha256, expires)
            filename = quote(path.rsplit("/", 1)[-1])
            location = (
                f"{self.cdn_endpoint}/lfs/{repo.type}s/{repo.id}/{entry.sha256}"
                f"?expires={expires}&sig={sig}&filename={filename}"
            )
            headers.update(
                {
                    "Location": location,
                    "ETag": f'"{entry.blob}"',
                    "X-Linked-Etag": f'"{entry.sha256}"',
                    "X-Linked-Size": str(entry.size),
                }
            )
            return _Response(302, headers)
        headers["ETag"] = f'"{entry.blob}"'
        return self._ranged(req, entry, headers)

    def _ranged(self, req: _Request, entry: _Entry, headers: dict[str, str]) -> _Response:
        headers.setdefault("Content-Type", "application/octet-stream")
        size = entry.size
        spec = req.headers.get("Range")
        resp = _Response(200, headers, file=self._object_path(entry.sha256), offset=0, length=size)
        if not spec:
            return resp
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", spec.strip())
        if m is None or (not m[1] and not m[2]):
            raise _HttpError(416, f"Unsupported range {spec}", headers={"Content-Range": f"bytes */{size}"})
        if m[1]:
            start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
        else:  # suffix range: the last N bytes
            start, end = max(size - int(m[2]), 0), size - 1
        if start >= size or start > end:
            raise _HttpError(
                416, f"Range {spec} not satisfiable", headers={"Content-Range": f"bytes */{size}"}
            )
        resp.status, resp.offset, resp.length = 206, start, end - start + 1
        resp.headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return resp

    def _cdn_get(self, req: _Request) -> _Response:
        sha256 = req.route.args[0]
        repo_type = req.route.repo_type or "model"
        self._check_signature(req, "GET", f"{repo_type}s/{req.route.repo_id}", sha256)
        if not self._has_object(sha256):
            raise _HttpError(404, "Object not found")
        entry = _Entry.lfs_object(sha256, self._object_path(sha256).stat().st_size)
        headers = {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"}
        if filename := req.param("filename"):
            headers["Content-Disposition"] = (
                f"attachment; filename*=UTF-8''{quote(filename)}; filename=\"{filename}\""
            )
        return self._ranged(req, entry, headers)

    # -- upload endpoints -------------------------------------------------------------------------------------

    def _preupload(self, req: _Request) -> _Response:
        payload = req.json()
        with self._lock:
            repo = self._writable(req)
            commit = repo.commits[self._revision(repo, req.route.args[0])]
            attrs = commit.tree.get(".gitattributes")
            attrs_bytes = self._object_path(attrs.sha256).read_bytes() if attrs and not attrs.lfs else None
        patterns = _lfs_patterns(attrs_bytes)
        files = []
        for item in payload.get("files") or []:
            path, size = str(item.get("path")), int(item.get("size") or 0)
            lfs = size > 0 and (size > LFS_SIZE_THRESHOLD or _matches_lfs(path, patterns))
            answer: dict[str, Any] = {
                "path": path,
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": False,
            }
            current = commit.tree.get(path)
            if current is not None:
                # the oid the client compares with its own: sha256 for LFS, git blob id for regular
                answer["oid"] = current.sha256 if current.lfs else current.blob
            files.append(answer)
        return _Response.json({"files": files, "commitOid": commit.id})

    def _lfs_batch(self, req: _Request) -> _Response:
        payload = req.json()
        if payload.get("operation") != "upload":
            raise _HttpError(400, "Only the upload operation is supported")
        with self._lock:
            repo = self._writable(req)
            stored = {oid for oid in repo.lfs_oids if self._has_object(oid)}
        lfs_prefix = "" if repo.type == "model" else f"{repo.type}s/"
        verify_href = f"{self.endpoint}/{lfs_prefix}{repo.id}.git/info/lfs/objects/verify"
        objects = []
        for obj in payload.get("objects") or []:
            oid, size = obj.get("oid"), obj.get("size")
            if not isinstance(oid, str) or not _HEX64.match(oid) or not isinstance(size, int) or size < 0:
                objects.append(
                    {
                        "oid": str(oid),
                        "size": int(size) if isinstance(size, int) else 0,
                        "error": {"code": 422, "message": "Invalid oid or size"},
                    }
                )
            elif oid in stored:
                objects.append({"oid": oid, "size": size})  # no actions: already there
            else:
                expires = str(int(time.time()) + _SIGNED_URL_TTL_S)
                sig = self._sign("PUT", repo.key, oid, str(size), expires)
                href = (
                    f"{self.cdn_endpoint}/lfs-upload/{repo.key}/{oid}?size={size}&expires={expires}&sig={sig}"
                )
                objects.append(
                    {
                        "oid": oid,
                        "size": size,
                        "authenticated": True,
                        "actions": {"upload": {"href": href}, "verify": {"href": verify_href}},
                    }
                )
        return _Response.json(
            {"transfer": "basic", "objects": objects}, content_type="application/vnd.git-lfs+json"
        )

    def _lfs_put(self, req: _Request) -> _Response:
        oid = req.route.args[0]
        size = req.param("size") or ""
        repo_type = req.route.repo_type or "model"
        self._check_signature(req, "PUT", f"{repo_type}s/{req.route.repo_id}", oid, size)
        digest = hashlib.sha256()
        received = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.root / "tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                for chunk in req.iter_body():
                    digest.update(chunk)
                    received += len(chunk)
                    fh.write(chunk)
            if received != int(size) or digest.hexdigest() != oid:
                raise _HttpError(
                    400,
                    f"Uploaded object does not match: expected {oid} ({size} bytes), "
                    f"got {digest.hexdigest()} ({received} bytes)",
                )
            with self._lock:
                repo = self._load(repo_type, req.route.repo_id or "")
                if repo is None:
                    raise _HttpError(404, "Repository not found", "RepoNotFound")
                target = self._object_path(oid)
                if not target.is_file():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(tmp, target)
                repo.lfs_oids.add(oid)
                self._save(repo)
        finally:
            tmp.unlink(missing_ok=True)
        return _Response(200, {"ETag": f'"{oid}"'})

    def _lfs_verify(self, req: _Request) -> _Response:
        payload = req.json()
        oid, size = str(payload.get("oid")), payload.get("size")
        with self._lock:
            repo = self._writable(req)
            known = oid in repo.lfs_oids and self._has_object(oid)
        if not known or self._object_path(oid).stat().st_size != size:
            raise _HttpError(404, f"LFS object {oid} not found")
        return _Response.json({"success": True}, content_type="application/vnd.git-lfs+json")

    def _lfs_duplicate(self, req: _Request) -> _Response:
        payload = req.json()
        target_info = payload.get("target") or {}
        target_type = str(target_info.get("type") or "model")
        target_id = str(target_info.get("name") or "")
        failed = []
        with self._lock:
            source = self._readable(req)
            target = self._writable(req, target_type, target_id)
            for item in payload.get("files") or []:
                sha256 = str(item.get("sha256"))
                if sha256 not in source.lfs_oids or not self._has_object(sha256):
                    failed.append({"sha256": sha256, "error": "Object not found in the source repo"})
                elif item.get("xetHash") != xet_hash_for(sha256):
                    failed.append({"sha256": sha256, "error": "xetHash does not match sha256"})
                else:
                    target.lfs_oids.add(sha256)
            self._save(target)
        return _Response.json({"failed": failed})

    def _commit(self, req: _Request) -> _Response:
        lines = [json.loads(line) for line in req.body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HttpError(400, "The first line of a commit must be its header")
        header = lines[0].get("value") or {}
        title = str(header.get("summary") or "").strip()
        if not title:
            raise _HttpError(400, "A commit needs a summary")
        rev = req.route.args[0]
        create_pr = req.flag("create_pr")
        user = self._user(req)
        with self._lock:
            repo = self._writable(req)
            if rev not in repo.branches and not (_PR_REF.match(rev) and int(rev[8:]) in repo.pulls):
                if repo.resolve(rev) is not None:
                    raise _HttpError(400, f"Cannot commit to {rev}: not a branch")
                raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            head = self._revision(repo, rev)
            parent = header.get("parentCommit")
            if parent is not None and parent != head:
                raise _HttpError(
                    412,
                    f"A commit has happened since. Please refresh and try again "
                    f"(parentCommit {parent} is not the head {head} of {rev}).",
                )
            tree = self._apply(repo, dict(repo.commits[head].tree), lines[1:])
            try:
                _hash_tree(tree)
            except _PathClash as err:
                raise _HttpError(400, str(err)) from err
            assert user is not None  # _writable checked it
            commit = _Commit.create(tree, [head], title, str(header.get("description") or ""), user.name)
            repo.commits[commit.id] = commit
            answer: dict[str, Any] = {
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit.id}",
                "commitOid": commit.id,
            }
            if create_pr:
                number = max(repo.pulls, default=0) + 1
                repo.pulls[number] = commit.id
                answer["pullRequestUrl"] = f"{self._repo_url(repo)}/discussions/{number}"
            elif rev in repo.branches:
                repo.branches[rev] = commit.id
            else:
                repo.pulls[int(rev[8:])] = commit.id
            self._save(repo)
        return _Response.json(answer)

    def _apply(self, repo: _Repo, tree: dict[str, _Entry], ops: list[dict[str, Any]]) -> dict[str, _Entry]:
        """`tree` after the commit's operations; raises before anything is stored but content objects."""
        for op in ops:
            key, value = op.get("key"), op.get("value") or {}
            path = str(value.get("path") or "")
            clean = path.strip("/")
            if not clean or ".." in clean.split("/") or clean.startswith(".git/") or "\\" in clean:
                raise _HttpError(400, f"Invalid path in commit: {path!r}")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise _HttpError(400, f"Unsupported encoding {value.get('encoding')!r}")
                data = base64.b64decode(value.get("content") or "")
                self._store_bytes(data)
                tree[clean] = _Entry.regular(data)
            elif key == "lfsFile":
                oid = str(value.get("oid"))
                if oid not in repo.lfs_oids or not self._has_object(oid):
                    raise _HttpError(
                        422,
                        f"Your push was rejected because an LFS pointer pointed to a file that "
                        f"does not exist ({clean}: {oid})",
                    )
                stored = self._object_path(oid).stat().st_size
                if value.get("size") is not None and int(value["size"]) != stored:
                    raise _HttpError(422, f"LFS object {oid} has {stored} bytes, not {value['size']}")
                tree[clean] = _Entry.lfs_object(oid, stored)
            elif key == "deletedFile":
                if clean not in tree:
                    raise _HttpError(404, f"A file with this name doesn't exist: {clean}", "EntryNotFound")
                del tree[clean]
            elif key == "deletedFolder":
                doomed = [p for p in tree if p.startswith(clean + "/")]
                if not doomed:
                    raise _HttpError(404, f"A folder with this name doesn't exist: {clean}", "EntryNotFound")
                for p in doomed:
                    del tree[p]
            else:
                raise _HttpError(400, f"Unknown commit operation {key!r}")
        return tree

    # -- refs -------------------------------------------------------------------------------------------------

    def _create_branch(self, req: _Request) -> _Response:
        branch = req.route.args[0]
        payload = req.json()
        with self._lock:
            repo = self._writable(req)
            if not branch or branch.startswith("refs/") or branch in repo.branches:
                raise _HttpError(
                    409 if branch in repo.branches else 400,
                    f"Branch {branch} already exists"
                    if branch in repo.branches
                    else f"Invalid branch name {branch!r}",
                )
            start = payload.get("startingPoint") or "main"
            repo.branches[branch] = self._revision(repo, str(start))
            self._save(repo)
        return _Response.json({})

    def _delete_branch(self, req: _Request) -> _Response:
        branch = req.route.args[0]
        with self._lock:
            repo = self._writable(req)
            if branch == "main":
                raise _HttpError(403, "Cannot delete the default branch")
            if branch not in repo.branches:
                raise _HttpError(404, f"Branch {branch} not found", "RevisionNotFound")
            del repo.branches[branch]
            self._save(repo)
        return _Response.json({})

    def _create_tag(self, req: _Request) -> _Response:
        payload = req.json()
        tag = str(payload.get("tag") or "")
        with self._lock:
            repo = self._writable(req)
            sha = self._revision(repo, req.route.args[0] or "main")
            if not tag or tag.startswith("refs/"):
                raise _HttpError(400, f"Invalid tag name {tag!r}")
            if tag in repo.tags:
                raise _HttpError(409, f"Tag {tag} already exists")
            repo.tags[tag] = sha
            self._save(repo)
        return _Response.json({})

    def _delete_tag(self, req: _Request) -> _Response:
        tag = req.route.args[0]
        with self._lock:
            repo = self._writable(req)
            if tag not in repo.tags:
                raise _HttpError(404, f"Tag {tag} not found", "RevisionNotFound")
            del repo.tags[tag]
            self._save(repo)
        return _Response.json({})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hubsync.testing.hub", description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="folder holding the emulator's state")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="API port (0: any free port)")
    parser.add_argument("--cdn-port", type=int, default=0, help="port serving LFS bytes (0: any free port)")
    args = parser.parse_args(argv)
    hub = LocalHub(args.root, host=args.host, port=args.port, cdn_port=args.cdn_port).start()
    print(hub.endpoint, flush=True)
    print(f"# cdn: {hub.cdn_endpoint}  root: {hub.root}", flush=True)
    print(f"# export HF_ENDPOINT={hub.endpoint} HF_HUB_DISABLE_XET=1 HF_TOKEN={DEFAULT_TOKEN}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
