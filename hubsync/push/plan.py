"""What a push will do, decided from file lists alone: the build's files against the remote branch and the base.

Pure. A shard is planned as a server-side copy only when the pinned
base serves the same bytes *and* a `xetHash` for them: huggingface_hub copies across repos by Xet hash, and a
base uploaded before the Xet migration serves plain LFS files without one. Those are uploaded instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Files = dict[str, dict[str, Any]]  # path -> {"sha256", "size", "blob" (git sha1, when known), "content"?}


@dataclass(frozen=True)
class Target:
    """Where the build goes: the manifest's `push:` section."""

    repo_id: str
    revision: str
    create_pr: bool
    private: bool
    tag: str | None
    tag_move: bool
    branch_from: str

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Target:
        return cls(
            repo_id=str(spec["repo"]),
            revision=str(spec.get("revision") or "main"),
            create_pr=bool(spec.get("create_pr")),
            private=bool(spec.get("private", True)),
            tag=spec.get("tag"),
            tag_move=bool(spec.get("tag_move")),
            branch_from=str(spec.get("branch_from") or "main"),
        )

    @property
    def label(self) -> str:
        return f"{self.repo_id}@{self.revision}"


@dataclass(frozen=True)
class BaseFile:
    """A shard of the pinned base as the Hub serves it: its sha256, and its Xet hash when it has one."""

    sha256: str | None
    xet_hash: str | None


@dataclass(frozen=True)
class PushPlan:
    """What a push will do, decided from local and remote file lists alone."""

    add: tuple[str, ...]
    copy: tuple[str, ...]
    delete: tuple[str, ...]
    unchanged: tuple[str, ...]
    no_xet: tuple[
        str, ...
    ] = ()  # byte-identical to a base shard, but uploaded: the base has no xetHash for it

    @property
    def empty(self) -> bool:
        return not (self.add or self.copy or self.delete)


def same_file(mine: Mapping[str, Any], theirs: Mapping[str, Any] | None) -> bool:
    """True when the remote file holds these bytes (sha256 for LFS files, git blob id for regular ones)."""
    if theirs is None:
        return False
    sha, blob = theirs.get("sha256"), theirs.get("blob")
    return (sha is not None and sha == mine["sha256"]) or (blob is not None and blob == mine.get("blob"))


def plan_push(local: Files, remote: Files, base: Mapping[str, BaseFile]) -> PushPlan:
    """Pure: local files against the remote's and the base's (`base`: the shards copied unchanged from it)."""
    add, copy, unchanged, no_xet = [], [], [], []
    for path, info in sorted(local.items()):
        source = base.get(path)
        if same_file(info, remote.get(path)):
            unchanged.append(path)
        elif source is not None and source.sha256 == info["sha256"] and source.xet_hash:
            copy.append(path)
        else:
            add.append(path)
            if source is not None and source.sha256 == info["sha256"]:
                no_xet.append(path)
    delete = sorted(p for p in remote if p not in local and p != ".gitattributes")
    return PushPlan(tuple(add), tuple(copy), tuple(delete), tuple(unchanged), tuple(no_xet))


def matches(local: Files, remote: Files) -> bool:
    """True when the remote tree is the build (`.gitattributes` aside): nothing to add, copy or delete."""
    return plan_push(local, remote, {}).empty
