"""`hubsync push` and `hubsync status`: publish a verified build as one commit, uploading only what changed.

The push is one `create_commit` of explicit operations guarded by `parent_commit`, so the repo moves from one
complete state to the next or not at all. Files whose sha256 already matches the remote are skipped; a shard
that is byte-identical to a shard of the pinned base revision is copied server-side from the base repo when the
Hub can (the base serves a `xetHash` for it), else uploaded. Every Hub call is retried a bounded number of times
for a bounded time, and every failure ends in one line naming the step (see `calls`). A repo or branch created
by a push that then fails for good is deleted again, so a failed push leaves nothing behind.

The package follows the push: `plan` (pure: what to add, copy, delete), `remote` (what the Hub holds),
`commit` (create, upload, commit, tag), `calls` (retries and one-line failures), `status`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubsync.errors import PushError
from hubsync.push.calls import HubFailure, call, hub_api
from hubsync.push.commit import Progress, apply_tag, check_tag, publish
from hubsync.push.folder import find_build, git_blob_sha1, local_files
from hubsync.push.plan import Files, PushPlan, Target, plan_push
from hubsync.push.remote import Published, base_files, read_state
from hubsync.push.status import render_status, status
from hubsync.record import BuildRecord, hash_files, load, verification_gate

__all__ = [
    "PushPlan",
    "PushResult",
    "find_build",
    "git_blob_sha1",
    "plan_push",
    "push",
    "render_status",
    "status",
]

log = logging.getLogger("hubsync")


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_url: str | None = None  # also when up to date: the commit the branch is at
    commit_sha: str | None = None
    pr_url: str | None = None
    repo_url: str | None = None
    up_to_date: bool = False
    bytes_uploaded: int = 0  # bytes of the files handed to huggingface_hub for upload (see docs/push.md)
    bytes_copied: int = 0
    bytes_in_build: int = 0
    uploaded: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    changed_since_verification: list[str] = field(default_factory=list)
    tag: str | None = None
    created_repo: bool = False
    created_branch: bool = False
    notes: list[str] = field(default_factory=list)  # one line each: fallbacks taken, files pushed unverified

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def push(target: Path | None, *, skip_verify_check: bool = False, quiet: bool = False) -> PushResult:
    """Publish the build as one commit; see the module docstring for the guarantees."""
    folder = find_build(target)
    record, current, stale = _checked_build(folder, skip_verify_check=skip_verify_check)
    spec = record.push_settings
    if spec is None:
        raise PushError("the manifest has no `push:` section: add `push: {repo: owner/name}` and build again")
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    local = local_files(folder, current)
    if skip_verify_check:
        local["README.md"] = _skip_card(record, local.get("README.md"))
    target_spec = Target.from_spec(spec)
    result = PushResult(repo_id=target_spec.repo_id, revision=target_spec.revision)
    if stale:
        _note(
            result,
            f"--skip-verify-check: {len(stale)} file(s) changed since verification, pushed as they "
            f"are now: {', '.join(stale)}",
        )
        result.changed_since_verification = stale
    return _publish(folder, record, local, target_spec, result)


def _checked_build(folder: Path, *, skip_verify_check: bool) -> tuple[BuildRecord, dict[str, str], list[str]]:
    """The record, every file's sha256 hashed now (through the verification gate, or, skipping it, straight
    from the files: a record is never trusted for what the files hold), and, when skipping, the files that
    differ from what the verification covered."""
    if not skip_verify_check:
        record, current = verification_gate(folder)
        return record, current, []
    record = load(folder)
    log.warning("--skip-verify-check: pushing without checking the verification; the card says so")
    current = hash_files(folder)
    covered = record.verification.files_sha256 if record.verification else {}
    stale = sorted(p for p, sha in current.items() if p != "README.md" and covered.get(p) != sha)
    return record, current, stale if record.verification else []


def _note(result: PushResult, text: str) -> None:
    log.warning("%s", text)
    result.notes.append(text)


def _check_token(api: Any, repo_id: str) -> None:
    from huggingface_hub import get_token

    if not api.token and not get_token():
        raise PushError("no Hugging Face token: set HF_TOKEN (a write token) or run `hf auth login`")
    try:
        me = call("whoami", repo_id, api.whoami)
    except HubFailure as failure:
        if failure.status == 401:
            raise PushError(
                "the Hugging Face token was refused (401): set HF_TOKEN to a valid write token"
            ) from None
        raise
    names = {me.get("name")} | {o.get("name") for o in me.get("orgs", []) if isinstance(o, dict)}
    if repo_id.split("/")[0] not in names:
        raise PushError(
            f"you are logged in as {me.get('name')}, who cannot write to {repo_id}: push to your own namespace "
            f"or an org you belong to ({', '.join(sorted(n for n in names if n))})"
        )


def _publish(
    folder: Path, record: BuildRecord, local: Files, target: Target, result: PushResult
) -> PushResult:
    api = hub_api()
    result.bytes_in_build = sum(i["size"] for i in local.values())
    result.repo_url = f"{api.endpoint}/{target.repo_id}"
    try:
        _check_token(api, target.repo_id)
        state = read_state(api, target)
        plan = plan_push(local, state.files, base_files(api, record))
    except HubFailure as failure:
        raise failure.with_outcome("; nothing was published") from failure.cause
    result.unchanged = list(plan.unchanged)
    if plan.no_xet:
        _note(
            result,
            f"{len(plan.no_xet)} shard(s) identical to the base are uploaded: the base serves them "
            "without a xetHash, so the Hub cannot copy them server-side",
        )
    check_tag(target, state, commits=not plan.empty)
    if plan.empty and state.head is not None:
        result.up_to_date = True
        _record_commit(result, Published(state.head, f"{result.repo_url}/commit/{state.head}"))
    else:
        progress = Progress()
        published = publish(api, folder, record, local, plan, target, state, progress)
        result.created_repo, result.created_branch = progress.repo, progress.branch
        result.up_to_date = plan.empty
        _record_commit(result, published)
        _record_files(result, plan, local, progress)
    if result.commit_sha:
        result.tag = apply_tag(api, target, state, result.commit_sha)
    return result


def _record_commit(result: PushResult, published: Published) -> None:
    result.commit_sha, result.commit_url, result.pr_url = (
        published.commit_sha,
        published.commit_url,
        published.pr_url,
    )


def _record_files(result: PushResult, plan: PushPlan, local: Files, progress: Progress) -> None:
    copied = [p for p in plan.copy if p not in progress.uploaded_instead]
    result.uploaded = sorted([*plan.add, *progress.uploaded_instead])
    result.copied, result.deleted = copied, list(plan.delete)
    result.notes += progress.notes
    result.bytes_uploaded = sum(local[p]["size"] for p in result.uploaded)
    result.bytes_copied = sum(local[p]["size"] for p in copied)


def _skip_card(record: BuildRecord, current: dict[str, Any] | None) -> dict[str, Any]:
    """The card with the --skip-verify-check warning, uploaded instead of the local README.md."""
    if not record.card_inputs:
        return current or {}
    from hubsync.card import CardInputs, render_card

    verification = None if record.verification is None else record.verification.to_json()
    inputs = CardInputs.from_record(record.card_inputs, verification=verification, skip_verify_check=True)
    text = render_card(inputs).encode()
    return {
        "sha256": hashlib.sha256(text).hexdigest(),
        "size": len(text),
        "content": text,
        "blob": hashlib.sha1(b"blob %d\0" % len(text) + text).hexdigest(),
    }
