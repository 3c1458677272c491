"""The model's runtime is not ours. A model whose code only runs on transformers 4.x (MiniCPM-Llama3-V 2.5's
case: `post_init()` never called) builds, verifies and pushes through `verify.requirements`; without it, the build
fails with one line that blames the base and names the fix, and nothing is replaced."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from hubsync.record import load
from hubsync.testing.broken_models import make_legacy_only_model
from hubsync.testing.hub import DEFAULT_TOKEN, LocalHub
from hubsync.testing.models import PublishedModel, make_trainer_output, publish_model
from tests.cli import run_cli
from tests.fixtures_hub import unique_repo_name
from tests.fixtures_models import HUB_NAMESPACE
from tests.fixtures_runtime import LEGACY_REQUIREMENTS
from tests.test_build import REMOTE_TUNED, write_manifest

# one xdist worker runs this whole module, so its module- and session-scoped fixtures are made once
pytestmark = [pytest.mark.xdist_group("test_verify_runtime")]


@pytest.fixture(scope="module")
def legacy_base(
    tmp_path_factory: pytest.TempPathFactory, hub: LocalHub, remote_base_dir: Path
) -> PublishedModel:
    folder = make_legacy_only_model(
        remote_base_dir, tmp_path_factory.mktemp("legacy") / "tiny-minicpmv-legacy"
    )
    repo_id = f"{HUB_NAMESPACE}/{unique_repo_name('legacy-minicpmv')}"
    return publish_model(folder, repo_id, endpoint=hub.endpoint, token=DEFAULT_TOKEN)


@pytest.fixture(scope="module")
def legacy_finetune(
    tmp_path_factory: pytest.TempPathFactory, remote_base_dir: Path, legacy_base: PublishedModel
) -> Path:
    """A vision fine-tune of it, as the trainer saves it (same weights layout: only the code differs)."""
    return make_trainer_output(
        remote_base_dir,
        tmp_path_factory.mktemp("legacy-ft") / "checkpoint-3",
        base_repo_id=legacy_base.repo_id,
    )


def manifest(tmp_path: Path, base: PublishedModel, finetune: Path, **verify: Any) -> Path:
    extra = {
        "verify": verify,
        "push": {"repo": f"{HUB_NAMESPACE}/{unique_repo_name('legacy-ft')}"},
    }
    return write_manifest(tmp_path, base, finetune, REMOTE_TUNED, extra=extra)


def environment(hub: LocalHub, tmp_path: Path, cache: Path | None = None) -> dict[str, str]:
    env = {**os.environ, **hub.client_env(tmp_path / "hf", token=DEFAULT_TOKEN)}
    if cache is not None:
        env.update(HUBSYNC_CACHE_DIR=str(cache), HUBSYNC_VENV_INSTALLER="pip")
    return env


def test_without_the_models_runtime_the_base_is_blamed(
    tmp_path: Path, hub: LocalHub, legacy_base: PublishedModel, legacy_finetune: Path
) -> None:
    built = run_cli(
        "build", str(manifest(tmp_path, legacy_base, legacy_finetune)), env=environment(hub, tmp_path)
    )
    assert built.returncode == 1
    line = built.stderr.strip().splitlines()[-1]
    assert line.startswith(
        f"error: the base {legacy_base.repo_id} @ {legacy_base.sha[:12]} itself does not load under transformers 5."
    ), line
    assert "'MiniCPMV' object has no attribute 'all_tied_weights_keys'" in line
    assert (
        "its config.json was written by transformers 4.40.0: set verify.requirements: "
        "[transformers==4.40.0, torch==2.6.0] or verify.python"
    ) in line
    assert "Traceback" not in built.stderr
    assert not (tmp_path / "out").exists()  # an unverified build never becomes the output


@pytest.mark.timeout(1800)
def test_with_the_models_runtime_it_builds_verifies_and_pushes(
    tmp_path: Path,
    hub: LocalHub,
    legacy_cache: Path,
    legacy_base: PublishedModel,
    legacy_finetune: Path,
) -> None:
    env = environment(hub, tmp_path, legacy_cache)
    path = manifest(tmp_path, legacy_base, legacy_finetune, requirements=LEGACY_REQUIREMENTS)
    built = run_cli("build", str(path), env=env, cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    verification = load(tmp_path / "out").verification
    assert verification is not None and verification.passed
    assert verification.versions["transformers"] == "4.40.2"
    assert dict(verification.runtime) == {"kind": "requirements", "requirements": LEGACY_REQUIREMENTS}
    assert str(legacy_cache) not in (tmp_path / "out" / "hubsync.json").read_text()  # no local path published
    pushed = run_cli("push", "--json", env=env, cwd=tmp_path)  # the last build made in this folder
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    # `hubsync verify DIR` finds the manifest beside the folder and verifies in the same runtime again
    again = run_cli("verify", "--json", str(tmp_path / "out"), env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4.40.2" in json.dumps(json.loads(again.stdout))


@pytest.mark.timeout(1200)
def test_the_command_line_names_the_training_environment(
    tmp_path: Path,
    hub: LocalHub,
    legacy_runtime: tuple[Any, Path],
    legacy_base: PublishedModel,
    legacy_finetune: Path,
) -> None:
    """`--verify-python` (the Action's verify-python input): the same manifest, verified with the interpreter of
    an existing environment (here the transformers 4.40 venv, as a training env would be)."""
    runtime, cache = legacy_runtime
    path = manifest(tmp_path, legacy_base, legacy_finetune)
    both = run_cli(
        "build",
        str(path),
        "--verify-python",
        "x",
        "--verify-requirement",
        "y",
        env=environment(hub, tmp_path),
    )
    assert both.returncode == 2 and "give --verify-python or --verify-requirement, not both" in both.stderr
    built = run_cli(
        "build",
        str(path),
        "--verify-python",
        str(runtime.python),
        env=environment(hub, tmp_path, cache),
        cwd=tmp_path,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    verification = load(tmp_path / "out").verification
    assert verification is not None and verification.passed
    assert verification.runtime["kind"] == "python" and verification.versions["transformers"] == "4.40.2"
