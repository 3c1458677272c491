"""`hubsync status`: has the base's branch or tag moved, does the Hub differ from the build, the last commit there.

A repo the token cannot see and a repo that does not exist look the same from outside: the Hub answers both with
the same 401 (anonymous) or 404 (with a token), on purpose. So unless the token can write to the repo's namespace
(and would see a private repo there), a missing repo is reported as "does not exist, or is private and your
token cannot read it", never as one of the two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hubsync.push.calls import HubFailure, call, hub_api
from hubsync.push.folder import find_build, local_files
from hubsync.push.plan import Target, plan_push
from hubsync.push.remote import branch_head, list_files
from hubsync.record import BuildRecord, hash_files, load

_HIDDEN = "does not exist, or is private and your token cannot read it (the Hub answers both alike)"


def status(target: Path | None) -> dict[str, Any]:
    """Has the base's branch or tag moved? Does the local build differ from the remote? Last pushed commit."""
    folder = find_build(target)
    record = load(folder)
    api = hub_api()
    out: dict[str, Any] = {"build": str(folder)}
    if record.base.repo:
        out["base"] = _base_status(api, record)
    spec = record.push_settings
    if spec is not None:
        out["remote"] = _remote_status(api, folder, Target.from_spec(spec))
    return out


def _base_status(api: Any, record: BuildRecord) -> dict[str, Any]:
    repo, pinned, revision = str(record.base.repo), record.base.sha, str(record.base.revision)
    _, head = branch_head(api, repo, revision)
    moved = head is not None and head != pinned
    changed: list[str] = []
    if head is not None and moved and pinned:
        old, new = list_files(api, repo, pinned), list_files(api, repo, head)
        changed = sorted(p for p in set(old) | set(new) if old.get(p) != new.get(p))
    return {
        "repo": repo,
        "revision": revision,
        "pinned": pinned,
        "head": head,
        "moved": moved,
        "changed_files": changed,
    }


def _remote_status(api: Any, folder: Path, target: Target) -> dict[str, Any]:
    local = local_files(folder, hash_files(folder))
    exists, head = branch_head(api, target.repo_id, target.revision)
    remote = list_files(api, target.repo_id, head) if head is not None else {}
    plan = plan_push(local, remote, {})
    return {
        "repo": target.repo_id,
        "revision": target.revision,
        # None: the Hub will not say whether it exists (missing, or private and unreadable with this token)
        "exists": True if exists else (False if _sees_namespace(api, target.repo_id) else None),
        "branch_exists": head is not None,
        "token": bool(api.token or _saved_token()),
        "head": head,
        "last_commit": _last_commit(api, target.repo_id, head) if head is not None else None,
        "added": [p for p in plan.add if p not in remote],
        "changed": [p for p in plan.add if p in remote],
        "deleted": list(plan.delete),
        "in_sync": head is not None and plan.empty,
    }


def _saved_token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def _sees_namespace(api: Any, repo_id: str) -> bool:
    """True when the token can write to the repo's namespace, so a private repo there would be visible."""
    if not (api.token or _saved_token()):
        return False
    try:
        me = call("whoami", repo_id, api.whoami)
    except HubFailure:
        return False
    names = {me.get("name")} | {o.get("name") for o in me.get("orgs", []) if isinstance(o, dict)}
    return repo_id.split("/")[0] in names


def _last_commit(api: Any, repo_id: str, head: str) -> dict[str, Any] | None:
    commits = call(
        "list commits", repo_id, lambda: api.list_repo_commits(repo_id, revision=head), retry=False
    )
    if not commits:
        return None
    last = commits[0]
    return {"id": last.commit_id, "title": last.title, "date": last.created_at.isoformat()}


def render_status(data: dict[str, Any]) -> str:
    lines = [f"build   {data['build']}"]
    base = data.get("base")
    if base:
        lines.append(_render_base(base))
    remote = data.get("remote")
    if remote:
        lines.append(_render_remote(remote))
        if remote.get("last_commit"):
            c = remote["last_commit"]
            lines.append(f"last    {c['id'][:12]} {c['title']} ({c['date']})")
    return "\n".join(lines)


def _render_base(base: dict[str, Any]) -> str:
    where = f"base    {base['repo']}@{base['revision']}"
    if base["head"] is None:
        return f"{where}: cannot be resolved any more (the repo or the revision is gone, or it is private)"
    if base["moved"]:
        changed = ", ".join(base["changed_files"]) or "(nothing)"
        return (
            f"{where} MOVED: pinned {base['pinned'][:12]}, now {base['head'][:12]}; changed there: {changed}"
        )
    return f"{where} still at the pinned {base['pinned'][:12]}"


def _render_remote(remote: dict[str, Any]) -> str:
    where = f"remote  {remote['repo']}@{remote['revision']}"
    if remote["exists"] is None:
        hint = "" if remote["token"] else "; no token is set: set HF_TOKEN to see private repos"
        return f"{where} {_HIDDEN}{hint}"
    if not remote["exists"]:
        return f"{where} does not exist yet: `hubsync push` creates it"
    if not remote["branch_exists"]:
        return f"{where}: the repo exists but not the branch: `hubsync push` creates it"
    if remote["in_sync"]:
        return f"{where} matches the build"
    return (
        f"{where} differs: added {remote['added']}, changed {remote['changed']}, deleted {remote['deleted']}"
    )
