"""Push and status against the local Hub: one commit, only what changed, never anything half-published."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from hubsync import tensors as T
from hubsync.build import build
from hubsync.errors import PushError
from hubsync.push import push, status
from hubsync.testing.hub import DEFAULT_TOKEN, OTHER_TOKEN, LocalHub
from hubsync.testing.models import PublishedModel, publish_model
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


BASE_SHARDS = {"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"}
TUNED_SHARD = "model-00003-of-00003.safetensors"


def test_push_then_fresh_download_loads_and_verifies(
    tmp_path: Path,
    hub: LocalHub,
    hub_kind: str,
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
) -> None:
    """The whole story against both kinds of Hub files: LFS-only (no xetHash: the base's shards are uploaded)
    and Xet-backed (they are copied server-side). Either way one commit, and a fresh download loads."""
    from huggingface_hub import snapshot_download

    manifest, out, repo_id = make_build(
        tmp_path, published_remote_base, remote_trainer_output, push_spec={"tag": "v1"}
    )
    hub.clear_log()
    result = push(manifest)
    assert not result.up_to_date and result.created_repo and result.tag == "v1"
    assert result.commit_sha == hub.branch_head(repo_id)
    assert hub.commit_count(repo_id) == 2  # the initial commit and ours
    shard_bytes = {p: (out / p).stat().st_size for p in (*BASE_SHARDS, TUNED_SHARD)}
    if hub_kind == "xet":  # untouched base shards are copied server-side, not uploaded
        assert set(result.copied) == BASE_SHARDS and not result.notes
        assert result.bytes_copied == sum(shard_bytes[p] for p in BASE_SHARDS)
        assert lfs_bytes(hub) == shard_bytes[TUNED_SHARD]
        assert result.bytes_uploaded < result.bytes_in_build
    else:  # no xetHash: the Hub cannot copy them, so they are uploaded, and the push says so in one line
        assert result.copied == [] and BASE_SHARDS <= set(result.uploaded) and result.bytes_copied == 0
        assert result.notes == [
            (
                "2 shard(s) identical to the base are uploaded: the base serves them without a xetHash, "
                "so the Hub cannot copy them server-side"
            )
        ]
        assert lfs_bytes(hub) == sum(shard_bytes.values())
        assert not hub.requests(route="lfs-duplicate")

    fresh = Path(snapshot_download(repo_id, revision="v1", cache_dir=tmp_path / "fresh-cache"))
    for path in out.iterdir():
        assert (fresh / path.name).read_bytes() == path.read_bytes(), path.name
    assert verify(fresh, trust_remote_code=True, update_record=False).passed

    again = push(manifest)
    assert again.up_to_date and hub.commit_count(repo_id) == 2 and again.tag == "v1"
    assert again.commit_url == f"{hub.endpoint}/{repo_id}/commit/{result.commit_sha}"


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
    tmp_path: Path, hub: LocalHub, published_remote_base: PublishedModel, remote_trainer_output: Path
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
    # links go to the Hub the base came from (HF_ENDPOINT), not to huggingface.co
    base_url = f"{hub.endpoint}/{published_remote_base.repo_id}"
    assert f"[{published_remote_base.repo_id}]({base_url})" in text
    assert f"]({base_url}/tree/{published_remote_base.sha})" in text
    assert f"https://huggingface.co/{published_remote_base.repo_id}" not in text
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


def test_a_check_that_did_not_run_is_skipped_on_the_card_never_failed() -> None:
    from hubsync.card import CardInputs, verification_section

    checks = [
        {"name": "files match hubsync.json", "ok": True, "detail": "12 files"},
        {
            "name": "frozen parts untouched",
            "ok": None,
            "detail": "a LoRA merge has no frozen shard to compare",
        },
        {"name": "model runs", "ok": False, "detail": "chat() raised | an error"},
    ]
    inputs = CardInputs(
        repo_id="my-org/m",
        base_repo=None,
        base_sha=None,
        base_card=None,
        manifest={},
        verification={"passed": False, "device": "cpu", "checks": checks},
    )
    rows = verification_section(inputs).splitlines()
    assert "| files match hubsync.json | pass | 12 files |" in rows
    assert "| frozen parts untouched | skipped (a LoRA merge has no frozen shard to compare) | |" in rows
    assert "| model runs | FAIL | chat() raised \\| an error |" in rows


def test_two_builds_from_the_same_inputs_then_two_pushes_make_one_commit(
    tmp_path: Path, hub: LocalHub, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    manifest, out, repo_id = make_build(
        tmp_path, published_remote_base, remote_trainer_output, push_spec={"tag": "v1"}
    )
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert push(manifest).tag == "v1"
    again = build(manifest, record_last_build=False).output
    assert verify(again).passed
    second = {p.name: p.read_bytes() for p in again.iterdir()}
    assert [p for p in first if first[p] != second.get(p)] == []  # the card and the record included
    result = push(manifest)
    assert result.up_to_date and result.tag == "v1" and hub.commit_count(repo_id) == 2


def test_a_tag_on_another_commit_stops_the_push_before_anything_is_published(
    tmp_path: Path, hub: LocalHub, published_remote_base: PublishedModel, trainer_output_factory: Any
) -> None:
    first = trainer_output_factory("remote")
    manifest, out, repo_id = make_build(tmp_path, published_remote_base, first, push_spec={"tag": "v1"})
    tagged = push(manifest).commit_sha
    assert tagged is not None
    rebuild(manifest, "finetune", "path", str(changed_copy(first, tmp_path / "second-run")))
    hub.clear_log()
    with pytest.raises(
        PushError,
        match=rf"^tag v1 is on commit {tagged[:12]} of {repo_id}, not on the commit this push publishes: "
        r"choose another `push.tag`, or set `push.tag_move: true` to move it$",
    ):
        push(manifest)
    assert hub.branch_head(repo_id) == tagged and hub.commit_count(repo_id) == 2
    assert not hub.requests(route="lfs-upload") and not hub.requests(route="commit")

    rebuild(manifest, "push", "tag_move", True)
    moved = push(manifest)
    assert moved.tag == "v1" and moved.commit_sha == hub.branch_head(repo_id) != tagged
    from huggingface_hub import HfApi

    assert {t.name: t.target_commit for t in HfApi().list_repo_refs(repo_id).tags} == {"v1": moved.commit_sha}


def test_a_new_branch_starts_from_the_named_ref_and_drops_its_stale_files(
    tmp_path: Path, hub: LocalHub, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    from huggingface_hub import HfApi

    manifest, out, repo_id = make_build(tmp_path, published_remote_base, remote_trainer_output)
    push(manifest)
    api = HfApi()
    api.upload_file(path_or_fileobj=b"stale", path_in_repo="stale.txt", repo_id=repo_id)
    api.create_tag(repo_id, tag="with-stale")
    main_head = hub.branch_head(repo_id)
    rebuild(manifest, "push", "revision", "dev")
    rebuild(manifest, "push", "branch_from", "with-stale")
    result = push(manifest)
    assert result.created_branch and result.deleted == ["stale.txt"]
    assert "stale.txt" not in hub.list_files(repo_id, "dev", content=False)
    assert hub.commit_count(repo_id, "dev") == 4  # initial, the first push, stale.txt, this push
    assert hub.branch_head(repo_id) == main_head and "stale.txt" in hub.list_files(repo_id, content=False)
    assert push(manifest).up_to_date


def test_a_new_branch_from_a_missing_ref_is_refused_before_anything_is_created(
    tmp_path: Path, hub: LocalHub, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    manifest, out, repo_id = make_build(tmp_path, published_remote_base, remote_trainer_output)
    push(manifest)
    rebuild(manifest, "push", "revision", "dev")
    rebuild(manifest, "push", "branch_from", "nowhere")
    with pytest.raises(
        PushError,
        match=rf"^branch dev does not exist in {repo_id} and `push.branch_from` names `nowhere`, which does "
        "not exist there either: set `push.branch_from` to a branch, tag or commit of that repo$",
    ):
        push(manifest)
    assert hub.branch_head(repo_id, "dev") is None


@pytest.fixture
def xet_hub(hub: LocalHub) -> Iterator[LocalHub]:
    hub.xet = True
    try:
        yield hub
    finally:
        hub.xet = False


def test_copies_the_hub_refuses_are_uploaded_in_the_same_commit(
    tmp_path: Path, xet_hub: LocalHub, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    """Another storage region: the duplicate endpoint reports every file as failed (FileDuplicationError)."""
    manifest, out, repo_id = make_build(tmp_path, published_remote_base, remote_trainer_output)
    xet_hub.inject_fault("lfs-duplicate", kind="reject")
    result = push(manifest)
    assert result.copied == [] and BASE_SHARDS <= set(result.uploaded)
    assert result.notes == [
        (
            f"the Hub would not copy 2 shard(s) server-side from {published_remote_base.repo_id} (Files cannot be "
            "duplicated between these storage regions): uploaded them instead, in the same commit"
        )
    ]
    assert xet_hub.commit_count(repo_id) == 2
    files = xet_hub.list_files(repo_id)
    assert all(files[p] == (out / p).read_bytes() for p in BASE_SHARDS)


def test_a_copy_source_the_user_cannot_read_is_uploaded_instead(
    tmp_path: Path,
    xet_hub: LocalHub,
    remote_base_dir: Path,
    trainer_output_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gated base that the pushing user has no access to: its metadata is public, its files are not, so the
    duplicate call is refused (403) and the shards are uploaded from the build instead."""
    gated = publish_model(
        remote_base_dir, f"my-org/{unique_repo_name('gated-base')}", endpoint=xet_hub.endpoint
    )
    xet_hub.set_gated(gated.repo_id)
    finetune = trainer_output_factory("remote", base_repo_id=gated.repo_id)
    target = f"other/{unique_repo_name('ft')}"
    manifest, out, _ = make_build(tmp_path, gated, finetune, push_spec={"repo": target})
    monkeypatch.setenv("HF_TOKEN", OTHER_TOKEN)
    result = push(manifest)
    assert result.copied == [] and BASE_SHARDS <= set(result.uploaded)
    [note] = result.notes
    assert note.startswith(f"the Hub would not copy 2 shard(s) server-side from {gated.repo_id} (HTTP 403: ")
    assert xet_hub.commit_count(target) == 2
    assert xet_hub.list_files(target)[TUNED_SHARD] == (out / TUNED_SHARD).read_bytes()


def test_a_base_that_loses_its_xet_hash_before_the_commit_is_uploaded_instead(
    tmp_path: Path,
    xet_hub: LocalHub,
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The plan saw a xetHash; by the commit the Hub serves none (huggingface_hub's "no xet hash" ValueError)."""
    import hubsync.push as push_package

    manifest, out, repo_id = make_build(tmp_path, published_remote_base, remote_trainer_output)
    real = push_package.base_files

    def then_the_hub_changes(api: Any, record: Any) -> Any:
        files = real(api, record)
        xet_hub.xet = False
        return files

    monkeypatch.setattr(push_package, "base_files", then_the_hub_changes)
    result = push(manifest)
    assert result.copied == [] and BASE_SHARDS <= set(result.uploaded)
    assert result.notes == [
        (
            f"the Hub would not copy 2 shard(s) server-side from {published_remote_base.repo_id} (the base serves "
            "them without a xetHash): uploaded them instead, in the same commit"
        )
    ]
    assert xet_hub.commit_count(repo_id) == 2


def test_skip_verify_check_hashes_the_files_as_they_are_now(
    tmp_path: Path, hub: LocalHub, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    manifest, out, repo_id = make_build(tmp_path, published_remote_base, remote_trainer_output)
    push(manifest)
    shard = out / TUNED_SHARD
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # a shard edited after verification
    shard.write_bytes(bytes(data))
    result = push(manifest, skip_verify_check=True)
    assert TUNED_SHARD in result.uploaded and result.changed_since_verification == [TUNED_SHARD]
    assert result.notes[0] == (
        f"--skip-verify-check: 1 file(s) changed since verification, pushed as they are now: {TUNED_SHARD}"
    )
    assert hub.list_files(repo_id)[TUNED_SHARD] == bytes(data)


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
    args: list[str],
    hub: LocalHub,
    tmp_path: Path,
    token: str | None = DEFAULT_TOKEN,
    cwd: Path | None = None,
    env_extra: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """The CLI against the session Hub, with a fresh HF_HOME and the given token."""
    env = {**os.environ, **hub.client_env(tmp_path / "hf-cli", token=token), **(env_extra or {})}
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
    assert (
        other.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: you are logged in as other, who cannot write to {repo_id}")
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


def test_push_json_and_the_action_outputs_agree(
    tmp_path: Path, hub: LocalHub, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    """`--json` and the GitHub Action's outputs come from one result: the same commit url, also when nothing
    changed (0.1.0 said `commit_url: null` there while the Action filled it in)."""
    manifest, _, repo_id = make_build(tmp_path, published_remote_base, remote_trainer_output)
    for when in ("first", "up to date"):
        outputs = tmp_path / f"outputs-{when}"
        actions = {"GITHUB_ACTIONS": "true", "GITHUB_OUTPUT": str(outputs)}
        pushed = hubsync(["push", "--json", str(manifest)], hub, tmp_path, env_extra=actions)
        assert pushed.returncode == 0, pushed.stderr
        data = json.loads(pushed.stdout)
        data = data.get("result", data)  # a JSON envelope around the result, or the result itself
        out = dict(line.split("=", 1) for line in outputs.read_text().splitlines())
        head = hub.branch_head(repo_id)
        assert data["up_to_date"] is (when == "up to date")
        assert out["up-to-date"] == str(data["up_to_date"]).lower()
        assert data["commit_sha"] == out["commit-sha"] == head
        assert data["commit_url"] == out["commit-url"] == f"{hub.endpoint}/{repo_id}/commit/{head}"
        assert data["repo_url"] == out["repo-url"] and data["revision"] == out["revision"] == "main"
        assert str(data["bytes_uploaded"]) == out["bytes-uploaded"]


def test_status_cannot_tell_a_private_repo_from_a_missing_one(
    tmp_path: Path, hub: LocalHub, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    """The Hub answers "private, and not yours" and "missing" alike, so status says both, never "does not
    exist yet", unless the token can see the namespace (0.1.0 told an anonymous user "does not exist yet")."""
    manifest, _, repo_id = make_build(tmp_path, published_remote_base, remote_trainer_output)
    push(manifest)  # private by default
    hidden = (
        f"remote  {repo_id}@main does not exist, or is private and your token cannot read it (the Hub answers "
        "both alike)"
    )
    anonymous = hubsync(["status", str(manifest)], hub, tmp_path, token=None)
    assert anonymous.returncode == 0, anonymous.stderr
    assert f"{hidden}; no token is set: set HF_TOKEN to see private repos" in anonymous.stdout
    other = hubsync(["status", "--json", str(manifest)], hub, tmp_path, token=OTHER_TOKEN)
    assert other.returncode == 0, other.stderr
    assert json.loads(other.stdout)["remote"]["exists"] is None
    text = hubsync(["status", str(manifest)], hub, tmp_path, token=OTHER_TOKEN).stdout
    assert f"{hidden}\n" in text + "\n" and "does not exist yet" not in text
    owner = hubsync(["status", str(manifest)], hub, tmp_path)
    assert f"remote  {repo_id}@main matches the build" in owner.stdout
