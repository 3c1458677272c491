"""A local Hugging Face Hub emulator that the real, unmodified ``huggingface_hub`` client can talk to.

Tests and the demo run against it instead of huggingface.co. It speaks the subset of the Hub's HTTP protocol that
``huggingface_hub`` 2.4.0 uses for repos, refs, uploads (preupload, LFS batch, NDJSON commit) and downloads
(revision, tree, resolve), with real git object hashing so commit ids and blob ids look like the Hub's.

Nothing from huggingface_hub on purpose (the stdlib and PyYAML only): test fixtures import this module *before*
setting ``HF_ENDPOINT``, and the client reads that variable once, at import, so importing ``huggingface_hub`` here
would pin the wrong endpoint.

It must never be more lenient than the real Hub: docs/hub-fidelity.md lists every known difference and which side
is stricter. Run it by hand with ``python -m hubsync.testing.hub serve --root DIR``.

Design notes:

* Two ports. The API port answers everything that carries a token; LFS bytes are served and received on a second
  "CDN" port through HMAC-signed URLs, as production does. The client follows a ``resolve`` redirect only when it
  stays on the same origin, so a second port is what makes it stop at the redirect and drop its token for the GET.
* LFS vs regular: a file is "lfs" when it matches an LFS pattern of the ``.gitattributes`` at that revision (every
  repo starts with the Hub's default one, in an initial commit, like a real repo) or is larger than 10 MiB;
  everything else, and every empty file, is "regular".
* LFS objects are scoped to a repo: an object uploaded to repo A is not usable by a commit to repo B until it is
  uploaded there too or duplicated server-side. That keeps the cross-repo copy test honest.
* File kinds. By default LFS files carry no ``xetHash`` anywhere, as repos uploaded before the Xet migration are
  served; the client's cross-repo ``CommitOperationCopy`` then refuses to copy (``ValueError: ... has no xet
  hash``) and the duplicate endpoint reports every such file as failed. ``LocalHub(xet=True)`` serves Xet-backed
  files instead: a synthetic 64-hex ``xetHash`` (derived from the sha256) in ``paths-info``, which is all the copy
  path reads. Even then no ``tree`` entry or ``resolve`` answer carries Xet data, because that would switch
  downloads to Xet, which this emulator does not speak. Clients must set ``HF_HUB_DISABLE_XET=1``, or uploads go
  to Xet.
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
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import yaml

if TYPE_CHECKING:  # annotations only
    from typing_extensions import Self

__all__ = [
    "BASE_MODEL_RELATIONS",
    "DEFAULT_TOKEN",
    "FAULT_KINDS",
    "HUB_LICENSES",
    "LFS_SIZE_THRESHOLD",
    "OTHER_TOKEN",
    "PIPELINE_TAGS",
    "ROUTES",
    "TREE_PAGE_SIZE",
    "GitIgnore",
    "LocalHub",
    "RequestRecord",
    "User",
    "parse_card_data",
    "validate_card",
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
# "apply-drop": do the request, then hang up without answering (a commit whose answer is lost);
# "reject": the duplicate endpoint reports every file as failed, as it does across storage regions.
FAULT_KINDS: frozenset[str] = frozenset({"500", "503", "429", "drop", "slow", "apply-drop", "reject"})

# The real Hub sends files above 10 MB to LFS even when no .gitattributes pattern matches.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
# Entries per page of a tree listing; the Hub pages with a `Link: <...>; rel="next"` header.
TREE_PAGE_SIZE = 1000
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


def _encode_cursor(last_path: str) -> str:
    # opaque to the client, as the Hub's cursor is: the listing resumes after this path
    return base64.urlsafe_b64encode(last_path.encode()).decode()


def _decode_cursor(cursor: str | None) -> str | None:
    if cursor is None:
        return None
    try:
        return base64.urlsafe_b64decode(cursor.encode()).decode()
    except (ValueError, UnicodeDecodeError) as err:
        raise _HttpError(400, f"Invalid cursor {cursor!r}") from err


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
# README metadata: what the Hub's YAML validation refuses (see docs/hub-fidelity.md for what it does not check)

# The license ids the Hub accepts, in the order its own error message lists them (the message quoted in
# huggingface/huggingface_hub#4218, 2026-05). `openmdw-1.1` (hub-docs#2520, 2026-06) is left out until the Hub's
# validator is known to take it: a stricter emulator only costs a renamed license in a test.
HUB_LICENSES: tuple[str, ...] = tuple(
    """
    apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
    bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc
    cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0
    cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0
    cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1
    eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc h-research intel-research lppl-1.3c
    ms-pl apple-ascl apple-amlr mpl-2.0 odc-by odbl openmdw-1.0 openrail++ osl-3.0 postgresql ofl-1.1 ncsa
    unlicense zlib pddl lgpl-lr deepfloyd-if-license fair-noncommercial-research-license llama2 llama3 llama3.1
    llama3.2 llama3.3 llama4 grok2-community gemma unknown other
    """.split()  # noqa: SIM905
)

# The Hub's task ids (`PIPELINE_DATA` in huggingface.js, packages/tasks/src/pipelines.ts).
PIPELINE_TAGS: tuple[str, ...] = tuple(
    """
    biology text-classification token-classification table-question-answering question-answering
    zero-shot-classification translation summarization feature-extraction text-generation text2text-generation
    fill-mask sentence-similarity text-to-speech text-to-audio automatic-speech-recognition audio-to-audio
    audio-classification audio-text-to-text voice-activity-detection depth-estimation image-classification
    object-detection image-segmentation text-to-image image-to-text image-to-image image-to-video
    unconditional-image-generation video-classification reinforcement-learning robotics tabular-classification
    tabular-regression tabular-to-text table-to-text multiple-choice text-ranking text-retrieval
    time-series-forecasting text-to-video image-text-to-text visual-question-answering
    document-question-answering zero-shot-image-classification graph-ml mask-generation
    zero-shot-object-detection text-to-3d image-to-3d image-feature-extraction video-text-to-text
    keypoint-detection visual-document-retrieval any-to-any other
    """.split()  # noqa: SIM905
)
BASE_MODEL_RELATIONS: tuple[str, ...] = ("adapter", "merge", "quantized", "finetune")
NO_METADATA_WARNING = (
    "Empty or missing yaml metadata in repo card"
    " (https://huggingface.co/docs/hub/model-cards#model-card-metadata)"
)
# huggingface_hub's own pattern for a README's front matter block
_FRONT_MATTER = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")
_REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")
_LICENSE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys; the Hub's YAML parser refuses them, so do we."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicated mapping key {key!r}", key_node.start_mark
                )
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


def _front_matter(readme: str) -> str | None:
    match = _FRONT_MATTER.match(readme)
    return match.group(2) if match else None


def parse_card_data(readme: bytes) -> dict[str, Any] | None:
    """The README's YAML front matter as a JSON-safe dict, or None when absent or not a valid mapping."""
    block = _front_matter(readme.decode("utf-8", "replace"))
    if block is None:
        return None
    try:
        data = yaml.load(block, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError:
        return None
    if data is None:
        return {}
    # dates and other YAML-only types become strings, as they do in the Hub's JSON
    return json.loads(json.dumps(data, default=str)) if isinstance(data, dict) else None


def validate_card(
    readme: str, *, repo_type: str = "model", model_exists: Callable[[str], bool] = lambda _: True
) -> tuple[list[str], list[str]]:
    """(errors, warnings) for a README's metadata, worded as the Hub words them.

    `model_exists` says whether a `base_model` id names a model the caller can see: the emulator insists that it
    does (docs/hub-fidelity.md). Dataset and Space cards get the YAML checks only.
    """
    block = _front_matter(readme)
    if block is None:
        return [], [NO_METADATA_WARNING]
    try:
        meta = yaml.load(block, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        return [f"Invalid YAML in README.md metadata: {' '.join(str(err).split())}"], []
    if meta is None:
        return [], [NO_METADATA_WARNING]
    if not isinstance(meta, dict):
        return ['"value" must be of type object'], []
    if repo_type != "model":
        return [], []
    errors = [
        *_license_errors(meta),
        *_base_model_errors(meta, model_exists),
        *_list_errors(meta, "tags", allow_string=False),
        *_list_errors(meta, "datasets", allow_string=True),
        *_list_errors(meta, "language", allow_string=True),
        *_dataset_id_errors(meta),
        *_one_of_errors(meta, "pipeline_tag", PIPELINE_TAGS),
    ]
    for key in ("library_name", "license_link"):
        if key in meta and not isinstance(meta[key], str):
            errors.append(f'"{key}" must be a string')
    return errors, []


def _one_of_errors(meta: dict[str, Any], key: str, allowed: tuple[str, ...], extra: str = "") -> list[str]:
    if key not in meta or meta[key] in allowed:
        return []
    return [f'"{key}" must be one of [{", ".join(allowed)}{extra}]']


def _license_errors(meta: dict[str, Any]) -> list[str]:
    if "license" not in meta:
        return []
    license_ = meta["license"]
    if isinstance(license_, list):
        errors = [*_one_of_items(license_, "license", HUB_LICENSES)]
    else:
        errors = _one_of_errors(meta, "license", HUB_LICENSES, extra=", array")
    is_other = license_ == "other" or (isinstance(license_, list) and "other" in license_)
    name = meta.get("license_name")
    if is_other and name is None:
        errors.append('"license_name" is required when "license" is "other"')
    elif name is not None and (not isinstance(name, str) or not _LICENSE_NAME.match(name)):
        errors.append(
            f'"license_name" with value "{name}" fails to match the required pattern: {_LICENSE_NAME.pattern}'
        )
    return errors


def _one_of_items(values: list[Any], key: str, allowed: tuple[str, ...]) -> list[str]:
    return [
        f'"{key}[{n}]" must be one of [{", ".join(allowed)}]'
        for n, v in enumerate(values)
        if v not in allowed
    ]


def _base_model_errors(meta: dict[str, Any], model_exists: Callable[[str], bool]) -> list[str]:
    errors = _one_of_errors(meta, "base_model_relation", BASE_MODEL_RELATIONS)
    if "base_model" not in meta:
        if "base_model_relation" in meta:
            errors.append('"base_model_relation" missing required peer "base_model"')
        return errors
    value = meta["base_model"]
    if value in (None, "", []):
        return [*errors, '"base_model" is not allowed to be empty']
    if not isinstance(value, (str, list)):
        return [*errors, '"base_model" must be one of [string, array]']
    named = [("base_model", value)] if isinstance(value, str) else list(enumerate(value))
    for label, repo_id in ((k if isinstance(k, str) else f"base_model[{k}]", v) for k, v in named):
        if not isinstance(repo_id, str) or not repo_id:
            errors.append(f'"{label}" must be a non-empty string')
        elif not is_repo_id(repo_id) or not model_exists(repo_id):
            errors.append(
                f'"{label}" with value "{repo_id}" is not valid. Use a model id from https://hf.co/models.'
            )
    return errors


def _list_errors(meta: dict[str, Any], key: str, *, allow_string: bool) -> list[str]:
    if key not in meta or (allow_string and isinstance(meta[key], str)):
        return []
    value = meta[key]
    if not isinstance(value, list):
        return [f'"{key}" must be one of [string, array]' if allow_string else f'"{key}" must be an array']
    return [f'"{key}[{n}]" must be a string' for n, item in enumerate(value) if not isinstance(item, str)]


def _dataset_id_errors(meta: dict[str, Any]) -> list[str]:
    value = meta.get("datasets")
    items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    hint = "If possible, use a dataset id from https://hf.co/datasets."
    return [
        f'"datasets[{n}]" with value "{item}" is not valid. {hint}'
        for n, item in enumerate(items)
        if isinstance(item, str) and not is_repo_id(item)
    ]


def is_repo_id(text: str) -> bool:
    """huggingface_hub's rule for a repo id: `name` or `namespace/name`, word characters, `-` and `.`, <= 96."""
    return (
        len(text) <= 96
        and bool(_REPO_ID.match(text))
        and "--" not in text
        and ".." not in text
        and not any(part.startswith(("-", ".")) or part.endswith(("-", ".")) for part in text.split("/"))
    )


# --------------------------------------------------------------------------------------------------------------
# .gitignore: the Hub answers `shouldIgnore` on preupload from the repo's (or the client's) .gitignore


class GitIgnore:
    """gitignore matching for the common patterns: `*.bin`, `dir/`, `!keep`, anchored `/x`, `**`, `[ab]`.

    Last matching line wins; a file inside an ignored folder stays ignored whatever a later `!` line says, as in
    git. Not handled: escaped trailing spaces, and a per-folder `.gitignore` below the root.
    """

    def __init__(self, text: str) -> None:
        self._rules: list[tuple[re.Pattern[str], bool, bool]] = []  # (regex, negated, folders only)
        for raw in text.splitlines():
            line = raw.rstrip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            line = line[1:] if negated else line
            line = line.removeprefix("\\")  # "\#", "\!": a literal first character
            folders_only = line.endswith("/")
            line = line.rstrip("/")
            if line:
                self._rules.append((_gitignore_regex(line), negated, folders_only))

    def ignores(self, path: str) -> bool:
        parts = path.strip("/").split("/")
        if any(self._verdict("/".join(parts[:n]), folder=True) for n in range(1, len(parts))):
            return True
        return self._verdict("/".join(parts), folder=False)

    def _verdict(self, path: str, *, folder: bool) -> bool:
        ignored = False
        for regex, negated, folders_only in self._rules:
            if (folder or not folders_only) and regex.fullmatch(path):
                ignored = not negated
        return ignored


def _gitignore_regex(pattern: str) -> re.Pattern[str]:
    # a "/" at the start or in the middle anchors the pattern at the root; otherwise it matches at any depth
    anchored = "/" in pattern
    body = _glob_regex(pattern.lstrip("/"))
    return re.compile(body if anchored else f"(?:.*/)?{body}")


def _glob_regex(glob: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(glob):
        at_segment_start = i == 0 or glob[i - 1] == "/"
        if at_segment_start and glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif at_segment_start and glob[i:] == "**":
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        elif glob[i] == "[" and (end := glob.find("]", i + 2)) != -1:
            inner = glob[i + 1 : end]
            inner = "^" + inner[1:] if inner.startswith("!") else inner
            out.append("[" + inner.replace("\\", "\\\\") + "]")
            i = end + 1
        elif glob[i] == "\\" and i + 1 < len(glob):
            out.append(re.escape(glob[i + 1]))
            i += 2
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return "".join(out)


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

    def __init__(
        self, handler: _Handler, method: str, raw_path: str, query: dict[str, list[str]], route: _Route
    ) -> None:
        self.handler = handler
        self.method = method
        self.raw_path = raw_path  # still percent-encoded, as the client sent it
        self.query = query
        self.route = route
        self.headers = handler.headers
        self.fault_kind: str | None = None  # an injected fault the endpoint itself plays ("reject")

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
        req = _Request(self, method, split.path, parse_qs(split.query, keep_blank_values=True), route)
        try:
            fault = hub._take_fault(route.name)
            if fault is not None and self._play_fault_before(method, fault):
                return
            req.fault_kind = fault.kind if fault is not None else None
            resp = self._answer(method, req)
            if fault is not None and fault.kind == "apply-drop":
                raise _Drop()  # applied, but the client never hears of it
            self._write(method, resp, truncate=fault is not None and fault.kind == "drop")
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

    def _play_fault_before(self, method: str, fault: _Fault) -> bool:
        """Play the part of `fault` that comes before the endpoint runs; True when it answered (or hung up)."""
        if fault.kind == "slow":
            time.sleep(fault.delay)
        elif fault.kind in ("500", "503", "429"):
            for _ in self.body_chunks():
                pass
            headers = {"Retry-After": str(fault.retry_after)} if fault.kind == "429" else {}
            error = _HttpError(int(fault.kind), f"Injected {fault.kind} fault", None, headers)
            self._write(method, self.server.hub._error_response(error))
            return True
        elif fault.kind == "drop" and self._has_body():
            # drop mid-upload: take about half of the payload, then hang up
            expected = int(self.headers.get("Content-Length") or 0)
            if expected:
                self._bytes_in += len(self.rfile.read(max(expected // 2, 1)))
            else:
                next(self.body_chunks(), None)  # chunked: one chunk is "mid-body" enough
            raise _Drop()
        elif fault.kind == "drop" and method == "HEAD":
            raise _Drop()
        return False

    def _answer(self, method: str, req: _Request) -> _Response:
        try:
            if req.route.action is None:
                raise _HttpError(404, f"Not found: {method} {req.raw_path}")
            resp = req.route.action(req)
        except _HttpError as err:
            resp = self.server.hub._error_response(err)
        # an endpoint that answered early must not leave body bytes to be parsed as the next request
        for _ in self.body_chunks():
            pass
        return resp

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
    """A Hub on two loopback ports (API + CDN) with state under `root`. Use as a context manager or start/stop.

    `xet`: serve LFS files as Xet-backed (with a `xetHash`, so server-side copies work) instead of as plain LFS
    files from before the Xet migration. `tree_page_size`: entries per page of a tree listing. Both may be changed
    on a running Hub; they apply to the next request.
    """

    def __init__(
        self,
        root: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        cdn_port: int = 0,
        users: dict[str, User] | None = None,
        xet: bool = False,
        tree_page_size: int = TREE_PAGE_SIZE,
    ) -> None:
        if tree_page_size < 1:
            raise ValueError("tree_page_size must be at least 1")
        self.root = Path(root)
        self.users: dict[str, User] = dict(users) if users is not None else _default_users()
        self.xet = xet
        self.tree_page_size = tree_page_size
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
        `delay`, then answer normally) | "apply-drop" (do the request, e.g. apply a commit, then hang up without
        answering) | "reject" (`lfs-duplicate` only: answer 200 with every file failed, as a duplicate across
        storage regions is answered).
        """
        if route not in ROUTES:
            raise ValueError(f"Unknown route {route!r}; expected one of {sorted(ROUTES)}")
        if kind not in FAULT_KINDS:
            raise ValueError(f"Unknown fault kind {kind!r}; expected one of {sorted(FAULT_KINDS)}")
        if kind == "reject" and route != "lfs-duplicate":
            raise ValueError('the "reject" fault is for the "lfs-duplicate" route only')
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
        if "\n" not in err.message:  # a header holds one line; the body carries the rest
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
        payload = req.json()
        content, repo_type = payload.get("content"), payload.get("repoType") or "model"
        if not isinstance(content, str) or repo_type not in _REPO_TYPES:
            raise _HttpError(400, '"content" must be a string and "repoType" one of [model, dataset, space]')
        user = self._user(req)  # RepoCard.validate() sends no token: anonymous callers are answered too
        errors, warnings = self._card_problems(user, content, str(repo_type))
        status = 400 if errors else 200
        if "text/plain" in (req.headers.get("Accept") or ""):
            # RepoCard.validate() asks for text and raises ValueError(response.text) on a 400
            text = "\n".join(errors or warnings)
            return _Response(status, {"Content-Type": "text/plain; charset=utf-8"}, text.encode())
        # otherwise JSON, errors or not: HfApi parses the body before it looks at the status
        body = {"errors": [{"message": m} for m in errors], "warnings": [{"message": m} for m in warnings]}
        return _Response.json(body, status)

    def _card_problems(self, user: User | None, readme: str, repo_type: str) -> tuple[list[str], list[str]]:
        def model_exists(repo_id: str) -> bool:
            with self._lock:
                repo = self._load("model", repo_id)
            return repo is not None and (
                not repo.private or (user is not None and user.can_write(repo.namespace))
            )

        return validate_card(readme, repo_type=repo_type, model_exists=model_exists)

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
        after = _decode_cursor(req.param("cursor"))
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
        return self._page(req, [e for e in entries if after is None or e["path"] > after])

    def _page(self, req: _Request, entries: list[dict[str, Any]]) -> _Response:
        """The first page of `entries`, with a `Link: <...>; rel="next"` to the rest, as the Hub pages."""
        size = self.tree_page_size
        resp = _Response.json(entries[:size])
        if len(entries) > size:
            # the client follows the link as it is: it must carry every parameter of the request
            query = [(k, v) for k, values in req.query.items() if k != "cursor" for v in values]
            query.append(("cursor", _encode_cursor(entries[size - 1]["path"])))
            resp.headers["Link"] = f'<{self.endpoint}{req.raw_path}?{urlencode(query)}>; rel="next"'
        return resp

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
                out.append(self._tree_entry(path, commit.tree[path], with_xet=self.xet))
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
        ignore = self._gitignore(payload, commit)
        files = []
        for item in payload.get("files") or []:
            path, size = str(item.get("path")), int(item.get("size") or 0)
            lfs = size > 0 and (size > LFS_SIZE_THRESHOLD or _matches_lfs(path, patterns))
            answer: dict[str, Any] = {
                "path": path,
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": ignore is not None and ignore.ignores(path),
            }
            current = commit.tree.get(path)
            if current is not None:
                # the oid the client compares with its own: sha256 for LFS, git blob id for regular
                answer["oid"] = current.sha256 if current.lfs else current.blob
            files.append(answer)
        return _Response.json({"files": files, "commitOid": commit.id})

    def _gitignore(self, payload: dict[str, Any], commit: _Commit) -> GitIgnore | None:
        """The client's `gitIgnore` (it sends one when the commit adds a .gitignore), else the revision's."""
        text = payload.get("gitIgnore")
        if not isinstance(text, str):
            entry = commit.tree.get(".gitignore")
            if entry is None or entry.lfs:
                return None
            text = self._object_path(entry.sha256).read_bytes().decode("utf-8", "replace")
        return GitIgnore(text)

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
            self._check_gate(req, source)
            target = self._writable(req, target_type, target_id)
            for item in payload.get("files") or []:
                sha256 = str(item.get("sha256"))
                reason = self._duplicate_refusal(source, item, rejected=req.fault_kind == "reject")
                if reason is None:
                    target.lfs_oids.add(sha256)
                else:
                    failed.append({"sha256": sha256, "error": reason})
            self._save(target)
        # partial failures are a 200 listing them: the client raises FileDuplicationError on a non-empty list
        return _Response.json({"failed": failed})

    def _duplicate_refusal(self, source: _Repo, item: dict[str, Any], *, rejected: bool) -> str | None:
        """Why the Hub would not duplicate this file server-side, or None when it would."""
        sha256 = str(item.get("sha256"))
        if rejected:
            return "Files cannot be duplicated between these storage regions"
        if not self.xet:
            return "File has no xet hash: it is stored in LFS, not in Xet storage"
        if sha256 not in source.lfs_oids or not self._has_object(sha256):
            return "Object not found in the source repo"
        if item.get("xetHash") != xet_hash_for(sha256):
            return "xetHash does not match sha256"
        return None

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
            self._check_card(user, repo, repo.commits[head].tree, tree)
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

    def _check_card(
        self, user: User | None, repo: _Repo, before: dict[str, _Entry], after: dict[str, _Entry]
    ) -> None:
        """Refuse a commit that adds or changes README.md with metadata the Hub refuses, as the Hub does."""
        readme = after.get("README.md")
        if readme is None or readme == before.get("README.md") or readme.lfs:
            return
        text = self._object_path(readme.sha256).read_bytes().decode("utf-8", "replace")
        errors, _ = self._card_problems(user, text, repo.type)
        if errors:
            raise _HttpError(400, "\n".join(errors))

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
                if len(data) > LFS_SIZE_THRESHOLD:
                    raise _HttpError(
                        400,
                        f"Your push was rejected because it contains files larger than 10 MiB ({clean}). "
                        "Please use https://git-lfs.github.com/ to store large files.",
                    )
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


# --------------------------------------------------------------------------------------------------------------
# Running it by hand: python -m hubsync.testing.hub serve --root DIR [--port N] [--xet]


def serve_env(hub: LocalHub, hf_home: Path) -> dict[str, str]:
    """What a shell must export for huggingface_hub (and hubsync) to use `hub`, in the order to print it."""
    return {
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_DISABLE_XET": "1",  # else every upload goes to Xet, which this Hub does not speak
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_TOKEN": DEFAULT_TOKEN,
        "HF_HOME": str(hf_home),
    }


def _banner(hub: LocalHub, hf_home: Path) -> str:
    kind = "Xet-backed files (xetHash: server-side copies work)" if hub.xet else "LFS-only files (no xetHash)"
    exports = "\n".join(f"export {name}={value}" for name, value in serve_env(hub, hf_home).items())
    users = ", ".join(
        f"{token} = {u.name}" + (f" (orgs: {', '.join(u.orgs)})" if u.orgs else "")
        for token, u in hub.users.items()
    )
    return (
        f"# local Hub on {hub.endpoint} (LFS bytes on {hub.cdn_endpoint}), state in {hub.root}, {kind}\n"
        "# in the shell that runs huggingface_hub or hubsync, before anything imports huggingface_hub:\n"
        f"{exports}\n"
        "# HF_HOME: a cache of its own, so that this Hub's files never mix with huggingface.co's\n"
        f"# tokens: {users}\n"
        f"# Ctrl-C stops it; `serve --root {hub.root}` again brings the same repos back"
    )


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hubsync.testing.hub", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the Hub until Ctrl-C; state stays on disk under --root")
    serve.add_argument(
        "--root", type=Path, required=True, help="folder holding the Hub's state (created if new)"
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=0, help="API port (default 0: any free port)")
    serve.add_argument(
        "--cdn-port", type=int, default=0, help="port serving LFS bytes (default 0: any free port)"
    )
    serve.add_argument("--xet", action="store_true", help="serve Xet-backed files (server-side copies work)")
    serve.add_argument(
        "--tree-page-size", type=int, default=TREE_PAGE_SIZE, help="entries per tree listing page"
    )
    serve.add_argument("--hf-home", type=Path, help="HF_HOME to print (default: ROOT/hf-home)")
    # `python -m hubsync.testing.hub --root DIR`, the shape before `serve` existed, still works
    return parser.parse_args(argv if argv[:1] in (["serve"], ["-h"], ["--help"]) else ["serve", *argv])


def _wait_for_stop() -> None:
    """Block until Ctrl-C or SIGTERM."""
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        # SIGINT too, explicitly: a process started with SIGINT ignored (a background job of a script, a test
        # runner's worker) inherits that, and Ctrl-C would then never stop it
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    root = args.root.resolve()
    try:
        hub = LocalHub(
            root,
            host=args.host,
            port=args.port,
            cdn_port=args.cdn_port,
            xet=args.xet,
            tree_page_size=args.tree_page_size,
        ).start()
    except (OSError, ValueError) as err:
        print(
            f"cannot start the local Hub: {err}: choose another --port/--cdn-port or --root", file=sys.stderr
        )
        return 2
    print(hub.endpoint, flush=True)  # first line alone, for scripts
    print(_banner(hub, (args.hf_home or root / "hf-home").resolve()), flush=True)
    try:
        _wait_for_stop()
    finally:
        hub.stop()
    print("# local Hub stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
