"""The Hub emulator, driven by the real huggingface_hub client (no mocks).

These tests pin the client's behaviour too: when a huggingface_hub upgrade changes the protocol or its retry
policy, they say so here, before a hubsync test fails somewhere less obvious.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    RepoFile,
    RepoFolder,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    FileDuplicationError,
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hubsync.testing.hub import (
    DEFAULT_GITATTRIBUTES,
    DEFAULT_TOKEN,
    OTHER_TOKEN,
    GitIgnore,
    LocalHub,
    git_blob_sha1,
    lfs_pointer,
    parse_card_data,
)

README = (
    b"---\nlicense: apache-2.0\npipeline_tag: text-generation\ntags:\n- hubsync\n- test\n---\n# A model\n"
)
CONFIG = b'{"hidden_size": 8}\n'


def _payload(seed: str, size: int) -> bytes:
    """Deterministic pseudo-random bytes: incompressible, so sizes on the wire are what they seem."""
    out = bytearray()
    block = seed.encode()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


WEIGHTS = _payload("weights", 40_000)
EXTRA = _payload("extra", 3_000)


def _folder(root: Path) -> Path:
    """A small model folder: two regular files, two LFS ones (by the default .gitattributes), one nested."""
    (root / "sub").mkdir(parents=True)
    (root / "README.md").write_bytes(README)
    (root / "config.json").write_bytes(CONFIG)
    (root / "model.safetensors").write_bytes(WEIGHTS)
    (root / "sub" / "extra.bin").write_bytes(EXTRA)
    return root


EXPECTED = {
    ".gitattributes": DEFAULT_GITATTRIBUTES.encode(),
    "README.md": README,
    "config.json": CONFIG,
    "model.safetensors": WEIGHTS,
    "sub/extra.bin": EXTRA,
}


def _tree_of(path: str | Path) -> dict[str, bytes]:
    root = Path(path)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def uploaded(hf_api: HfApi, repo_name: str, tmp_path: Path) -> tuple[str, str]:
    """A repo holding `_folder()` on main: (repo_id, commit sha)."""
    repo_id = f"user/{repo_name}"
    hf_api.create_repo(repo_id)
    info = hf_api.upload_folder(
        repo_id=repo_id, folder_path=_folder(tmp_path / "src"), commit_message="weights"
    )
    return repo_id, info.oid


# --------------------------------------------------------------------------------------------------------------
# happy path


def test_upload_folder_then_download_at_sha_and_tag(
    hub: LocalHub, hf_api: HfApi, uploaded: tuple[str, str], tmp_path: Path
) -> None:
    repo_id, sha = uploaded
    assert hub.branch_head(repo_id) == sha
    assert hub.list_files(repo_id) == EXPECTED
    # LFS objects went through the CDN port, regular files inline in the commit
    assert hub.bytes_received("lfs-upload", repo_id) == len(WEIGHTS) + len(EXTRA)
    assert hub.bytes_received("commit", repo_id) < len(WEIGHTS)

    hf_api.create_tag(repo_id, tag="v1", revision=sha)
    at_sha = snapshot_download(repo_id, revision=sha, cache_dir=tmp_path / "c1", endpoint=hub.endpoint)
    at_tag = snapshot_download(repo_id, revision="v1", cache_dir=tmp_path / "c2", endpoint=hub.endpoint)
    assert _tree_of(at_sha) == EXPECTED
    assert _tree_of(at_tag) == EXPECTED
    assert Path(at_tag).name == sha


def test_hashes_are_git_hashes(hf_api: HfApi, uploaded: tuple[str, str]) -> None:
    repo_id, sha = uploaded
    assert len(sha) == 40 and int(sha, 16) >= 0
    listing = list(hf_api.list_repo_tree(repo_id, recursive=True))
    files = {f.path: f for f in listing if isinstance(f, RepoFile)}
    assert files["config.json"].blob_id == git_blob_sha1(CONFIG)
    assert files["config.json"].lfs is None
    weights = files["model.safetensors"]
    assert weights.lfs is not None and weights.lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert weights.blob_id == git_blob_sha1(lfs_pointer(weights.lfs.sha256, len(WEIGHTS)))
    # downloads must never be steered to Xet: the tree carries no xetHash, whatever the file kind
    assert weights.xet_hash is None
    folders = [f for f in listing if isinstance(f, RepoFolder)]
    assert [f.path for f in folders] == ["sub"] and len(folders[0].tree_id) == 40


def test_hf_hub_download_and_metadata(
    hub: LocalHub, hf_api: HfApi, uploaded: tuple[str, str], tmp_path: Path
) -> None:
    repo_id, sha = uploaded
    path = hf_hub_download(repo_id, "sub/extra.bin", cache_dir=tmp_path, endpoint=hub.endpoint)
    assert Path(path).read_bytes() == EXTRA
    info = hf_api.model_info(repo_id, files_metadata=True)
    assert info.sha == sha and info.private is False
    assert info.card_data is not None and info.card_data.license == "apache-2.0"
    assert info.pipeline_tag == "text-generation"
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    assert sizes["model.safetensors"] == len(WEIGHTS)
    assert hf_api.file_exists(repo_id, "config.json") and not hf_api.file_exists(repo_id, "nope.txt")


def test_preupload_modes_follow_gitattributes_and_size(hub: LocalHub, uploaded: tuple[str, str]) -> None:
    repo_id, _ = uploaded
    body = {
        "files": [
            {"path": p, "size": n, "sample": ""}
            for p, n in [
                ("a.safetensors", 10),
                ("b.txt", 10),
                ("c.txt", 11 * 1024 * 1024),
                ("d.pt", 0),
                ("config.json", len(CONFIG)),
            ]
        ]
    }
    status, answer = _call(hub, "POST", f"/api/models/{repo_id}/preupload/main", body)
    assert status == 200
    modes = {f["path"]: (f["uploadMode"], f.get("oid"), f["shouldIgnore"]) for f in answer["files"]}
    assert modes == {
        "a.safetensors": ("lfs", None, False),
        "b.txt": ("regular", None, False),
        "c.txt": ("lfs", None, False),
        "d.pt": ("regular", None, False),  # empty files are always regular
        "config.json": ("regular", git_blob_sha1(CONFIG), False),
    }


def test_noop_recommit_makes_no_commit(
    hub: LocalHub, hf_api: HfApi, uploaded: tuple[str, str], tmp_path: Path
) -> None:
    repo_id, sha = uploaded
    count = hub.commit_count(repo_id)
    hub.clear_log()
    info = hf_api.upload_folder(repo_id=repo_id, folder_path=_folder(tmp_path / "again"))
    assert info.oid == sha
    assert hub.commit_count(repo_id) == count == 2  # the repo's initial commit + ours
    assert hub.requests("commit") == []
    assert hub.bytes_received("lfs-upload") == 0


def test_branches_tags_and_commit_list(hub: LocalHub, hf_api: HfApi, uploaded: tuple[str, str]) -> None:
    repo_id, sha = uploaded
    hf_api.create_branch(repo_id, branch="dev")
    with pytest.raises(HfHubHTTPError) as err:
        hf_api.create_branch(repo_id, branch="dev")
    assert err.value.response.status_code == 409
    hf_api.create_branch(repo_id, branch="dev", exist_ok=True)
    hf_api.upload_file(path_or_fileobj=b"dev only\n", path_in_repo="dev.txt", repo_id=repo_id, revision="dev")
    assert hub.branch_head(repo_id) == sha
    assert "dev.txt" in hub.list_files(repo_id, "dev")
    hf_api.create_tag(repo_id, tag="v1")
    refs = hf_api.list_repo_refs(repo_id)
    assert {b.name for b in refs.branches} == {"main", "dev"}
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", sha)]
    commits = hf_api.list_repo_commits(repo_id)
    assert [c.title for c in commits] == ["weights", "initial commit"] and commits[0].commit_id == sha
    hf_api.delete_tag(repo_id, tag="v1")
    hf_api.delete_branch(repo_id, branch="dev")
    refs = hf_api.list_repo_refs(repo_id)
    assert refs.tags == [] and [b.name for b in refs.branches] == ["main"]


def test_stale_parent_commit_is_refused(hub: LocalHub, hf_api: HfApi, uploaded: tuple[str, str]) -> None:
    repo_id, sha = uploaded
    (initial,) = [c.commit_id for c in hf_api.list_repo_commits(repo_id) if c.commit_id != sha]
    with pytest.raises(HfHubHTTPError) as err:
        hf_api.create_commit(
            repo_id,
            [CommitOperationAdd("late.txt", b"late\n")],
            commit_message="stale",
            parent_commit=initial,
        )
    assert err.value.response.status_code == 412
    assert hub.branch_head(repo_id) == sha
    ok = hf_api.create_commit(
        repo_id, [CommitOperationAdd("late.txt", b"late\n")], commit_message="fresh", parent_commit=sha
    )
    assert hub.branch_head(repo_id) == ok.oid


def test_create_pr(hub: LocalHub, hf_api: HfApi, uploaded: tuple[str, str], tmp_path: Path) -> None:
    repo_id, sha = uploaded
    info = hf_api.create_commit(
        repo_id, [CommitOperationAdd("pr.txt", b"proposal\n")], commit_message="propose", create_pr=True
    )
    assert info.pr_revision == "refs/pr/1" and info.pr_num == 1
    assert hub.branch_head(repo_id) == sha  # main untouched
    assert hub.branch_head(repo_id, "refs/pr/1") == info.oid
    path = hf_hub_download(repo_id, "pr.txt", revision="refs/pr/1", cache_dir=tmp_path, endpoint=hub.endpoint)
    assert Path(path).read_bytes() == b"proposal\n"
    refs = hf_api.list_repo_refs(repo_id, include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests or []] == ["refs/pr/1"]
    second = hf_api.create_commit(
        repo_id, [CommitOperationAdd("x.txt", b"x")], commit_message="2", create_pr=True
    )
    assert second.pr_revision == "refs/pr/2"


def test_delete_files_and_folders(hub: LocalHub, hf_api: HfApi, uploaded: tuple[str, str]) -> None:
    repo_id, _ = uploaded
    hf_api.create_commit(
        repo_id,
        [CommitOperationDelete("config.json"), CommitOperationDelete("sub/")],
        commit_message="prune",
    )
    assert set(hub.list_files(repo_id)) == {".gitattributes", "README.md", "model.safetensors"}
    with pytest.raises(RemoteEntryNotFoundError):
        hf_api.delete_file("config.json", repo_id=repo_id)


def test_commit_refuses_unknown_lfs_object(hub: LocalHub, hf_api: HfApi, repo_name: str) -> None:
    repo_id = f"user/{repo_name}"
    hf_api.create_repo(repo_id)
    lines = [
        {"key": "header", "value": {"summary": "sneaky"}},
        {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "ab" * 32, "size": 3}},
    ]
    status, answer = _call(hub, "POST", f"/api/models/{repo_id}/commit/main", lines, ndjson=True)
    assert status == 422 and "LFS" in answer["error"]
    assert hub.commit_count(repo_id) == 1


def test_commit_refuses_a_regular_file_above_10_mib(hub: LocalHub, hf_api: HfApi, repo_name: str) -> None:
    repo_id = f"user/{repo_name}"
    hf_api.create_repo(repo_id)
    big = base64.b64encode(b"x" * (10 * 1024 * 1024 + 1)).decode()
    lines = [
        {"key": "header", "value": {"summary": "too big for git"}},
        {"key": "file", "value": {"path": "big.txt", "content": big, "encoding": "base64"}},
    ]
    status, answer = _call(hub, "POST", f"/api/models/{repo_id}/commit/main", lines, ndjson=True)
    assert status == 400 and "larger than 10 MiB" in answer["error"]
    assert hub.commit_count(repo_id) == 1


def test_range_requests_on_regular_files(hub: LocalHub, uploaded: tuple[str, str]) -> None:
    repo_id, sha = uploaded
    req = urllib.request.Request(
        f"{hub.endpoint}/{repo_id}/resolve/{sha}/config.json", headers={"Range": "bytes=5-"}
    )
    with urllib.request.urlopen(req) as resp:
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 5-{len(CONFIG) - 1}/{len(CONFIG)}"
        assert resp.read() == CONFIG[5:]


# --------------------------------------------------------------------------------------------------------------
# errors and permissions


def test_not_found_errors_map_to_client_exceptions(
    hub: LocalHub, hf_api: HfApi, uploaded: tuple[str, str], tmp_path: Path
) -> None:
    repo_id, _ = uploaded
    with pytest.raises(RepositoryNotFoundError):
        hf_api.model_info("user/does-not-exist")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/does-not-exist", "config.json", cache_dir=tmp_path, endpoint=hub.endpoint)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="nope", cache_dir=tmp_path, endpoint=hub.endpoint)
    with pytest.raises(RevisionNotFoundError):
        hf_api.model_info(repo_id, revision="nope")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt", cache_dir=tmp_path, endpoint=hub.endpoint)


def test_gated_repo(hub: LocalHub, hf_api: HfApi, uploaded: tuple[str, str], tmp_path: Path) -> None:
    repo_id, _ = uploaded
    hub.set_gated(repo_id)
    other = HfApi(endpoint=hub.endpoint, token=OTHER_TOKEN)
    assert other.model_info(repo_id).gated == "auto"  # metadata stays visible, files do not
    with pytest.raises(GatedRepoError):
        hf_hub_download(repo_id, "config.json", token=OTHER_TOKEN, cache_dir=tmp_path, endpoint=hub.endpoint)
    with pytest.raises(GatedRepoError):
        other.list_repo_files(repo_id)
    path = hf_hub_download(repo_id, "config.json", cache_dir=tmp_path / "owner", endpoint=hub.endpoint)
    assert Path(path).read_bytes() == CONFIG


def test_tokens(hub: LocalHub) -> None:
    assert HfApi(endpoint=hub.endpoint, token=DEFAULT_TOKEN).whoami()["orgs"][0]["name"] == "my-org"
    assert HfApi(endpoint=hub.endpoint, token=OTHER_TOKEN).whoami()["name"] == "other"
    with pytest.raises(HfHubHTTPError) as err:
        HfApi(endpoint=hub.endpoint, token="hf_not_a_token").whoami()
    assert err.value.response.status_code == 401


def test_writing_to_another_namespace_is_forbidden(
    hub: LocalHub, uploaded: tuple[str, str], repo_name: str
) -> None:
    repo_id, sha = uploaded
    other = HfApi(endpoint=hub.endpoint, token=OTHER_TOKEN)
    with pytest.raises(HfHubHTTPError) as err:
        other.create_repo(f"user/{repo_name}-theirs")
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        other.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert err.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as err:
        other.delete_repo(repo_id)
    assert err.value.response.status_code == 403
    assert hub.branch_head(repo_id) == sha and hub.repo_exists(repo_id)


def test_create_and_delete_repo(hub: LocalHub, hf_api: HfApi, repo_name: str) -> None:
    repo_id = f"my-org/{repo_name}"
    url = hf_api.create_repo(repo_id, repo_type="dataset")
    assert url.repo_id == repo_id and url.repo_type == "dataset"
    with pytest.raises(HfHubHTTPError) as err:
        hf_api.create_repo(repo_id, repo_type="dataset")
    assert err.value.response.status_code == 409
    hf_api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
    hf_api.upload_file(
        path_or_fileobj=b"a,b\n", path_in_repo="data.csv", repo_id=repo_id, repo_type="dataset"
    )
    assert hub.list_files(repo_id, repo_type="dataset")["data.csv"] == b"a,b\n"
    hf_api.delete_repo(repo_id, repo_type="dataset")
    assert not hub.repo_exists(repo_id, "dataset")
    with pytest.raises(RepositoryNotFoundError):
        hf_api.delete_repo(repo_id, repo_type="dataset")


# --------------------------------------------------------------------------------------------------------------
# persistence


def test_state_survives_a_restart(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    with LocalHub(root) as first:
        api = HfApi(endpoint=first.endpoint, token=DEFAULT_TOKEN)
        api.create_repo("user/persistent")
        sha = api.upload_folder(repo_id="user/persistent", folder_path=_folder(tmp_path / "src")).oid
    with LocalHub(root) as second:
        assert second.branch_head("user/persistent") == sha
        path = snapshot_download("user/persistent", cache_dir=tmp_path / "cache", endpoint=second.endpoint)
        assert _tree_of(path) == EXPECTED


# --------------------------------------------------------------------------------------------------------------
# faults: what the client does about them


def test_lfs_upload_500_and_429_are_retried(hub: LocalHub, hf_api: HfApi, repo_name: str) -> None:
    repo_id = f"user/{repo_name}"
    hf_api.create_repo(repo_id)
    hub.inject_fault("lfs-upload", kind="500")
    hub.inject_fault("lfs-upload", kind="429", nth=2, retry_after=0)
    started = time.monotonic()
    info = hf_api.upload_file(path_or_fileobj=WEIGHTS, path_in_repo="model.safetensors", repo_id=repo_id)
    # http_backoff: 1 s after the 500, Retry-After + 1 s after the 429
    assert time.monotonic() - started >= 2
    assert [r.status for r in hub.requests("lfs-upload")] == [500, 429, 200]
    assert hub.list_files(repo_id)["model.safetensors"] == WEIGHTS
    assert hub.branch_head(repo_id) == info.oid


def test_dropped_lfs_upload_is_retried(hub: LocalHub, hf_api: HfApi, repo_name: str) -> None:
    repo_id = f"user/{repo_name}"
    hf_api.create_repo(repo_id)
    hub.inject_fault("lfs-upload", kind="drop")
    hf_api.upload_file(path_or_fileobj=WEIGHTS, path_in_repo="model.safetensors", repo_id=repo_id)
    records = hub.requests("lfs-upload")
    assert [r.status for r in records] == [0, 200]
    assert 0 < records[0].bytes_in < len(WEIGHTS) and records[1].bytes_in == len(WEIGHTS)
    assert hub.list_files(repo_id)["model.safetensors"] == WEIGHTS


@pytest.mark.parametrize("kind", ["500", "429"])
def test_commit_errors_are_not_retried_and_commit_nothing(
    hub: LocalHub, hf_api: HfApi, uploaded: tuple[str, str], kind: str
) -> None:
    repo_id, sha = uploaded
    hub.clear_log()
    hub.inject_fault("commit", kind=kind, retry_after=0)
    with pytest.raises(HfHubHTTPError) as err:
        hf_api.upload_file(path_or_fileobj=b"new\n", path_in_repo="new.txt", repo_id=repo_id)
    assert err.value.response.status_code == int(kind)
    assert len(hub.requests("commit")) == 1  # create_commit posts once, without backoff
    assert hub.branch_head(repo_id) == sha and "new.txt" not in hub.list_files(repo_id)
    hf_api.upload_file(path_or_fileobj=b"new\n", path_in_repo="new.txt", repo_id=repo_id)
    assert hub.list_files(repo_id)["new.txt"] == b"new\n"


def test_dropped_small_download_is_retried_from_scratch(
    hub: LocalHub, uploaded: tuple[str, str], tmp_path: Path
) -> None:
    repo_id, _ = uploaded
    hub.clear_log()
    hub.inject_fault("resolve", kind="drop", nth=2)  # the 1st resolve request is the HEAD, the 2nd the GET
    got = hf_hub_download(repo_id, "config.json", cache_dir=tmp_path, endpoint=hub.endpoint)
    assert Path(got).read_bytes() == CONFIG
    gets = [r for r in hub.requests("resolve") if r.method == "GET"]
    # the client reads in 10 MiB chunks and loses a partial one, so nothing is kept to resume from
    assert [(r.status, r.bytes_out) for r in gets] == [(0, len(CONFIG) // 2), (200, len(CONFIG))]


def test_dropped_large_download_resumes_with_range(
    hub: LocalHub, hf_api: HfApi, repo_name: str, tmp_path: Path
) -> None:
    repo_id = f"user/{repo_name}"
    hf_api.create_repo(repo_id)
    big = _payload("big", 24 * 1024 * 1024)
    hf_api.upload_file(path_or_fileobj=big, path_in_repo="big.safetensors", repo_id=repo_id)
    hub.clear_log()
    hub.inject_fault("cdn", kind="drop")  # hangs up after 12 MiB: one full 10 MiB chunk reached the client
    got = hf_hub_download(repo_id, "big.safetensors", cache_dir=tmp_path, endpoint=hub.endpoint)
    assert Path(got).read_bytes() == big
    gets = hub.requests("cdn")
    assert [r.status for r in gets] == [0, 206]  # the retry asks for the rest only
    assert gets[1].bytes_out == len(big) - 10 * 1024 * 1024


@pytest.mark.parametrize(
    ("route", "kind", "nth", "expected"),
    [
        ("cdn", "429", 1, [429, 200]),  # waits Retry-After + 1 s, then retries
        ("cdn", "500", 1, HfHubHTTPError),  # http_get retries only 408/429 statuses
        ("resolve", "500", 1, [500, 200, 200]),  # a failed HEAD is redone with backoff: HEAD, HEAD, GET
        ("resolve", "drop", 1, httpx2.RemoteProtocolError),  # a dropped HEAD is not retried
    ],
)
def test_download_fault_policy(
    hub: LocalHub,
    uploaded: tuple[str, str],
    tmp_path: Path,
    route: str,
    kind: str,
    nth: int,
    expected: list[int] | type[Exception],
) -> None:
    repo_id, _ = uploaded
    path = "model.safetensors" if route == "cdn" else "config.json"
    hub.clear_log()
    hub.inject_fault(route, kind=kind, nth=nth, retry_after=0)
    if isinstance(expected, list):
        hf_hub_download(repo_id, path, cache_dir=tmp_path, endpoint=hub.endpoint)
        assert [r.status for r in hub.requests(route)] == expected
    else:
        with pytest.raises(expected):
            hf_hub_download(repo_id, path, cache_dir=tmp_path, endpoint=hub.endpoint)


def test_slow_answers_still_work(hub: LocalHub, uploaded: tuple[str, str], tmp_path: Path) -> None:
    repo_id, _ = uploaded
    hub.inject_fault("revision", kind="slow", delay=0.5)
    started = time.monotonic()
    snapshot_download(repo_id, cache_dir=tmp_path, endpoint=hub.endpoint)
    assert time.monotonic() - started >= 0.5
    assert [r.status for r in hub.requests("revision")] == [200]


# --------------------------------------------------------------------------------------------------------------
# fidelity: never more lenient than the real Hub (docs/hub-fidelity.md)


@pytest.fixture
def file_kind(hub: LocalHub, request: pytest.FixtureRequest) -> Iterator[str]:
    """Serve files as `request.param` ("lfs" or "xet") for one test, whatever the session Hub's default."""
    before = hub.xet
    hub.xet = request.param == "xet"
    yield str(request.param)
    hub.xet = before


def _copy_ops(src: str) -> list[CommitOperationCopy]:
    return [
        CommitOperationCopy(
            "model.safetensors", "weights/model.safetensors", src_repo_id=src, src_repo_type="model"
        ),
        CommitOperationCopy("config.json", "config.json", src_repo_id=src, src_repo_type="model"),
    ]


@pytest.mark.parametrize("file_kind", ["lfs"], indirect=True)
def test_lfs_only_files_carry_no_xet_hash_and_cannot_be_copied(
    hub: LocalHub, hf_api: HfApi, uploaded: tuple[str, str], repo_name: str, file_kind: str
) -> None:
    src, _ = uploaded
    (info,) = hf_api.get_paths_info(src, ["model.safetensors"])
    assert isinstance(info, RepoFile) and info.lfs is not None and info.xet_hash is None
    dst = f"user/{repo_name}-copy"
    hf_api.create_repo(dst)
    hub.clear_log()
    with pytest.raises(ValueError, match="file has no xet hash"):
        hf_api.create_commit(dst, _copy_ops(src), commit_message="copy")
    # the client refuses before it asks the Hub: no duplicate call, no commit
    assert hub.requests("lfs-duplicate") == [] and hub.requests("commit") == []
    assert hub.commit_count(dst) == 1


@pytest.mark.parametrize("file_kind", ["xet"], indirect=True)
def test_xet_backed_files_are_copied_server_side(
    hub: LocalHub, hf_api: HfApi, uploaded: tuple[str, str], repo_name: str, file_kind: str
) -> None:
    src, _ = uploaded
    dst = f"my-org/{repo_name}-copy"
    hf_api.create_repo(dst)
    hub.clear_log()
    hf_api.create_commit(dst, _copy_ops(src), commit_message="copy from source")
    files = hub.list_files(dst)
    assert files["weights/model.safetensors"] == WEIGHTS and files["config.json"] == CONFIG
    assert hub.bytes_received("lfs-upload") == 0
    assert [(r.status, r.repo_id) for r in hub.requests("lfs-duplicate")] == [(200, src)]


@pytest.mark.parametrize("file_kind", ["xet"], indirect=True)
def test_injected_duplicate_rejection_raises_file_duplication_error(
    hub: LocalHub, hf_api: HfApi, uploaded: tuple[str, str], repo_name: str, file_kind: str
) -> None:
    src, _ = uploaded
    dst = f"user/{repo_name}-copy"
    hf_api.create_repo(dst)
    hub.inject_fault("lfs-duplicate", kind="reject")
    with pytest.raises(FileDuplicationError, match="storage regions"):
        hf_api.create_commit(dst, _copy_ops(src), commit_message="copy")
    assert hub.commit_count(dst) == 1
    with pytest.raises(ValueError, match="lfs-duplicate"):
        hub.inject_fault("commit", kind="reject")


@pytest.mark.parametrize(
    ("file_kind", "xet_hash", "reason"),
    [
        ("lfs", "00" * 32, "has no xet hash"),
        ("xet", "00" * 32, "does not match"),
    ],
    indirect=["file_kind"],
)
def test_duplicate_endpoint_reports_failures_as_the_hub_does(
    hub: LocalHub, uploaded: tuple[str, str], repo_name: str, file_kind: str, xet_hash: str, reason: str
) -> None:
    src, _ = uploaded
    dst = f"user/{repo_name}-copy"
    HfApi(endpoint=hub.endpoint, token=DEFAULT_TOKEN).create_repo(dst)
    sha = hashlib.sha256(WEIGHTS).hexdigest()
    body = {"target": {"type": "model", "name": dst}, "files": [{"xetHash": xet_hash, "sha256": sha}]}
    status, answer = _call(hub, "POST", f"/api/models/{src}/lfs-files/duplicate", body)
    assert status == 200 and len(answer["failed"]) == 1
    assert answer["failed"][0]["sha256"] == sha and reason in answer["failed"][0]["error"]


def test_duplicate_from_a_source_the_caller_cannot_read(
    hub: LocalHub, hf_api: HfApi, uploaded: tuple[str, str], make_repo_name: Any
) -> None:
    src, _ = uploaded
    hub.set_private(src)
    theirs = f"other/{make_repo_name()}"
    HfApi(endpoint=hub.endpoint, token=OTHER_TOKEN).create_repo(theirs)
    sha = hashlib.sha256(WEIGHTS).hexdigest()
    body = {"target": {"type": "model", "name": theirs}, "files": [{"xetHash": "0" * 64, "sha256": sha}]}
    url = f"/api/models/{src}/lfs-files/duplicate"
    assert _call(hub, "POST", url, body, token=OTHER_TOKEN)[0] == 404  # exists, but not for them
    assert _call(hub, "POST", url, body, token=None)[0] == 401  # anonymous
    assert [r.status for r in hub.requests("lfs-duplicate")] == [404, 401]


def test_apply_then_drop_commits_while_the_client_sees_a_dropped_connection(
    hub: LocalHub, hf_api: HfApi, uploaded: tuple[str, str]
) -> None:
    repo_id, sha = uploaded
    hub.clear_log()
    hub.inject_fault("commit", kind="apply-drop")
    with pytest.raises(httpx2.TransportError):
        hf_api.upload_file(path_or_fileobj=b"late\n", path_in_repo="late.txt", repo_id=repo_id)
    # the answer was lost, not the commit: the branch moved to a commit holding the file
    head = hub.branch_head(repo_id)
    assert head != sha and hub.list_files(repo_id)["late.txt"] == b"late\n"
    assert [c.commit_id for c in hf_api.list_repo_commits(repo_id)][:2] == [head, sha]
    assert [r.status for r in hub.requests("commit")] == [0]


def test_serve_command_prints_its_environment_and_keeps_state_across_restarts(tmp_path: Path) -> None:
    root = tmp_path / "hub"
    with _served(["serve", "--root", str(root), "--xet"]) as (endpoint, banner):
        env = dict(
            line.removeprefix("export ").split("=", 1) for line in banner if line.startswith("export ")
        )
        assert env == {
            "HF_ENDPOINT": endpoint,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_TOKEN": DEFAULT_TOKEN,
            "HF_HOME": str((root / "hf-home").resolve()),
        }
        assert any("Xet-backed" in line for line in banner)
        api = HfApi(endpoint=endpoint, token=env["HF_TOKEN"])
        api.create_repo("user/kept")
        sha = api.upload_file(path_or_fileobj=CONFIG, path_in_repo="config.json", repo_id="user/kept").oid
    # the shape from before `serve` existed still starts it
    with _served(["--root", str(root)]) as (endpoint, banner):
        assert any("LFS-only" in line for line in banner)
        api = HfApi(endpoint=endpoint, token=DEFAULT_TOKEN)
        assert api.model_info("user/kept").sha == sha


def test_serve_command_says_what_is_wrong_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "hubsync.testing.hub",
                "serve",
                "--root",
                str(tmp_path),
                "--port",
                str(port),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("cannot start the local Hub: ") and len(done.stderr.splitlines()) == 1


@contextlib.contextmanager
def _served(args: list[str]) -> Iterator[tuple[str, list[str]]]:
    """Run the serve command until the block ends, then stop it with Ctrl-C and check that it exits cleanly."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "hubsync.testing.hub", *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        # SIGINT ignored, as a script's background job inherits it: Ctrl-C must still stop the Hub
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        assert proc.stdout is not None
        endpoint = proc.stdout.readline().strip()
        banner: list[str] = []
        while line := proc.stdout.readline():  # until the banner's last line, or EOF if it died
            banner.append(line.strip())
            if "Ctrl-C" in line:
                break
        assert endpoint.startswith("http://127.0.0.1:") and "Ctrl-C" in banner[-1], banner
        yield endpoint, banner
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and out.strip() == "# local Hub stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


# -- card metadata ---------------------------------------------------------------------------------------------


def _card(meta: str) -> bytes:
    return f"---\n{meta}---\n# A model\n".encode()


BAD_CARDS = [
    pytest.param("- a list\n", '"value" must be of type object', id="not-a-mapping"),
    pytest.param("license: [mit\n", "Invalid YAML in README.md metadata", id="not-yaml"),
    pytest.param("license: mit\nlicense: mit\n", "duplicated mapping key 'license'", id="duplicate-key"),
    pytest.param("license: apache2\n", '"license" must be one of [apache-2.0, mit, ', id="license"),
    pytest.param("license: other\n", '"license_name" is required when "license" is "other"', id="other"),
    pytest.param(
        "license: other\nlicense_name: My License\n",
        '"license_name" with value "My License" fails',
        id="name",
    ),
    pytest.param("license: [mit, nope]\n", '"license[1]" must be one of [', id="license-list"),
    pytest.param("base_model: \n", '"base_model" is not allowed to be empty', id="base-empty"),
    pytest.param(
        "base_model: /home/me/base\n",
        '"base_model" with value "/home/me/base" is not valid. Use a model id from https://hf.co/models.',
        id="base-path",
    ),
    pytest.param(
        "base_model:\n- user/no-such-base-model\n",
        '"base_model[0]" with value "user/no-such-base-model" is not valid',
        id="base-missing",
    ),
    pytest.param(
        "base_model_relation: finetune\n", 'missing required peer "base_model"', id="relation-alone"
    ),
    pytest.param(
        "base_model: {base}\nbase_model_relation: distilled\n",
        '"base_model_relation" must be one of [adapter, merge, quantized, finetune]',
        id="relation",
    ),
    pytest.param("tags: hubsync\n", '"tags" must be an array', id="tags-string"),
    pytest.param("tags:\n- 1\n", '"tags[0]" must be a string', id="tags-item"),
    pytest.param("datasets: {a: b}\n", '"datasets" must be one of [string, array]', id="datasets"),
    pytest.param(
        "datasets: /data/train\n", '"datasets[0]" with value "/data/train" is not valid', id="datasets-path"
    ),
    pytest.param("language:\n- en\n- 7\n", '"language[1]" must be a string', id="language"),
    pytest.param("pipeline_tag: chat\n", '"pipeline_tag" must be one of [biology, ', id="pipeline-tag"),
    pytest.param("library_name: [transformers]\n", '"library_name" must be a string', id="library"),
]


@pytest.mark.parametrize(("meta", "message"), BAD_CARDS)
def test_invalid_card_metadata_is_refused(
    hub: LocalHub, hf_api: HfApi, uploaded: tuple[str, str], meta: str, message: str
) -> None:
    repo_id, sha = uploaded
    readme = _card(meta.replace("{base}", repo_id))
    # the client asks /api/validate-yaml first and raises ValueError with the Hub's messages
    with pytest.raises(ValueError, match="Invalid metadata in README.md") as err:
        hf_api.upload_file(path_or_fileobj=readme, path_in_repo="README.md", repo_id=repo_id)
    assert message in str(err.value)
    # a client that skips that step is refused by the commit itself, with the same words
    lines = [
        {"key": "header", "value": {"summary": "bad card"}},
        {"key": "file", "value": {"path": "README.md", "content": base64.b64encode(readme).decode()}},
    ]
    status, answer = _call(hub, "POST", f"/api/models/{repo_id}/commit/main", lines, ndjson=True)
    assert status == 400 and message in answer["error"]
    assert hub.branch_head(repo_id) == sha


def test_valid_card_metadata_passes_and_model_card_validate_agrees(
    hub: LocalHub, hf_api: HfApi, uploaded: tuple[str, str]
) -> None:
    repo_id, _ = uploaded
    meta = (
        "license: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n"
        f"base_model:\n- {repo_id}\nbase_model_relation: finetune\n"
        "tags:\n- hubsync\ndatasets: user/some-data\nlanguage: en\npipeline_tag: image-text-to-text\n"
        "library_name: transformers\nmodel-index:\n- name: x\n  results: []\n"
    )
    readme = _card(meta)
    ModelCard(readme.decode()).validate()
    hf_api.upload_file(path_or_fileobj=readme, path_in_repo="README.md", repo_id=repo_id)
    info = hf_api.model_info(repo_id)
    assert info.card_data is not None and info.card_data.base_model == [repo_id]
    assert info.pipeline_tag == "image-text-to-text"
    with pytest.raises(ValueError, match='"license" must be one of'):
        ModelCard(_card("license: apache2\n").decode()).validate()


def test_a_private_base_model_is_valid_only_for_those_who_can_see_it(
    hub: LocalHub, hf_api: HfApi, uploaded: tuple[str, str]
) -> None:
    repo_id, _ = uploaded
    hub.set_private(repo_id)
    readme = _card(f"base_model: {repo_id}\n").decode()
    body = {"content": readme, "repoType": "model"}
    assert _call(hub, "POST", "/api/validate-yaml", body) == (200, {"errors": [], "warnings": []})
    status, answer = _call(hub, "POST", "/api/validate-yaml", body, token=OTHER_TOKEN)
    assert status == 400 and "is not valid" in answer["errors"][0]["message"]


def test_a_card_without_metadata_is_a_warning_not_an_error(hub: LocalHub) -> None:
    body = {"content": "# no metadata\n", "repoType": "model"}
    status, answer = _call(hub, "POST", "/api/validate-yaml", body, token=None)
    assert status == 200 and answer["errors"] == []
    assert "Empty or missing yaml metadata" in answer["warnings"][0]["message"]


# -- .gitignore ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        ("a.bin", True),
        ("deep/er/a.bin", True),
        ("keep.bin", False),  # !keep.bin
        ("logs/run.txt", True),  # logs/ at any depth
        ("sub/logs/run.txt", True),
        ("logs", False),  # "logs/" names folders only
        ("top.txt", True),  # /top.txt is anchored at the root...
        ("sub/top.txt", False),  # ...so it does not match below it
        ("docs/a/b/c.md", True),  # docs/**/*.md
        ("docs/readme.txt", False),
        ("out/keep.txt", True),  # inside an ignored folder: a later !out/keep.txt cannot bring it back
        ("#notes", True),  # \#notes: a literal '#'
        ("file1.txt", True),  # file[0-9].txt
        ("filex.txt", False),
    ],
)
def test_gitignore_matching(path: str, ignored: bool) -> None:
    rules = "# comment\n*.bin\n!keep.bin\nlogs/\n/top.txt\ndocs/**/*.md\nout\n!out/keep.txt\n"
    rules += "\\#notes\nfile[0-9].txt\n"
    assert GitIgnore(rules).ignores(path) is ignored


def test_gitignored_files_are_not_committed(
    hub: LocalHub, hf_api: HfApi, repo_name: str, tmp_path: Path
) -> None:
    repo_id = f"user/{repo_name}"
    hf_api.create_repo(repo_id)
    hf_api.upload_file(path_or_fileobj=b"*.bin\n!keep.bin\n", path_in_repo=".gitignore", repo_id=repo_id)
    folder = tmp_path / "f"
    (folder / "logs").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(WEIGHTS)
    (folder / "keep.bin").write_bytes(EXTRA)
    (folder / "logs" / "run.txt").write_text("step 1\n")
    (folder / "config.json").write_bytes(CONFIG)
    hub.clear_log()
    # the repo's .gitignore decides: weights.bin is neither uploaded nor committed
    hf_api.upload_folder(repo_id=repo_id, folder_path=folder)
    assert set(hub.list_files(repo_id)) == {
        ".gitattributes",
        ".gitignore",
        "keep.bin",
        "logs/run.txt",
        "config.json",
    }
    assert hub.bytes_received("lfs-upload") == len(EXTRA)
    # a .gitignore in the commit itself is sent along (gitIgnore) and wins over the repo's
    (folder / ".gitignore").write_text("logs/\n")
    (folder / "logs" / "run.txt").write_text("step 2\n")
    hf_api.upload_folder(repo_id=repo_id, folder_path=folder)
    files = hub.list_files(repo_id)
    assert files["logs/run.txt"] == b"step 1\n" and files["weights.bin"] == WEIGHTS


# -- pagination and private repos ------------------------------------------------------------------------------


@pytest.fixture
def small_pages(hub: LocalHub) -> Iterator[int]:
    before = hub.tree_page_size
    hub.tree_page_size = 2
    yield 2
    hub.tree_page_size = before


def test_tree_listing_is_paged_and_the_client_gets_every_entry(
    hub: LocalHub, hf_api: HfApi, uploaded: tuple[str, str], small_pages: int, tmp_path: Path
) -> None:
    repo_id, sha = uploaded
    hub.clear_log()
    listing = list(hf_api.list_repo_tree(repo_id, recursive=True))
    assert sorted(f.path for f in listing) == sorted([*EXPECTED, "sub"])
    pages = hub.requests("tree")
    assert len(pages) == 3 and all(r.status == 200 for r in pages)  # 6 entries, 2 a page
    snapshot = snapshot_download(repo_id, revision=sha, cache_dir=tmp_path, endpoint=hub.endpoint)
    assert _tree_of(snapshot) == EXPECTED
    req = urllib.request.Request(f"{hub.endpoint}/api/models/{repo_id}/tree/main?recursive=true")
    with urllib.request.urlopen(req) as resp:
        link = resp.headers["Link"]
        assert len(json.loads(resp.read())) == small_pages
    assert link.startswith(f"<{hub.endpoint}/api/models/{repo_id}/tree/main?recursive=true&cursor=")
    assert link.endswith('>; rel="next"')


def test_private_repo_answers_like_a_missing_one(hub: LocalHub, hf_api: HfApi, repo_name: str) -> None:
    repo_id = f"user/{repo_name}"
    hf_api.create_repo(repo_id, private=True)
    statuses = {}
    for who, token in (("anonymous", False), ("no access", OTHER_TOKEN)):
        for what, target in (("private", repo_id), ("missing", f"user/{repo_name}-nope")):
            with pytest.raises(RepositoryNotFoundError) as err:
                HfApi(endpoint=hub.endpoint, token=token).model_info(target)
            statuses[who, what] = err.value.response.status_code
            assert err.value.response.headers["X-Error-Code"] == "RepoNotFound"
    # what a caller can tell apart: anonymous (401) from authenticated (404); never private from missing
    assert statuses == {
        ("anonymous", "private"): 401,
        ("anonymous", "missing"): 401,
        ("no access", "private"): 404,
        ("no access", "missing"): 404,
    }
    with pytest.raises(HfHubHTTPError) as bad:
        HfApi(endpoint=hub.endpoint, token="hf_not_a_token").model_info(repo_id)
    assert bad.value.response.status_code == 401 and not isinstance(bad.value, RepositoryNotFoundError)


# --------------------------------------------------------------------------------------------------------------
# odds and ends


def test_card_front_matter_subset() -> None:
    card = b"---\nlicense: mit\ndatasets: [a, 'b']\nmodel-index:\n- name: m\n  results: []\nempty:\n---\ntext"
    assert parse_card_data(card) == {
        "license": "mit",
        "datasets": ["a", "b"],
        "model-index": [{"name": "m", "results": []}],
        "empty": None,
    }
    assert parse_card_data(b"# no front matter") is None


def _call(
    hub: LocalHub | str,
    method: str,
    path: str,
    body: object = None,
    *,
    ndjson: bool = False,
    token: str | None = DEFAULT_TOKEN,
) -> tuple[int, dict[str, Any]]:
    """A raw request (with the default token unless told), for protocol details the client does not expose."""
    endpoint = hub if isinstance(hub, str) else hub.endpoint
    data = None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        if ndjson:
            data = b"".join(json.dumps(line).encode() + b"\n" for line in body)  # type: ignore[attr-defined]
        else:
            data = json.dumps(body).encode()
        headers["Content-Type"] = "application/x-ndjson" if ndjson else "application/json"
    req = urllib.request.Request(endpoint + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def test_stop_closes_pooled_connections(tmp_path: Path) -> None:
    hub = LocalHub(tmp_path / "hub").start()
    api = HfApi(endpoint=hub.endpoint, token=DEFAULT_TOKEN)
    api.whoami()  # leaves a keep-alive connection in the client's pool
    hub.stop()
    with pytest.raises(Exception):  # noqa: B017 - any transport error will do: the point is no answer
        api.whoami()
    assert [r.route for r in hub.log] == ["whoami"]


def test_hub_env_drives_a_subprocess_client(hub_env: dict[str, str], uploaded: tuple[str, str]) -> None:
    repo_id, sha = uploaded
    script = (
        "import sys\n"
        "from huggingface_hub import HfApi, snapshot_download\n"
        "print(HfApi().whoami()['name'])\n"  # endpoint and token from the environment only
        "print(snapshot_download(sys.argv[1]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, repo_id],
        check=False,
        env=hub_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    name, snapshot = done.stdout.split()
    assert name == "user"
    assert snapshot.startswith(hub_env["HF_HUB_CACHE"]) and snapshot.endswith(sha)
    assert _tree_of(snapshot) == EXPECTED
