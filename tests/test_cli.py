"""The CLI as a user meets it: in a subprocess, with exit codes and exactly what is printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hubsync import __version__
from tests.cli import run_cli


def run(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, extra_env=env, cwd=cwd, timeout=120)


def test_help_lists_every_command() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("build", "verify", "push", "plan", "status", "doctor", "validate", "demo"):
        assert f"  {command} " in result.stdout


def test_help_imports_no_heavy_library() -> None:
    code = (
        "import sys; from hubsync.cli import cli\n"
        "try:\n    cli.main(['--help'], standalone_mode=False)\nexcept SystemExit: pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'huggingface_hub', 'safetensors') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0 and __version__ in result.stdout


def test_unknown_command_is_a_usage_error() -> None:
    result = run("nope")
    assert result.returncode == 2 and "No such command 'nope'" in result.stderr


def test_misspelt_manifest_key_is_one_line(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text("base: {repo: a/b@main}\nfinetune: {pth: x}\noutput: {dir: o}\n")
    result = run("validate", str(manifest))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"{manifest}:2: finetune.pth: unknown key 'pth': did you mean `path`?"
    ]
    assert "Traceback" not in result.stderr


def test_validate_reports_all_problems_and_json(tmp_path: Path) -> None:
    import json

    manifest = tmp_path / "manifest.yaml"
    manifest.write_text("base: {repo: a/b}\nfinetune: {pth: x}\noutput: {dir: o, dtype: fp8}\n")
    result = run("validate", str(manifest))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 3
    result = run("validate", "--json", str(manifest))
    data = json.loads(result.stdout)
    assert data["ok"] is False and [p["line"] for p in data["error"]["problems"]] == [1, 2, 3]


def test_validate_good_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text("base: {repo: a/b@main}\nfinetune: {path: x}\noutput: {dir: o}\n")
    result = run("validate", str(manifest))
    assert result.returncode == 0 and result.stdout.strip() == f"{manifest}: valid"


def test_user_error_traceback_only_with_debug(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.yaml")
    quiet = run("validate", missing)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    loud = run("plan", missing, env={"HUBSYNC_DEBUG": "1"})
    assert loud.returncode != 0 and "Traceback" in loud.stderr
