"""`hubsync push` and `hubsync status`: publish a verified build as one commit, uploading only what changed.

The push is one `create_commit` of explicit operations guarded by `parent_commit`, so the repo moves from one
complete state to the next or not at all. Files whose sha256 already matches the remote are skipped; a shard
that is byte-identical to a shard of the pinned base revision is copied server-side from the base repo (no
upload). LFS uploads happen before the commit and are retried with backoff; the server keeps what it
received, so a retry never sends a finished upload again. A repo created by a push that then fails for good
is deleted again, so a failed first push leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from hubsync.errors import PushError
from hubsync.record import BuildRecord, hash_files, last_build, load, verification_gate

log = logging.getLogger("hubsync")
RETRIES = 5
R = TypeVar("R")


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_url: str | None = None
    commit_sha: str | None = None
    pr_url: str | None = None
    repo_url: str | None = None
    up_to_date: bool = False
    bytes_uploaded: int = 0
    bytes_copied: int = 0
    bytes_in_build: int = 0
    uploaded: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    tag: str | None = None
    created_repo: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def find_build(target: Path | None) -> Path:
    """The build folder: the manifest's output.dir, a build folder, or the last build made from this directory."""
    if target is None:
        last = last_build()
        if last is None:
            raise PushError(
                "no build recorded in this directory: run `hubsync build MANIFEST` first, or pass the manifest"
            )
        return last.output
    if target.is_dir():
        return target
    from hubsync.manifest import load_manifest

    return load_manifest(target).output.dir


def _api() -> Any:
    from hubsync.resolve import offline

    if offline():
        raise PushError(
            "HF_HUB_OFFLINE=1 is set, and talking to the Hub needs the network: unset HF_HUB_OFFLINE"
        )
    from huggingface_hub import HfApi

    return HfApi()


def _status_of(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _is_transient(err: BaseException) -> bool:
    # huggingface_hub wraps a failed LFS upload in a RuntimeError whose cause is the HTTP error.
    cause = err.__cause__ or err.__context__
    if isinstance(err, RuntimeError) and cause is not None and cause is not err:
        return _is_transient(cause)
    status = _status_of(err)
    if status is not None:
        return status == 429 or status >= 500
    name = type(err).__name__
    return isinstance(err, (ConnectionError, TimeoutError, OSError)) or name in (
        "ConnectError",
        "ReadError",
        "RemoteProtocolError",
        "ReadTimeout",
        "ConnectTimeout",
        "WriteError",
    )


def _retry_after(err: BaseException, attempt: int) -> float:
    response = getattr(err, "response", None)
    header = getattr(response, "headers", {}).get("Retry-After") if response is not None else None
    try:
        return min(float(header), 60.0) if header is not None else min(0.5 * 2**attempt, 30.0)
    except ValueError:
        return min(0.5 * 2**attempt, 30.0)


def with_retries(what: str, call: Callable[[], R], *, sleep: Callable[[float], None] | None = None) -> R:
    """Retry a Hub call on 429 (honouring Retry-After), 5xx and dropped connections, with backoff."""
    for attempt in range(RETRIES + 1):
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - classified below
            if attempt == RETRIES or not _is_transient(err):
                raise
            delay = _retry_after(err, attempt)
            log.warning("%s: transient error (%s); retrying in %.1fs", what, _describe(err), delay)
            (sleep or time.sleep)(delay)
    raise AssertionError("unreachable")


def _describe(err: BaseException) -> str:
    status = _status_of(err)
    return f"HTTP {status}" if status is not None else type(err).__name__


def git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_token(api: Any, repo_id: str) -> dict[str, Any]:
    from huggingface_hub.errors import HfHubHTTPError

    if not api.token and not _saved_token():
        raise PushError("no Hugging Face token: set HF_TOKEN (a write token) or run `hf auth login`")
    try:
        me = with_retries("whoami", api.whoami)
    except HfHubHTTPError as err:
        if _status_of(err) == 401:
            raise PushError(
                "the Hugging Face token was refused (401): set HF_TOKEN to a valid write token"
            ) from None
        raise
    names = {me.get("name")} | {o.get("name") for o in me.get("orgs", []) if isinstance(o, dict)}
    owner = repo_id.split("/")[0]
    if owner not in names:
        raise PushError(
            f"you are logged in as {me.get('name')}, who cannot write to {repo_id}: push to your own namespace "
            f"or an org you belong to ({', '.join(sorted(n for n in names if n))})"
        )
    return dict(me)


def _saved_token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def _remote_files(api: Any, repo_id: str, revision: str) -> dict[str, dict[str, Any]]:
    """path -> {"sha256" (LFS) or "blob" (git sha1), "size"} at `revision`."""
    from huggingface_hub.hf_api import RepoFile

    files: dict[str, dict[str, Any]] = {}
    entries = with_retries(
        "list files", lambda: list(api.list_repo_tree(repo_id, revision=revision, recursive=True))
    )
    for entry in entries:
        if isinstance(entry, RepoFile):
            lfs = entry.lfs
            files[entry.path] = {
                "sha256": lfs.sha256 if lfs else None,
                "blob": entry.blob_id,
                "size": entry.size,
            }
    return files


@dataclass(frozen=True)
class PushPlan:
    """What a push will do, decided from local and remote file lists alone."""

    add: tuple[str, ...]
    copy: tuple[str, ...]
    delete: tuple[str, ...]
    unchanged: tuple[str, ...]


def plan_push(
    local: dict[str, dict[str, Any]],
    remote: dict[str, dict[str, Any]],
    base_shards: dict[str, str],
    base_remote: dict[str, dict[str, Any]],
) -> PushPlan:
    """Pure: local files (path -> sha256, size, blob) against the remote's and the base repo's."""
    add, copy, unchanged = [], [], []
    for path, info in sorted(local.items()):
        theirs = remote.get(path)
        if theirs is not None and (
            theirs.get("sha256") == info["sha256"] or theirs.get("blob") == info.get("blob")
        ):
            unchanged.append(path)
        elif path in base_shards and (base_remote.get(path) or {}).get("sha256") == info["sha256"]:
            copy.append(path)
        else:
            add.append(path)
    delete = sorted(p for p in remote if p not in local and p != ".gitattributes")
    return PushPlan(tuple(add), tuple(copy), tuple(delete), tuple(unchanged))


def push(target: Path | None, *, skip_verify_check: bool = False, quiet: bool = False) -> PushResult:
    """Publish the build as one commit; see the module docstring for the guarantees."""
    folder = find_build(target)
    record, current = _checked_build(folder, skip_verify_check=skip_verify_check)
    spec = record.push_settings
    if spec is None:
        raise PushError("the manifest has no `push:` section: add `push: {repo: owner/name}` and build again")
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    local = _local_files(folder, current)
    if skip_verify_check:
        local["README.md"] = _skip_card(record, local.get("README.md"))
    return _publish(folder, record, local, _Target.from_spec(spec))


def _checked_build(folder: Path, *, skip_verify_check: bool) -> tuple[BuildRecord, dict[str, str]]:
    """The record and every file's sha256, hashed now: through the verification gate, or, skipping it,
    straight from the files (a record is never trusted for what the files hold)."""
    if not skip_verify_check:
        return verification_gate(folder)
    record = load(folder)
    log.warning("--skip-verify-check: pushing without checking the verification; the card says so")
    return record, hash_files(folder)


def _local_files(folder: Path, current: dict[str, str]) -> dict[str, dict[str, Any]]:
    from hubsync.fsio import list_files
    from hubsync.tensors import sha256_file

    local = {}
    for rel in list_files(folder):
        path = folder / rel
        size = path.stat().st_size
        local[rel] = {
            "sha256": current.get(rel) or sha256_file(path),  # the record itself is not in `current`
            "size": size,
            "blob": git_blob_sha1(path) if size < 10_000_000 else None,
        }
    return local


@dataclass(frozen=True)
class _Target:
    repo_id: str
    revision: str
    create_pr: bool
    private: bool
    tag: str | None

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> _Target:
        return cls(
            repo_id=str(spec["repo"]),
            revision=str(spec.get("revision") or "main"),
            create_pr=bool(spec.get("create_pr")),
            private=bool(spec.get("private", True)),
            tag=spec.get("tag"),
        )


@dataclass
class _RemoteState:
    exists: bool
    parent: str | None  # the branch head, None when the repo or the branch does not exist yet
    files: dict[str, dict[str, Any]]


def _remote_state(api: Any, target: _Target) -> _RemoteState:
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        with_retries("repo info", lambda: api.repo_info(target.repo_id))
    except RepositoryNotFoundError:
        return _RemoteState(False, None, {})
    try:
        parent = with_retries(
            "branch head", lambda: api.repo_info(target.repo_id, revision=target.revision).sha
        )
    except RevisionNotFoundError:
        return _RemoteState(True, None, {})
    return _RemoteState(True, parent, _remote_files(api, target.repo_id, parent))


def _base_remote(api: Any, record: BuildRecord) -> dict[str, dict[str, Any]]:
    from huggingface_hub.errors import HfHubHTTPError

    if not record.base_shards() or not record.base.repo or not record.base.sha:
        return {}
    try:
        return _remote_files(api, record.base.repo, record.base.sha)
    except HfHubHTTPError as err:
        log.warning(
            "cannot list the base repo for server-side copies (%s): uploading instead", _describe(err)
        )
        return {}


def _publish(
    folder: Path, record: BuildRecord, local: dict[str, dict[str, Any]], target: _Target
) -> PushResult:
    api = _api()
    _check_token(api, target.repo_id)
    result = PushResult(repo_id=target.repo_id, revision=target.revision)
    result.bytes_in_build = sum(i["size"] for i in local.values())
    state = _remote_state(api, target)
    plan = plan_push(local, state.files, record.base_shards(), _base_remote(api, record))
    result.unchanged = list(plan.unchanged)
    result.repo_url = f"{api.endpoint}/{target.repo_id}"
    if not plan.add and not plan.copy and not plan.delete and state.exists and state.parent:
        result.up_to_date = True
        result.commit_sha = state.parent
        _maybe_tag(api, target.repo_id, target.tag, state.parent, result)
        return result
    info = _commit_guarded(api, folder, record, local, plan, target, state, result)
    result.commit_url = info.commit_url
    result.commit_sha = info.oid
    result.pr_url = info.pr_url
    result.uploaded, result.copied, result.deleted = list(plan.add), list(plan.copy), list(plan.delete)
    result.bytes_uploaded = sum(local[p]["size"] for p in plan.add)
    result.bytes_copied = sum(local[p]["size"] for p in plan.copy)
    if not target.create_pr:
        _maybe_tag(api, target.repo_id, target.tag, info.oid, result)
    return result


def _operations(
    folder: Path, record: BuildRecord, local: dict[str, dict[str, Any]], plan: PushPlan
) -> list[Any]:
    from huggingface_hub import CommitOperationAdd, CommitOperationCopy, CommitOperationDelete

    ops: list[Any] = []
    for path in plan.add:
        data = local[path].get("content")
        ops.append(
            CommitOperationAdd(
                path_in_repo=path, path_or_fileobj=data if data is not None else str(folder / path)
            )
        )
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


def _commit_guarded(
    api: Any,
    folder: Path,
    record: BuildRecord,
    local: dict[str, dict[str, Any]],
    plan: PushPlan,
    target: _Target,
    state: _RemoteState,
    result: PushResult,
) -> Any:
    """Create what is missing, upload, commit; on failure undo what this push created and say why in one line."""
    from huggingface_hub.errors import HfHubHTTPError

    created_branch = False
    try:
        parent = state.parent
        if not state.exists:
            with_retries(
                "create repo",
                lambda: api.create_repo(target.repo_id, private=target.private, exist_ok=True),
            )
            result.created_repo = True
        elif parent is None and not target.create_pr:
            parent = _create_branch(api, target)
            created_branch = True
        return _upload_and_commit(
            api, _operations(folder, record, local, plan), record, target, parent, result
        )
    except HfHubHTTPError as err:
        _rollback(api, target.repo_id, result.created_repo, target.revision if created_branch else None)
        raise _push_failure(err, target) from None
    except BaseException as err:
        _rollback(api, target.repo_id, result.created_repo, target.revision if created_branch else None)
        if isinstance(err, Exception) and _is_transient(err):
            raise _push_failure(err, target) from None
        raise


def _create_branch(api: Any, target: _Target) -> str:
    main_head: str = api.repo_info(target.repo_id).sha
    with_retries(
        "create branch", lambda: api.create_branch(target.repo_id, branch=target.revision, revision=main_head)
    )
    return main_head


def _upload_and_commit(
    api: Any,
    operations: list[Any],
    record: BuildRecord,
    target: _Target,
    parent: str | None,
    result: PushResult,
) -> Any:
    from huggingface_hub import CommitOperationAdd

    additions = [op for op in operations if isinstance(op, CommitOperationAdd)]
    if additions:
        with_retries(
            "upload",
            lambda: api.preupload_lfs_files(
                target.repo_id,
                additions=additions,
                revision=target.revision if not target.create_pr else None,
                create_pr=target.create_pr,
            ),
        )
    return with_retries(
        "commit",
        lambda: api.create_commit(
            target.repo_id,
            operations=operations,
            commit_message=_commit_message(record),
            commit_description=_commit_description(record),
            revision=target.revision,
            create_pr=target.create_pr,
            parent_commit=parent if (parent and not result.created_repo) else None,
        ),
    )


def _push_failure(err: BaseException, target: _Target) -> PushError:
    status = _status_of(err)
    if status == 412 or "parent" in str(err).lower() and status in (409, 412):
        return PushError(
            f"{target.repo_id}@{target.revision} moved while pushing (someone else committed): "
            "run `hubsync status` and push again"
        )
    if status == 403:
        return PushError(
            f"the token cannot write to {target.repo_id} (403): use a write token for that namespace"
        )
    return PushError(
        f"the push to {target.repo_id} failed ({_describe(err)}) after {RETRIES} retries; the repo is unchanged: "
        "run `hubsync push` again later"
    )


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


def _rollback(api: Any, repo_id: str, created_repo: bool, created_branch: str | None) -> None:
    """Undo what this push created, so a failed push leaves the Hub as it found it."""
    try:
        if created_repo:
            api.delete_repo(repo_id, missing_ok=True)
        elif created_branch:
            api.delete_branch(repo_id, branch=created_branch)
    except Exception as err:  # noqa: BLE001 - the original error matters more
        log.warning(
            "could not undo the repo/branch this push created (%s): delete it by hand", _describe(err)
        )


def _maybe_tag(api: Any, repo_id: str, tag: str | None, commit: str, result: PushResult) -> None:
    from huggingface_hub.errors import HfHubHTTPError

    if not tag:
        return
    refs = with_retries("list refs", lambda: api.list_repo_refs(repo_id))
    existing = {t.name: t.target_commit for t in refs.tags}
    if existing.get(tag) == commit:
        result.tag = tag
        return
    if tag in existing:
        raise PushError(
            f"tag {tag} already exists on another commit of {repo_id}: choose another `push.tag`"
        )
    try:
        with_retries("tag", lambda: api.create_tag(repo_id, tag=tag, revision=commit))
    except HfHubHTTPError as err:
        raise PushError(
            f"the commit is published but tag {tag} could not be created ({_describe(err)}): "
            "create it by hand or push again"
        ) from None
    result.tag = tag


def _commit_message(record: BuildRecord) -> str:
    return f"hubsync: build from {record.base.label} ({record.manifest_file})"


def _commit_description(record: BuildRecord) -> str:
    base = record.base
    tuned = ", ".join(str(p.get("prefix", "")) for p in record.prefixes)
    lines = [
        f"Base: {base.repo} at {base.sha}" if base.repo else "Base: a local folder",
        f"Tuned: {tuned or 'nothing'}",
        f"Manifest: {record.manifest_file}",
        f"Build: {record.content_id}",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ status


def status(target: Path | None) -> dict[str, Any]:
    """Has the base's branch or tag moved? Does the local build differ from the remote? Last pushed commit."""
    folder = find_build(target)
    record = load(folder)
    api = _api()
    out: dict[str, Any] = {"build": str(folder)}
    if record.base.repo:
        out["base"] = _base_status(api, record)
    spec = record.push_settings
    if spec is not None:
        out["remote"] = _remote_status(api, folder, _Target.from_spec(spec))
    return out


def _base_status(api: Any, record: BuildRecord) -> dict[str, Any]:
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    repo, pinned, revision = str(record.base.repo), record.base.sha, record.base.revision
    try:
        head = with_retries("base head", lambda: api.repo_info(repo, revision=revision).sha)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        head = None
    moved = head is not None and head != pinned
    changed: list[str] = []
    if moved and pinned:
        old, new = _remote_files(api, repo, pinned), _remote_files(api, repo, head)
        changed = sorted(p for p in set(old) | set(new) if old.get(p) != new.get(p))
    return {
        "repo": repo,
        "revision": revision,
        "pinned": pinned,
        "head": head,
        "moved": moved,
        "changed_files": changed,
    }


def _remote_status(api: Any, folder: Path, target: _Target) -> dict[str, Any]:
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    local = _local_files(folder, hash_files(folder))
    try:
        head = with_retries("repo head", lambda: api.repo_info(target.repo_id, revision=target.revision).sha)
        remote = _remote_files(api, target.repo_id, head)
        commits = with_retries(
            "commits", lambda: api.list_repo_commits(target.repo_id, revision=target.revision)
        )
        last = (
            {"id": commits[0].commit_id, "title": commits[0].title, "date": commits[0].created_at.isoformat()}
            if commits
            else None
        )
    except (RepositoryNotFoundError, RevisionNotFoundError):
        remote, last, head = {}, None, None
    plan = plan_push(local, remote, {}, {})
    return {
        "repo": target.repo_id,
        "revision": target.revision,
        "exists": head is not None,
        "head": head,
        "last_commit": last,
        "added": [p for p in plan.add if p not in remote],
        "changed": [p for p in plan.add if p in remote],
        "deleted": list(plan.delete),
        "in_sync": not plan.add and not plan.delete and head is not None,
    }


def render_status(data: dict[str, Any]) -> str:
    lines = [f"build   {data['build']}"]
    base = data.get("base")
    if base:
        if base["head"] is None:
            lines.append(f"base    {base['repo']}@{base['revision']}: cannot be resolved any more")
        elif base["moved"]:
            lines.append(
                f"base    {base['repo']}@{base['revision']} MOVED: pinned {base['pinned'][:12]}, now "
                f"{base['head'][:12]}; changed there: {', '.join(base['changed_files']) or '(nothing)'}"
            )
        else:
            lines.append(
                f"base    {base['repo']}@{base['revision']} still at the pinned {base['pinned'][:12]}"
            )
    remote = data.get("remote")
    if remote:
        if not remote["exists"]:
            lines.append(
                f"remote  {remote['repo']}@{remote['revision']} does not exist yet: `hubsync push` creates it"
            )
        elif remote["in_sync"]:
            lines.append(f"remote  {remote['repo']}@{remote['revision']} matches the build")
        else:
            lines.append(
                f"remote  {remote['repo']}@{remote['revision']} differs: added {remote['added']}, changed "
                f"{remote['changed']}, deleted {remote['deleted']}"
            )
        if remote.get("last_commit"):
            c = remote["last_commit"]
            lines.append(f"last    {c['id'][:12]} {c['title']} ({c['date']})")
    return "\n".join(lines)
