"""Publishing a planned push: create what is missing, upload, one commit guarded by its parent, then the tag.

- The commit names the head it was planned against (`parent_commit`), also on a repo or branch this push just
  created, so that a commit can never land on a tree it was not compared with.
- A commit whose answer is lost (a dropped connection, a 5xx after the Hub applied it) is never retried
  blindly: the branch head is read first, and a head holding exactly the build is this push's commit.
- Server-side copies the Hub refuses (no `xetHash` after all, another storage region, a source the token cannot
  read) are uploaded instead, in the same single commit, and the push says so in one line.
- A push that fails for good deletes the repo or branch it created, so it leaves the Hub as it found it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubsync.errors import PushError
from hubsync.push.calls import HubFailure, call, describe, hub_cause, is_transient, status_of, step_of
from hubsync.push.plan import Files, PushPlan, Target
from hubsync.push.remote import Published, RemoteState, branch_head, landed, read_tags
from hubsync.record import BuildRecord

log = logging.getLogger("hubsync")


@dataclass
class Progress:
    """What a push did on its way: what it created (undone if it fails), the copies it uploaded instead."""

    repo: bool = False
    branch: bool = False
    uploaded_instead: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)


class _CopyRefused(Exception):
    """The Hub would not copy the shards server-side; `reason` says why in a few words."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def publish(
    api: Any,
    folder: Path,
    record: BuildRecord,
    local: Files,
    plan: PushPlan,
    target: Target,
    state: RemoteState,
    progress: Progress,
) -> Published:
    """Create the repo or branch if needed, upload, commit; on failure undo what was created and say so."""
    try:
        parent = _prepare_ref(api, target, state, progress)
        if plan.empty:  # a new branch whose starting point already holds the build
            return Published(str(parent), f"{api.endpoint}/{target.repo_id}/commit/{parent}")
        operations = _operations(folder, record, local, plan)
        upload(api, target, operations)
        return _commit(api, folder, record, operations, target, parent, local, progress)
    except BaseException as err:
        undone = _rollback(api, target, progress)
        if isinstance(err, HubFailure):
            raise err.with_outcome(undone) from err.cause
        raise


def _prepare_ref(api: Any, target: Target, state: RemoteState, created: Progress) -> str | None:
    """The commit the push builds on, after creating the repo or the branch it needs."""
    parent = state.start
    if not state.exists:
        call(
            "create repo",
            target.repo_id,
            lambda: api.create_repo(target.repo_id, private=target.private, exist_ok=True),
        )
        created.repo = True
        # the Hub gives a new repo an initial commit: build on it, guarded like any other commit
        parent = branch_head(api, target.repo_id, "main")[1]
    needs_branch = target.revision != "main" and not target.create_pr and (state.new_branch or created.repo)
    if not needs_branch:
        return parent
    call(
        "create branch",
        target.repo_id,
        lambda: api.create_branch(target.repo_id, branch=target.revision, revision=parent, exist_ok=False),
    )
    created.branch = True
    return parent


def _operations(folder: Path, record: BuildRecord, local: Files, plan: PushPlan) -> list[Any]:
    from huggingface_hub import CommitOperationAdd, CommitOperationCopy, CommitOperationDelete

    ops: list[Any] = []
    for path in plan.add:
        data = local[path].get("content")
        source = data if data is not None else str(folder / path)
        ops.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=source))
    for path in plan.copy:
        ops.append(
            CommitOperationCopy(
                src_path_in_repo=path,
                path_in_repo=path,
                src_revision=record.base.sha,
                src_repo_id=record.base.repo,
                src_repo_type="model",
            )
        )
    ops += [CommitOperationDelete(path_in_repo=p) for p in plan.delete]
    return ops


def upload(api: Any, target: Target, operations: list[Any]) -> None:
    """Upload the LFS files before the commit (huggingface_hub retries these transfers itself)."""
    from huggingface_hub import CommitOperationAdd

    additions = [op for op in operations if isinstance(op, CommitOperationAdd)]
    if not additions:
        return
    call(
        "upload",
        target.repo_id,
        lambda: api.preupload_lfs_files(
            target.repo_id,
            additions=additions,
            revision=None if target.create_pr else target.revision,
            create_pr=target.create_pr,
        ),
        retry=False,
    )


def _commit(
    api: Any,
    folder: Path,
    record: BuildRecord,
    operations: list[Any],
    target: Target,
    parent: str | None,
    local: Files,
    progress: Progress,
) -> Published:
    """The commit; copies the Hub refuses become uploads in the same, single commit."""
    from huggingface_hub import CommitOperationAdd, CommitOperationCopy

    try:
        return _commit_once(api, record, operations, target, parent, local)
    except _CopyRefused as refused:
        copies = [op for op in operations if isinstance(op, CommitOperationCopy)]
        note = (
            f"the Hub would not copy {len(copies)} shard(s) server-side from {record.base.repo} "
            f"({refused.reason}): uploaded them instead, in the same commit"
        )
        log.warning("%s", note)
        progress.notes.append(note)
        progress.uploaded_instead = tuple(op.path_in_repo for op in copies)
        uploads = [CommitOperationAdd(op.path_in_repo, str(folder / op.path_in_repo)) for op in copies]
        upload(api, target, uploads)
        rest = [op for op in operations if not isinstance(op, CommitOperationCopy)]
        return _commit_once(api, record, rest + uploads, target, parent, local)


def _commit_once(
    api: Any, record: BuildRecord, operations: list[Any], target: Target, parent: str | None, local: Files
) -> Published:
    def attempt() -> Published:
        try:
            info = api.create_commit(
                target.repo_id,
                operations=operations,
                commit_message=commit_message(record),
                commit_description=commit_description(record),
                revision=target.revision,
                create_pr=target.create_pr,
                parent_commit=parent,
            )
        except Exception as err:
            _raise_if_copy_refused(err)
            raise
        return Published(info.oid, info.commit_url, info.pr_url)

    def recover(_: BaseException) -> Published | None:
        return _landed_or_none(api, target, parent, local)

    try:
        return call("commit", target.repo_id, attempt, recover=recover)
    except HubFailure as failure:
        # the last attempt may have landed too, and a 412 may be our own earlier attempt
        lost = failure.status == 412 or (failure.step == "commit" and is_transient(failure.cause))
        found = _landed_or_none(api, target, parent, local) if lost else None
        if found is not None:
            return found
        if failure.status == 412:
            raise PushError(
                f"{target.label} moved while pushing (someone else committed): "
                "run `hubsync status` and push again"
            ) from failure.cause
        raise


def _landed_or_none(api: Any, target: Target, parent: str | None, local: Files) -> Published | None:
    try:
        return landed(api, target, parent, local)
    except (
        HubFailure
    ):  # cannot tell now: a retry's parent guard keeps it safe, and the original failure stands
        return None


def _raise_if_copy_refused(err: Exception) -> None:
    """Turn a refused server-side copy (huggingface_hub's errors for it, or a 4xx on the copy's own requests)
    into `_CopyRefused`; anything else is left to the caller."""
    from huggingface_hub.errors import FileDuplicationError

    if isinstance(err, FileDuplicationError):
        reasons = [line.split(": ", 1)[-1] for line in str(err).splitlines()[1:]]
        raise _CopyRefused(reasons[0] if reasons else "the duplicate request failed") from None
    if isinstance(err, ValueError) and "xet hash" in str(err):
        raise _CopyRefused("the base serves them without a xetHash") from None
    cause = hub_cause(err)
    refused = cause is not None and status_of(cause) is not None and not is_transient(cause)
    if cause is not None and refused and step_of(cause, "commit") == "duplicate":
        raise _CopyRefused(describe(cause)) from None


def _rollback(api: Any, target: Target, created: Progress) -> str:
    """Undo what this push created; returns what the repo is left as, for the error line."""
    try:
        if created.repo:
            api.delete_repo(target.repo_id, missing_ok=True)
            return "; the repo it had created was deleted again, nothing was published"
        if created.branch:
            api.delete_branch(target.repo_id, branch=target.revision)
            return "; the branch it had created was deleted again, nothing was published"
    except Exception as err:  # noqa: BLE001 - the original failure is the one to report
        log.warning("could not undo what this push created (%s): delete it by hand", describe(err))
        return "; the repo or branch it created is still there, without the build"
    return "; nothing was published"


# ------------------------------------------------------------------------------------------------ tags


def check_tag(target: Target, state: RemoteState, *, commits: bool) -> None:
    """Before anything is published: a tag already on the commit being pushed is fine; on another commit it is
    a refusal, unless `push.tag_move` allows moving it."""
    tag = target.tag
    if not tag or target.create_pr or tag not in state.tags:
        return
    at = state.tags[tag]
    if (not commits and at == state.head) or target.tag_move:
        return
    raise PushError(
        f"tag {tag} is on commit {at[:12]} of {target.repo_id}, not on the commit this push publishes: choose "
        "another `push.tag`, or set `push.tag_move: true` to move it"
    )


def apply_tag(api: Any, target: Target, state: RemoteState, commit: str) -> str | None:
    """Tag `commit` (moving the tag when allowed and needed); returns the tag, or None when there is none."""
    tag = target.tag
    if not tag or target.create_pr:
        return None
    if state.tags.get(tag) == commit:
        return tag
    try:
        if tag in state.tags:
            _delete_tag(api, target, tag)
            log.warning("moving tag %s from %s to %s (push.tag_move)", tag, state.tags[tag][:12], commit[:12])
        call("tag", target.repo_id, lambda: api.create_tag(target.repo_id, tag=tag, revision=commit))
    except HubFailure as failure:
        # 409: an earlier attempt whose answer was lost may have made it
        if failure.status != 409 or read_tags(api, target.repo_id).get(tag) != commit:
            raise failure.with_outcome(f"; commit {commit[:12]} is published but not tagged {tag}") from None
    return tag


def _delete_tag(api: Any, target: Target, tag: str) -> None:
    try:
        call("tag", target.repo_id, lambda: api.delete_tag(target.repo_id, tag=tag))
    except HubFailure as failure:
        if failure.status != 404:  # 404: an earlier attempt whose answer was lost deleted it
            raise


# ------------------------------------------------------------------------------------------------ message


def commit_message(record: BuildRecord) -> str:
    return f"hubsync: build from {record.base.label} ({record.manifest_file})"


def commit_description(record: BuildRecord) -> str:
    base = record.base
    tuned = ", ".join(str(p.get("prefix", "")) for p in record.prefixes)
    lines = [
        f"Base: {base.repo} at {base.sha}" if base.repo else "Base: a local base folder",
        f"Tuned: {tuned or 'nothing'}",
        f"Manifest: {record.manifest_file}",
        f"Build: {record.content_id}",
    ]
    return "\n".join(lines)
