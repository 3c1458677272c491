"""Push and status against the local Hub: one commit, only what changed, never anything half-published."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from hubsync import tensors as T
from hubsync.build import build
from hubsync.errors import PushError
from hubsync.push import push, status
from hubsync.testing.hub import DEFAULT_TOKEN, OTHER_TOKEN, LocalHub
from hubsync.testing.models import PublishedModel
from hubsync.verify import verify
from tests.cli import run_cli
from tests.fixtures_hub import unique_repo_name
from tests.test_build import REMOTE_TUNED, write_manifest


def make_build(
    tmp_path: Path,
    base: PublishedModel,
    finetune: Path,
    *,
    push_spec: dict[str, Any] | None = None,
    name: str = "manifest.yaml",
) -> tuple[Path, Path, str]:
    repo_id = f"my-org/{unique_repo_name('ft')}"
    spec = {"repo": repo_id, **(push_spec or {})}
    manifest = write_manifest(
        tmp_path,
        base,
        finetune,
        REMOTE_TUNED,
        extra={
            "push": spec,
            "card": {
                "description": "A vision fine-tune for tests.",
                "tags": ["vision"],
                "datasets": ["my-org/captions"],
                "language": ["en"],
            },
        },
        name=name,
    )
    out = build(manifest, record_last_build=False).output
    assert verify(out).passed
    return manifest, out, spec["repo"]


def changed_copy(finetune: Path, dest: Path) -> Path:
    """The same fine-tune with one tuned tensor changed a little more (a second training run)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(finetune, dest)
    state = load_file(str(dest / "model.safetensors"))
    state["resampler.query"] = state["resampler.query"] + 0.25
    save_file(state, str(dest / "model.safetensors"))
    assert not torch.equal(
        state["resampler.query"], load_file(str(finetune / "model.safetensors"))["resampler.query"]
    )
    return dest


def rebuild(manifest: Path, section: str, key: str, value: Any) -> None:
    """Change one manifest key, build again and verify (the next push must see a new, verified build)."""
    data = yaml.safe_load(manifest.read_text())
    data[section][key] = value
    manifest.write_text(yaml.safe_dump(data))
    out = build(manifest, record_last_build=False).output
    assert verify(out).passed


def lfs_bytes(hub: LocalHub) -> int:
    return hub.bytes_received(route="lfs-upload")


def test_push_then_fresh_download_loads_and_verifies(
    tmp_path: Path, hub: LocalHub, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    from huggingface_hub import snapshot_download

    manifest, out, repo_id = make_build(
        tmp_path, published_remote_base, remote_trainer_output, push_spec={"tag": "v1"}
    )
    hub.clear_log()
    result = push(manifest)
    assert not result.up_to_date and result.created_repo and result.tag == "v1"
    assert result.commit_sha == hub.branch_head(repo_id)
    assert hub.commit_count(repo_id) == 2  # the initial commit and ours
    # untouched base shards were copied server-side, not uploaded
    assert set(result.copied) == {"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"}
    assert lfs_bytes(hub) == (out / "model-00003-of-00003.safetensors").stat().st_size
    assert result.bytes_uploaded < result.bytes_in_build

    fresh = Path(snapshot_download(repo_id, revision="v1", cache_dir=tmp_path / "fresh-cache"))
    for path in out.iterdir():
        assert (fresh / path.name).read_bytes() == path.read_bytes(), path.name
    assert verify(fresh, trust_remote_code=True, update_record=False).passed

    again = push(manifest)
    assert again.up_to_date and hub.commit_count(repo_id) == 2


def test_changed_tuned_tensor_uploads_only_the_changed_shard(
    tmp_path: Path, hub: LocalHub, published_remote_base: PublishedModel, trainer_output_factory: Any
) -> None:
    first = trainer_output_factory("remote")
    manifest, out, repo_id = make_build(tmp_path, published_remote_base, first)
    push(manifest)
    second = changed_copy(first, tmp_path / "second-run")
    rebuild(manifest, "finetune", "path", str(second))
    hub.clear_log()
    result = push(manifest)
    changed_shard = "model-00003-of-00003.safetensors"
    assert changed_shard in result.uploaded
    assert not any(p.endswith(".safetensors") and p != changed_shard for p in result.uploaded)
    assert lfs_bytes(hub) == (out / changed_shard).stat().st_size
    assert hub.commit_count(repo_id) == 3


def test_card_front_matter_and_validation(
    tmp_path: Path, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    from huggingface_hub import ModelCard

    _, out, repo_id = make_build(tmp_path, published_remote_base, remote_trainer_output)
    text = (out / "README.md").read_text()
    card = ModelCard(text)
    card.validate()
    meta = card.data.to_dict()
    assert meta["base_model"] == published_remote_base.repo_id
    assert meta["base_model_relation"] == "finetune"
    assert meta["license"] == "other"
    assert meta["license_name"] and meta["license_link"] == "LICENSE"
    assert meta["pipeline_tag"] == "image-text-to-text"
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["vision", "hubsync"]
    assert meta["datasets"] == ["my-org/captions"] and meta["language"] == ["en"]
    assert (out / "LICENSE").read_bytes() == (published_remote_base.local_dir / "LICENSE").read_bytes()
    assert f"/tree/{published_remote_base.sha}" in text
    assert "| `vpm.` |" in text and "| `resampler.` |" in text
    assert "Verification **passed**" in text
    assert repo_id in text, "the loading snippet names the new repo"
    assert "## Build manifest" in text and "  tuned:\n  - vpm.\n  - resampler.\n" in text


def test_deleted_files_are_deleted_but_not_gitattributes(
    tmp_path: Path, hub: LocalHub, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    from huggingface_hub import HfApi

    manifest, out, repo_id = make_build(tmp_path, published_remote_base, remote_trainer_output)
    push(manifest)
    HfApi().upload_file(path_or_fileobj=b"stale", path_in_repo="stale.txt", repo_id=repo_id)
    result = push(manifest)
    assert result.deleted == ["stale.txt"]
    files = hub.list_files(repo_id, content=False)
    assert "stale.txt" not in files and ".gitattributes" in files


def test_create_pr_leaves_main_alone(
    tmp_path: Path, hub: LocalHub, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    manifest, out, repo_id = make_build(tmp_path, published_remote_base, remote_trainer_output)
    push(manifest)
    head = hub.branch_head(repo_id)
    rebuild(manifest, "push", "create_pr", True)
    result = push(manifest)
    assert result.pr_url and "/discussions/" in result.pr_url
    assert hub.branch_head(repo_id) == head


@pytest.mark.parametrize("kind", ["429", "500", "drop"])
@pytest.mark.parametrize("route", ["lfs-upload", "commit"])
def test_transient_faults_are_retried_to_a_complete_commit(
    kind: str,
    route: str,
    tmp_path: Path,
    hub: LocalHub,
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("hubsync.push.time.sleep", lambda s: None)
    manifest, out, repo_id = make_build(tmp_path, published_remote_base, remote_trainer_output)
    hub.inject_fault(route, kind=kind, times=2)
    result = push(manifest)
    assert result.commit_sha == hub.branch_head(repo_id)
    files = hub.list_files(repo_id)
    for path in out.iterdir():
        assert files[path.name] == path.read_bytes()


def test_permanent_failure_leaves_no_repo_behind(
    tmp_path: Path,
    hub: LocalHub,
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("hubsync.push.time.sleep", lambda s: None)
    manifest, out, repo_id = make_build(tmp_path, published_remote_base, remote_trainer_output)
    hub.inject_fault("commit", kind="500", times=50)
    with pytest.raises(
        PushError, match=rf"the push to {repo_id} failed \(HTTP 500\) after 5 retries; the repo is unchanged"
    ):
        push(manifest)
    assert not hub.repo_exists(repo_id)


def test_permanent_failure_leaves_an_existing_repo_as_it_was(
    tmp_path: Path,
    hub: LocalHub,
    published_remote_base: PublishedModel,
    trainer_output_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("hubsync.push.time.sleep", lambda s: None)
    first = trainer_output_factory("remote")
    manifest, out, repo_id = make_build(tmp_path, published_remote_base, first)
    push(manifest)
    before = hub.list_files(repo_id)
    rebuild(manifest, "finetune", "path", str(changed_copy(first, tmp_path / "second-run")))
    # the client itself retries LFS uploads for ~20 s; a commit it does not retry, so that is the fast case
    hub.inject_fault("commit", kind="drop", times=50)
    with pytest.raises(PushError, match="the repo is unchanged"):
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

    import hubsync.push as push_module

    first = trainer_output_factory("remote")
    manifest, out, repo_id = make_build(tmp_path, published_remote_base, first)
    push(manifest)
    rebuild(manifest, "finetune", "path", str(changed_copy(first, tmp_path / "second-run")))
    real = push_module._remote_files

    def someone_else_commits(api: Any, repo: str, revision: str) -> dict[str, Any]:
        files = real(api, repo, revision)
        if repo == repo_id:
            HfApi().upload_file(path_or_fileobj=b"meanwhile", path_in_repo="other.txt", repo_id=repo_id)
        return files

    monkeypatch.setattr(push_module, "_remote_files", someone_else_commits)
    with pytest.raises(
        PushError,
        match=rf"{repo_id}@main moved while pushing \(someone else committed\): run `hubsync status`",
    ):
        push(manifest)
    assert "other.txt" in hub.list_files(repo_id, content=False)


def test_status_reports_base_move_and_local_changes(
    tmp_path: Path, hub: LocalHub, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    from huggingface_hub import HfApi

    manifest, out, repo_id = make_build(tmp_path, published_remote_base, remote_trainer_output)
    before = status(manifest)
    assert before["remote"]["exists"] is False
    push(manifest)
    synced = status(manifest)
    assert synced["remote"]["in_sync"] and synced["remote"]["last_commit"]["title"].startswith(
        "hubsync: build from"
    )
    assert synced["base"]["moved"] is False
    # a private base branch that moves: use a fresh copy of the base so other tests keep their pin
    (out / "generation_config.json").write_text("{}\n")
    changed = status(manifest)
    assert changed["remote"]["changed"] == ["generation_config.json"]
    record = json.loads((out / "hubsync.json").read_text())
    moved_base = f"my-org/{unique_repo_name('moving-base')}"
    api = HfApi()
    api.create_repo(moved_base)
    first = api.upload_file(path_or_fileobj=b"a", path_in_repo="config.json", repo_id=moved_base).oid
    api.upload_file(path_or_fileobj=b"b", path_in_repo="config.json", repo_id=moved_base)
    record["base"] = {"repo": moved_base, "revision": "main", "sha": first, "path": None}
    (out / "hubsync.json").write_text(json.dumps(record))
    moved = status(out)
    assert moved["base"]["moved"] is True and moved["base"]["changed_files"] == ["config.json"]


def hubsync(
    args: list[str], hub: LocalHub, tmp_path: Path, token: str | None = DEFAULT_TOKEN, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The CLI against the session Hub, with a fresh HF_HOME and the given token."""
    env = {**os.environ, **hub.client_env(tmp_path / "hf-cli", token=token)}
    return run_cli(*args, env=env, cwd=cwd or tmp_path)


def test_cli_build_then_bare_push_and_token_errors(
    tmp_path: Path, hub: LocalHub, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    repo_id = f"my-org/{unique_repo_name('cli')}"
    manifest = write_manifest(
        tmp_path,
        published_remote_base,
        remote_trainer_output,
        REMOTE_TUNED,
        extra={"push": {"repo": repo_id}},
    )
    built = hubsync(["-q", "build", str(manifest)], hub, tmp_path)
    assert built.returncode == 0, built.stderr
    missing = hubsync(["push"], hub, tmp_path, token=None)
    assert missing.returncode == 1
    # the last line of stderr (a log line per finished stage, e.g. `hash: ...`, may come before it)
    assert (
        missing.stderr.strip().splitlines()[-1]
        == "error: no Hugging Face token: set HF_TOKEN (a write token) or run `hf auth login`"
    )
    wrong = hubsync(["push"], hub, tmp_path, token="hf_wrong")
    assert (
        wrong.stderr.strip().splitlines()[-1]
        == "error: the Hugging Face token was refused (401): set HF_TOKEN to a valid write token"
    )
    other = hubsync(["push"], hub, tmp_path, token=OTHER_TOKEN)
    assert other.stderr.strip().splitlines()[-1].startswith(
        f"error: you are logged in as other, who cannot write to {repo_id}"
    )
    for result in (missing, wrong, other):
        assert "Traceback" not in result.stderr and "hf_" not in result.stderr.replace("hf auth", "")
    assert not hub.repo_exists(repo_id)
    pushed = hubsync(["push"], hub, tmp_path)
    assert pushed.returncode == 0, pushed.stderr
    assert f"pushed {repo_id}@main" in pushed.stdout and "copied server-side from the base" in pushed.stdout
    again = hubsync(["push"], hub, tmp_path)
    assert "is already up to date" in again.stdout
    assert DEFAULT_TOKEN not in pushed.stdout + pushed.stderr + again.stdout + again.stderr


def test_unverified_build_is_refused_unless_skipped(
    tmp_path: Path, hub: LocalHub, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    repo_id = f"my-org/{unique_repo_name('gate')}"
    manifest = write_manifest(
        tmp_path,
        published_remote_base,
        remote_trainer_output,
        REMOTE_TUNED,
        extra={"push": {"repo": repo_id}},
    )
    assert hubsync(["-q", "build", "--no-verify", str(manifest)], hub, tmp_path).returncode == 0
    refused = hubsync(["push", str(manifest)], hub, tmp_path)
    assert refused.returncode == 1 and "was never verified: run `hubsync verify" in refused.stderr
    assert not hub.repo_exists(repo_id)
    forced = hubsync(["push", "--skip-verify-check", str(manifest)], hub, tmp_path)
    assert forced.returncode == 0, forced.stderr
    card = hub.list_files(repo_id)["README.md"]
    assert isinstance(card, bytes) and b"Published with `--skip-verify-check`" in card
    assert T.sha256_file(tmp_path / "out" / "README.md")  # the local card is left as it was


def test_status_cli(
    tmp_path: Path, hub: LocalHub, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    manifest, out, repo_id = make_build(tmp_path, published_remote_base, remote_trainer_output)
    before = hubsync(["status", str(manifest)], hub, tmp_path)
    assert before.returncode == 0, before.stderr
    assert f"remote  {repo_id}@main does not exist yet: `hubsync push` creates it" in before.stdout
    assert (
        f"base    {published_remote_base.repo_id}@{published_remote_base.sha} still at the pinned"
        in before.stdout
    )
    push(manifest)
    after = hubsync(["status", "--json", str(manifest)], hub, tmp_path)
    data = json.loads(after.stdout)
    assert data["remote"]["in_sync"] is True and data["remote"]["head"] == hub.branch_head(repo_id)
    env_offline = run_cli(
        "push",
        str(manifest),
        env={**os.environ, **hub.client_env(tmp_path / "hf-off"), "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert env_offline.returncode == 1
    assert env_offline.stderr.strip().splitlines()[-1] == (
        "error: HF_HUB_OFFLINE=1 is set, and talking to the Hub needs the network: unset HF_HUB_OFFLINE"
    )
