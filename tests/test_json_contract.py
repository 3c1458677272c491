"""The `--json` contract, command by command: exactly one JSON document on stdout, on success
(`{"ok": true, ...data}`) and on error (`{"ok": false, "error": {kind, message, file, line, exit_code}}`),
whatever else the command, its libraries or a child process print."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from hubsync.testing.hub import LocalHub
from hubsync.testing.models import PublishedModel
from tests.cli import run_cli
from tests.fixtures_hub import unique_repo_name
from tests.test_build import REMOTE_TUNED, write_manifest

# one xdist worker runs this whole module, so its module- and session-scoped fixtures are made once
pytestmark = [pytest.mark.xdist_group("test_json_contract")]

ERROR_KEYS = {"kind", "message", "file", "line", "exit_code"}


def document(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The one document on stdout, checked against the contract for the exit code the command had."""
    assert result.stdout.strip(), f"nothing on stdout; stderr: {result.stderr[-2000:]}"
    data = json.loads(result.stdout)  # fails on anything but exactly one document
    assert isinstance(data, dict)
    if result.returncode == 0:
        assert data["ok"] is True and "error" not in data, data
    else:
        assert data["ok"] is False, data
        assert set(data["error"]) >= ERROR_KEYS
        assert data["error"]["exit_code"] == result.returncode
        assert data["error"]["message"] and "Traceback" not in result.stderr
    return data


@pytest.fixture(scope="module")
def env(hub: LocalHub, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {**os.environ, **hub.client_env(tmp_path_factory.mktemp("hf"))}


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory,
    env: dict[str, str],
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """`hubsync build --json` of a manifest with a push section, run once for this module's tests."""
    folder = tmp_path_factory.mktemp("json-build")
    repo = f"my-org/{unique_repo_name('json')}"
    manifest = write_manifest(
        folder, published_remote_base, remote_trainer_output, REMOTE_TUNED, extra={"push": {"repo": repo}}
    )
    return manifest, run_cli("build", "--json", str(manifest), env=env, cwd=folder)


def test_validate(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text("base: {repo: a/b@main}\nfinetune: {path: x}\noutput: {dir: o}\n")
    ok = document(run_cli("validate", "--json", str(manifest)))
    assert ok["valid"] is True and ok["manifest"]["base"]["repo"] == "a/b"
    manifest.write_text("base: {repo: a/b@main}\nfinetune: {pth: x}\noutput: {dir: o, dtype: fp8}\n")
    bad = run_cli("validate", "--json", str(manifest))
    data = document(bad)
    assert bad.returncode == 2 and data["valid"] is False
    error = data["error"]
    assert error["kind"] == "ManifestError" and (error["file"], error["line"]) == (str(manifest), 2)
    assert error["message"].startswith(f"{manifest}:2: finetune.pth: unknown key 'pth'")
    assert [p["line"] for p in error["problems"]] == [2, 3]
    # the problems are still listed on stderr, one per line, for a human reading the log
    assert len(bad.stderr.strip().splitlines()) == 2


def test_a_usage_error_answers_in_json_too() -> None:
    result = run_cli("build", "--json", "--no-such-option", "m.yaml")
    data = document(result)
    assert result.returncode == 2 and data["error"]["kind"] == "UsageError"
    assert "--no-such-option" in data["error"]["message"]


def test_plan(
    tmp_path: Path, env: dict[str, str], published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    good = write_manifest(tmp_path, published_remote_base, remote_trainer_output, REMOTE_TUNED)
    data = document(run_cli("plan", "--json", str(good), env=env))
    assert data["problems"] == [] and len([t for t in data["tensors"] if t["source"] == "finetune"]) == 50
    broken = write_manifest(tmp_path, published_remote_base, remote_trainer_output, None, name="b.yaml")
    refused = run_cli("plan", "--json", str(broken), env=env)
    data = document(refused)
    assert refused.returncode == 1 and data["error"]["kind"] == "PlanError"
    assert data["error"]["message"].startswith("`finetune.tuned` is not declared")
    assert data["problems"] and data["files"], "the plan itself comes with the error"


def test_build(
    built: tuple[Path, subprocess.CompletedProcess[str]],
    tmp_path: Path,
    published_remote_base: PublishedModel,
) -> None:
    _, result = built
    data = document(result)
    assert data["verification"]["passed"] is True and Path(data["output"]).is_dir()
    assert data["plan"]["problems"] == [] and data["failed_output"] is None
    manifest = write_manifest(tmp_path, published_remote_base, tmp_path / "no", REMOTE_TUNED)
    missing = run_cli("build", "--json", str(manifest), cwd=tmp_path)
    error = document(missing)["error"]
    assert error["kind"] == "FinetuneError" and "does not exist" in error["message"]
    assert (error["file"], error["line"]) == (None, None)


def test_verify(built: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path) -> None:
    manifest, _ = built
    data = document(run_cli("verify", "--json", str(manifest), cwd=manifest.parent))
    assert data["passed"] is True and {c["name"] for c in data["checks"]} >= {"files match hubsync.json"}
    (tmp_path / "folder").mkdir()
    error = document(run_cli("verify", "--json", str(tmp_path / "folder")))["error"]
    assert error["kind"] == "RecordError" and "has no hubsync.json" in error["message"]


def test_push_and_status(
    built: tuple[Path, subprocess.CompletedProcess[str]], env: dict[str, str], tmp_path: Path
) -> None:
    manifest, _ = built
    pushed = document(run_cli("push", "--json", str(manifest), env=env))
    assert pushed["commit_sha"] and pushed["uploaded"]
    state = document(run_cli("status", "--json", str(manifest), env=env))
    assert state["remote"]["in_sync"] is True and state["remote"]["head"] == pushed["commit_sha"]
    for command in ("push", "status"):  # no manifest and no build made from this directory
        error = document(run_cli(command, "--json", env=env, cwd=tmp_path))["error"]
        assert error["kind"] == "PushError" and error["message"].startswith("no build recorded")


def test_doctor(
    tmp_path: Path, env: dict[str, str], published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    result = run_cli(
        "doctor",
        "--json",
        str(remote_trainer_output),
        "--base",
        published_remote_base.repo_id,
        env=env,
        cwd=tmp_path,
    )
    data = document(result)
    assert "changed parts (declare them as finetune.tuned): resampler., vpm." in data["findings"]
    assert data["problems"] == [] and data["manifest"].startswith("base:")
    error = document(run_cli("doctor", "--json", str(tmp_path / "nothing"), "--base", "a/b", env=env))[
        "error"
    ]
    assert error["kind"] == "FinetuneError" and error["message"].endswith("does not exist: check the path")


def test_quiet_and_verbose_after_the_subcommand(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text("base: {repo: a/b@main}\nfinetune: {path: x}\noutput: {dir: o}\n")
    for args in (
        ["validate", "-q", str(manifest)],
        ["validate", str(manifest), "-v"],
        ["-q", "validate", str(manifest)],
    ):
        result = run_cli(*args)
        assert result.returncode == 0 and result.stdout.strip() == f"{manifest}: valid", (args, result.stderr)
