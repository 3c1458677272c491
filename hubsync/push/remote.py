"""What the Hub holds: the target branch (or the ref a new branch starts from), its tags, the base's shards, and
whether a commit whose answer was lost landed after all. Reads only; every call goes through `calls.call`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from hubsync.errors import PushError
from hubsync.push.calls import HubFailure, call, describe
from hubsync.push.plan import BaseFile, Files, Target, matches
from hubsync.record import BuildRecord

log = logging.getLogger("hubsync")


@dataclass
class RemoteState:
    exists: bool
    head: str | None  # the branch head; None when the repo or the branch does not exist yet
    start: str | None  # what the push is compared with: the head, or the commit a new branch starts from
    files: Files
    tags: dict[str, str]  # tag -> commit; read only when the push sets a tag

    @property
    def new_branch(self) -> bool:
        return self.exists and self.head is None


@dataclass(frozen=True)
class Published:
    """The commit a push made (or found already made)."""

    commit_sha: str
    commit_url: str
    pr_url: str | None = None


def read_state(api: Any, target: Target) -> RemoteState:
    """The target branch's head and files; for a branch that does not exist yet, those of `branch_from`."""
    exists, head = branch_head(api, target.repo_id, target.revision)
    if not exists:
        if target.revision != "main" and target.branch_from != "main":
            raise PushError(
                f"{target.repo_id} does not exist yet, so branch `{target.branch_from}` does not either: "
                "set `push.branch_from` to main (a new repo has only main), or push that branch first"
            )
        return RemoteState(False, None, None, {}, {})
    start = head if head is not None else _start_of_new_branch(api, target)
    tags = read_tags(api, target.repo_id) if target.tag else {}
    return RemoteState(True, head, start, list_files(api, target.repo_id, start), tags)


def branch_head(api: Any, repo_id: str, revision: str, *, retry: bool = True) -> tuple[bool, str | None]:
    """(does the repo exist, the commit `revision` points at or None when there is no such ref)."""
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    def head() -> str:
        return str(api.repo_info(repo_id, revision=revision).sha)

    try:
        return True, call("repo info", repo_id, head, retry=retry)
    except HubFailure as failure:
        if isinstance(failure.cause, RevisionNotFoundError):
            return True, None
        if isinstance(failure.cause, RepositoryNotFoundError):
            return False, None
        raise


def _start_of_new_branch(api: Any, target: Target) -> str:
    _, start = branch_head(api, target.repo_id, target.branch_from)
    if start is None:
        raise PushError(
            f"branch {target.revision} does not exist in {target.repo_id} and `push.branch_from` names "
            f"`{target.branch_from}`, which does not exist there either: set `push.branch_from` to a branch, "
            "tag or commit of that repo"
        )
    return start


def list_files(api: Any, repo_id: str, revision: str) -> Files:
    """path -> {"sha256" (LFS files), "blob" (git sha1), "size"} at `revision`."""
    from huggingface_hub.hf_api import RepoFile

    # huggingface_hub pages tree listings with its own retries: no second layer here
    entries = call(
        "list files",
        repo_id,
        lambda: list(api.list_repo_tree(repo_id, revision=revision, recursive=True)),
        retry=False,
    )
    return {
        e.path: {"sha256": e.lfs.sha256 if e.lfs else None, "blob": e.blob_id, "size": e.size}
        for e in entries
        if isinstance(e, RepoFile)
    }


def read_tags(api: Any, repo_id: str) -> dict[str, str]:
    refs = call("tag", repo_id, lambda: api.list_repo_refs(repo_id))
    return {t.name: t.target_commit for t in refs.tags}


def base_files(api: Any, record: BuildRecord) -> dict[str, BaseFile]:
    """The base's shards that the build copied unchanged, as the Hub serves them (sha256, xetHash), read the way
    huggingface_hub reads a copy's source (paths-info). Empty, with a warning, when the base cannot be read: the
    shards are then uploaded."""
    from huggingface_hub.hf_api import RepoFile

    shards = sorted(record.base_shards())
    repo, sha = record.base.repo, record.base.sha
    if not shards or not repo or not sha:
        return {}
    try:
        infos = call("base files", repo, lambda: api.get_paths_info(repo, shards, revision=sha))
    except HubFailure as failure:
        log.warning(
            "cannot read the base's shards on the Hub for server-side copies (%s): uploading them instead",
            describe(failure.cause),
        )
        return {}
    return {
        i.path: BaseFile(i.lfs.sha256 if i.lfs else None, getattr(i, "xet_hash", None))
        for i in infos
        if isinstance(i, RepoFile)
    }


def landed(api: Any, target: Target, parent: str | None, local: Files) -> Published | None:
    """After a commit whose answer was lost: the commit, if the Hub applied it after all (the branch head, or the
    newest pull request, holds exactly the build); None when it did not. One try per read: this runs between
    the commit's own retries, which must not multiply."""
    repo = target.repo_id
    if target.create_pr:
        return _landed_pull_request(api, target, local)
    _, head = branch_head(api, repo, target.revision, retry=False)
    if head is None or head == parent:
        return None
    if not matches(local, list_files(api, repo, head)):
        return None
    log.warning(
        "the Hub applied the commit although its answer was lost: %s is at %s", target.label, head[:12]
    )
    return Published(head, f"{api.endpoint}/{repo}/commit/{head}")


def _landed_pull_request(api: Any, target: Target, local: Files) -> Published | None:
    repo = target.repo_id
    refs = call("repo info", repo, lambda: api.list_repo_refs(repo, include_pull_requests=True), retry=False)
    pulls = sorted(refs.pull_requests or [], key=lambda r: int(r.name.rsplit("/", 1)[-1]))
    if not pulls or not matches(local, list_files(api, repo, pulls[-1].target_commit)):
        return None
    number, sha = pulls[-1].name.rsplit("/", 1)[-1], pulls[-1].target_commit
    return Published(
        sha, f"{api.endpoint}/{repo}/commit/{sha}", f"{api.endpoint}/{repo}/discussions/{number}"
    )
