"""`hubsync doctor` and the runtime a base needs: a base whose config.json was written by transformers 4.x is
loaded in the verification worker (never in hubsync's process); one that does not load here gets
`verify.requirements` in the printed manifest, one that does gets none, and one doctor could not try gets the
suggestion as a comment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hubsync.doctor import diagnose
from hubsync.testing.broken_models import make_legacy_only_model
from hubsync.testing.models import make_trainer_output
from hubsync.verify.runtime import current_runtime
from tests.cli import run_cli

RUNNING = current_runtime().versions["transformers"]
pytestmark = [
    pytest.mark.xdist_group("test_doctor_runtime"),
    pytest.mark.skipif(
        not RUNNING.startswith("5."), reason="the 4.x fixture is another major only under transformers 5"
    ),
]


@pytest.fixture(scope="module")
def legacy_base(tmp_path_factory: pytest.TempPathFactory, remote_base_dir: Path) -> Path:
    return make_legacy_only_model(remote_base_dir, tmp_path_factory.mktemp("legacy") / "tiny-minicpmv-legacy")


@pytest.fixture(scope="module")
def finetune(tmp_path_factory: pytest.TempPathFactory, remote_base_dir: Path) -> Path:
    return make_trainer_output(
        remote_base_dir, tmp_path_factory.mktemp("ft") / "checkpoint-3", base_repo_id="local/tiny-minicpmv"
    )


def written_by(base: Path) -> str:
    return json.loads((base / "config.json").read_text())["transformers_version"]


def verify_section(text: str) -> dict[str, object]:
    return yaml.safe_load(text)["verify"]


def test_a_base_that_does_not_load_here_gets_requirements(
    legacy_base: Path, finetune: Path, tmp_path: Path
) -> None:
    result = diagnose(finetune, str(legacy_base), cwd=tmp_path, trust_remote_code=True)
    version = written_by(legacy_base)
    finding = next(f for f in result.findings if "does not load under" in f)
    assert f"the base does not load under transformers {RUNNING} (" in finding
    assert "all_tied_weights_keys" in finding  # the worker's own error, not a guess
    assert f"written by transformers {version}" in finding
    assert verify_section(result.manifest_text)["requirements"] == [
        f"transformers=={version}",
        "torch==2.6.0",
    ]
    assert "# verify.python: /path/to/env/bin/python" in result.manifest_text


def test_a_base_that_loads_here_gets_no_requirements(
    remote_base_dir: Path, finetune: Path, tmp_path: Path
) -> None:
    result = diagnose(finetune, str(remote_base_dir), cwd=tmp_path, trust_remote_code=True)
    assert f"it loads under {RUNNING} too" in " | ".join(result.findings)
    assert "requirements" not in verify_section(result.manifest_text)
    assert "verify.requirements" not in result.manifest_text


def test_remote_code_is_not_run_without_consent(legacy_base: Path, finetune: Path, tmp_path: Path) -> None:
    """Without --trust-remote-code the base's code is not run: the suggestion stays a comment."""
    proc = run_cli("doctor", str(finetune), "--base", str(legacy_base), cwd=tmp_path)
    assert "its remote code was not run: `hubsync doctor --trust-remote-code`" in proc.stderr
    assert "requirements" not in verify_section(proc.stdout)
    version = written_by(legacy_base)
    assert f"# verify.requirements: [transformers=={version}, torch==2.6.0]" in proc.stdout
    proc = run_cli("doctor", str(finetune), "--base", str(legacy_base), "--trust-remote-code", cwd=tmp_path)
    assert "the base does not load under transformers" in proc.stderr, proc.stderr
    assert verify_section(proc.stdout)["requirements"] == [f"transformers=={version}", "torch==2.6.0"]
