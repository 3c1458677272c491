"""Push and status when the Hub fails: bounded retries, one line naming the step and the HTTP status, nothing
half-published, and a commit whose answer was lost recognised as the push's own."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from hubsync.errors import PushError
from hubsync.push import push, status
from hubsync.push.calls import HubFailure
from hubsync.testing.hub import LocalHub
from hubsync.testing.models import PublishedModel
from tests.test_push import changed_copy, hubsync, make_build, rebuild


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries without their waits (hubsync's and huggingface_hub's own): the counts are what is tested."""
    monkeypatch.setattr("hubsync.push.calls.time.sleep", lambda s: None)


def assert_files_are(hub: LocalHub, repo_id: str, out: Path) -> None:
    files = hub.list_files(repo_id)
    assert set(files) - {".gitattributes"} == {p.name for p in out.iterdir()} - {".gitattributes"}
    for path in out.iterdir():
        assert files[path.name] == path.read_bytes(), path.name


@pytest.mark.parametrize("kind", ["429", "500", "drop"])
@pytest.mark.parametrize("route", ["lfs-upload", "commit"])
def test_transient_faults_are_retried_to_a_complete_commit(
    kind: str,
    route: str,
    tmp_path: Path,
    hub: LocalHub,
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
    no_backoff: None,
) -> None:
    manifest, out, repo_id = make_build(tmp_path, published_remote_base, remote_trainer_output)
    hub.inject_fault(route, kind=kind, times=2)
    result = push(manifest)
    assert result.commit_sha == hub.branch_head(repo_id)
    assert hub.commit_count(repo_id) == 2
    assert_files_are(hub, repo_id, out)


# (route the fault is on, the step the line names); a 500 on every request of that route
PERSISTENT = [
    ("whoami", "whoami"),
    ("revision", "repo info"),
    ("create-repo", "create repo"),
    ("preupload", "preupload"),
    ("lfs-batch", "LFS upload"),
    ("lfs-upload", "LFS upload"),
    ("commit", "commit"),
]


@pytest.mark.parametrize(("route", "step"), PERSISTENT, ids=[r for r, _ in PERSISTENT])
def test_a_persistent_5xx_at_any_step_is_one_line_and_leaves_nothing(
    route: str,
    step: str,
    tmp_path: Path,
    hub: LocalHub,
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
    no_backoff: None,
) -> None:
    manifest, _, repo_id = make_build(tmp_path, published_remote_base, remote_trainer_output)
    hub.inject_fault(route, kind="500", times=1000)
    with pytest.raises(HubFailure) as caught:
        push(manifest)
    message = caught.value.one_line()
    assert message.startswith(f"{step} failed for {repo_id} (HTTP 500, after 5 retries in "), message
    assert message.endswith(
        "nothing was published: the Hub may be down or overloaded; run the command again later "
        "(it is safe to rerun)"
    ), message
    # hubsync's own retries and huggingface_hub's never multiply: 1 + 5 requests of the failing route
    # (LFS transfers: per object)
    tries = len([r for r in hub.requests(route=route) if r.status == 500])
    assert tries % 6 == 0 and tries <= 6 * 3, tries
    assert not hub.repo_exists(repo_id)


def test_a_persistent_5xx_on_the_duplicate_is_one_line(
    tmp_path: Path,
    hub: LocalHub,
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
    no_backoff: None,
) -> None:
    hub.xet = True
    try:
        manifest, _, repo_id = make_build(tmp_path, published_remote_base, remote_trainer_output)
        hub.inject_fault("lfs-duplicate", kind="500", times=1000)
        with pytest.raises(
            HubFailure, match=rf"^duplicate failed for {repo_id} \(HTTP 500, after 5 retries in "
        ):
            push(manifest)
    finally:
        hub.xet = False
    assert len(hub.requests(route="lfs-duplicate")) == 6
    assert not hub.repo_exists(repo_id)


def test_a_persistent_5xx_on_the_tag_keeps_the_commit_and_says_so(
    tmp_path: Path,
    hub: LocalHub,
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
    no_backoff: None,
) -> None:
    manifest, out, repo_id = make_build(
        tmp_path, published_remote_base, remote_trainer_output, push_spec={"tag": "v1"}
    )
    hub.inject_fault("tag", kind="500", times=6)
    with pytest.raises(HubFailure) as caught:
        push(manifest)
    head = hub.branch_head(repo_id)
    assert head is not None
    assert (
        caught.value.one_line().startswith(f"tag failed for {repo_id} (HTTP 500, after 5 retries in ")
        and f"; commit {head[:12]} is published but not tagged v1: " in caught.value.one_line()
    )
    assert_files_are(hub, repo_id, out)
    again = push(manifest)  # the Hub is back: the rerun only adds the tag
    assert again.up_to_date and again.tag == "v1" and hub.commit_count(repo_id) == 2


def test_status_on_a_failing_hub_is_one_line(
    tmp_path: Path,
    hub: LocalHub,
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
    no_backoff: None,
) -> None:
    manifest, _, _ = make_build(tmp_path, published_remote_base, remote_trainer_output)
    hub.inject_fault("revision", kind="503", times=1000)
    with pytest.raises(
        HubFailure,
        match=rf"^repo info failed for {published_remote_base.repo_id} \(HTTP 503, after 5 retries in ",
    ):
        status(manifest)


def test_a_lost_commit_answer_on_a_new_repo_is_recognised(
    tmp_path: Path,
    hub: LocalHub,
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
    no_backoff: None,
) -> None:
    """The Hub applies the commit and the answer is lost: no second, empty commit, and the tag is made."""
    manifest, out, repo_id = make_build(
        tmp_path, published_remote_base, remote_trainer_output, push_spec={"tag": "v1"}
    )
    hub.inject_fault("commit", kind="apply-drop")
    result = push(manifest)
    assert hub.commit_count(repo_id) == 2 and len(hub.requests(route="commit")) == 1
    assert result.commit_sha == hub.branch_head(repo_id) and result.tag == "v1"
    assert result.commit_url == f"{hub.endpoint}/{repo_id}/commit/{result.commit_sha}"
    assert_files_are(hub, repo_id, out)


def test_a_lost_commit_answer_on_an_existing_repo_is_not_a_conflict(
    tmp_path: Path,
    hub: LocalHub,
    published_remote_base: PublishedModel,
    trainer_output_factory: Any,
    no_backoff: None,
) -> None:
    first = trainer_output_factory("remote")
    manifest, out, repo_id = make_build(tmp_path, published_remote_base, first, push_spec={"tag": "v1"})
    push(manifest)
    rebuild(manifest, "finetune", "path", str(changed_copy(first, tmp_path / "second-run")))
    rebuild(manifest, "push", "tag", "v2")
    hub.inject_fault("commit", kind="apply-drop")
    hub.inject_fault("tag", kind="apply-drop")  # the tag's answer is lost too
    result = push(manifest)
    assert hub.commit_count(repo_id) == 3 and result.commit_sha == hub.branch_head(repo_id)
    assert result.tag == "v2"
    from huggingface_hub import HfApi

    tags = {t.name: t.target_commit for t in HfApi().list_repo_refs(repo_id).tags}
    assert tags["v2"] == result.commit_sha
    assert_files_are(hub, repo_id, out)


def test_a_dropped_commit_leaves_an_existing_repo_as_it_was(
    tmp_path: Path,
    hub: LocalHub,
    published_remote_base: PublishedModel,
    trainer_output_factory: Any,
    no_backoff: None,
) -> None:
    first = trainer_output_factory("remote")
    manifest, _, repo_id = make_build(tmp_path, published_remote_base, first)
    push(manifest)
    before = hub.list_files(repo_id)
    rebuild(manifest, "finetune", "path", str(changed_copy(first, tmp_path / "second-run")))
    hub.inject_fault("commit", kind="drop", times=50)
    with pytest.raises(
        HubFailure,
        match=rf"^commit failed for {repo_id} \(connection dropped, after 5 retries in .*\); nothing was "
        "published: ",
    ):
        push(manifest)
    assert hub.list_files(repo_id) == before


def test_moved_branch_is_a_conflict(
    tmp_path: Path,
    hub: LocalHub,
    published_remote_base: PublishedModel,
    trainer_output_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from huggingface_hub import HfApi

    from hubsync.push import remote

    first = trainer_output_factory("remote")
    manifest, _, repo_id = make_build(tmp_path, published_remote_base, first)
    push(manifest)
    rebuild(manifest, "finetune", "path", str(changed_copy(first, tmp_path / "second-run")))
    real = remote.list_files
    done: list[Any] = []

    def someone_else_commits(api: Any, repo: str, revision: str) -> dict[str, Any]:
        files = real(api, repo, revision)
        if repo == repo_id and not done:
            done.append(HfApi().upload_file(path_or_fileobj=b"x", path_in_repo="other.txt", repo_id=repo_id))
        return files

    monkeypatch.setattr(remote, "list_files", someone_else_commits)
    with pytest.raises(
        PushError,
        match=rf"{repo_id}@main moved while pushing \(someone else committed\): run `hubsync status`",
    ):
        push(manifest)
    assert "other.txt" in hub.list_files(repo_id, content=False)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_hub_is_one_line_within_the_documented_time(
    tmp_path: Path, hub: LocalHub, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    """As a user sees it, with the real waits: 5 retries (0.5 to 8 s apart), then one line; docs/push.md says
    a step that keeps failing ends the push within about a minute."""
    manifest, _, repo_id = make_build(tmp_path, published_remote_base, remote_trainer_output)
    dead = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    result = hubsync(["push", str(manifest)], hub, tmp_path, env_extra={"HF_ENDPOINT": dead})
    elapsed = time.monotonic() - started
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"error: whoami failed for {repo_id} (cannot connect to {dead}, after 5 retries in "
    ), result.stderr
    assert last.endswith(": check HF_ENDPOINT and the network, then run the command again")
    assert elapsed < 60, elapsed
