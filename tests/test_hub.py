"""The Hub emulator, driven by the real huggingface_hub client (no mocks).

These tests pin the client's behaviour too: when a huggingface_hub upgrade changes the protocol or its retry
policy, they say so here, before a hubsync test fails somewhere less obvious.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import httpx2
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    RepoFile,
    RepoFolder,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
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
    LocalHub,
    git_blob_sha1,
    lfs_pointer,
    parse_card_data,
)

README = b"---\nlicense: apache-2.0\nbase_model: org/base\ntags:\n- hubsync\n- test\n---\n# A model\n"
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
    # downloads must never be steered to Xet: the tree carries no xetHash ...
    assert weights.xet_hash is None
    # ... while paths-info does, for the cross-repo copy
    (info,) = hf_api.get_paths_info(repo_id, ["model.safetensors"])
    assert isinstance(info, RepoFile) and info.xet_hash is not None and len(info.xet_hash) == 64
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
    assert info.card_data is not None and info.card_data.base_model == "org/base"
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


def test_cross_repo_copy_moves_no_bytes(
    hub: LocalHub, hf_api: HfApi, uploaded: tuple[str, str], repo_name: str
) -> None:
    src, _ = uploaded
    dst = f"my-org/{repo_name}-copy"
    hf_api.create_repo(dst)
    hub.clear_log()
    hf_api.create_commit(
        dst,
        [
            CommitOperationCopy(
                "model.safetensors", "weights/model.safetensors", src_repo_id=src, src_repo_type="model"
            ),
            CommitOperationCopy("config.json", "config.json", src_repo_id=src, src_repo_type="model"),
        ],
        commit_message="copy from source",
    )
    files = hub.list_files(dst)
    assert files["weights/model.safetensors"] == WEIGHTS and files["config.json"] == CONFIG
    assert hub.bytes_received("lfs-upload") == 0
    assert [r.status for r in hub.requests("lfs-duplicate")] == [200]
    assert hub.requests("lfs-duplicate")[0].repo_id == src


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


def test_private_repo_is_not_found_without_access(
    hub: LocalHub, hf_api: HfApi, repo_name: str, tmp_path: Path
) -> None:
    repo_id = f"user/{repo_name}"
    hf_api.create_repo(repo_id, private=True)
    hf_api.upload_file(path_or_fileobj=CONFIG, path_in_repo="config.json", repo_id=repo_id)
    assert hf_api.model_info(repo_id).private is True
    for token in (False, OTHER_TOKEN):
        with pytest.raises(RepositoryNotFoundError) as err:
            HfApi(endpoint=hub.endpoint, token=token).model_info(repo_id)
        assert not isinstance(err.value, GatedRepoError)
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(repo_id, "config.json", token=token, cache_dir=tmp_path, endpoint=hub.endpoint)
    assert [r.status for r in hub.requests("model-info")][-2:] == [401, 404]  # anonymous vs. authenticated


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


def test_standalone_server_prints_its_endpoint(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "hubsync.testing.hub", "--root", str(tmp_path / "hub")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert proc.stdout is not None
        endpoint = proc.stdout.readline().strip()
        assert endpoint.startswith("http://127.0.0.1:")
        status, _ = _call(endpoint, "GET", "/api/agent-harnesses")
        assert status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _call(
    hub: LocalHub | str, method: str, path: str, body: object = None, *, ndjson: bool = False
) -> tuple[int, dict[str, Any]]:
    """A raw request with the default token, for protocol details the client does not expose."""
    endpoint = hub if isinstance(hub, str) else hub.endpoint
    data = None
    headers = {"Authorization": f"Bearer {DEFAULT_TOKEN}"}
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
