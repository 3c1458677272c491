"""Helpers for the safety tests: a throwaway project folder as users keep one, exact snapshots of folders, and
commands run in a private mount namespace (for real read-only, full and mounted filesystems)."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from hubsync.testing.models import PublishedModel

Snapshot = dict[str, tuple[Any, ...]]


def snapshot(folder: Path, *, skip: tuple[str, ...] = ()) -> Snapshot:
    """Every entry under `folder` (hidden ones included): type, mode and mtime of the entry itself and of
    what it points at, the link target of a symlink, and the sha256 of every file's content."""
    found: Snapshot = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if any(rel == s or rel.startswith(s + "/") for s in skip):
            continue
        own = path.lstat()
        entry: tuple[Any, ...] = (own.st_mode, own.st_mtime_ns)
        if stat.S_ISLNK(own.st_mode):
            entry += (os.readlink(path),)
        if path.is_file():
            target = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            entry += (target.st_mode, target.st_mtime_ns, target.st_size, digest)
        found[rel] = entry
    return found


def make_project(
    root: Path, base: PublishedModel, finetune: Path, *, output: str, extra: dict[str, Any] | None = None
) -> Path:
    """A project folder as a user keeps one: the manifest, the fine-tune inside it, notes and a `.git`.
    Returns the manifest. Folder-deleting cases only ever point at folders like this one."""
    project = root / "project"
    project.mkdir(parents=True, exist_ok=True)
    (project / "notes.txt").write_text("my notes\n")
    (project / ".git").mkdir(exist_ok=True)
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    if not (project / "ft").exists():
        shutil.copytree(finetune, project / "ft")
    data: dict[str, Any] = {
        "base": {"repo": base.repo_id, "revision": base.sha},
        "finetune": {"path": "ft", "tuned": ["vpm.", "resampler."]},
        "output": {"dir": output},
        "verify": {"device": "cpu", "trust_remote_code": True},
    }
    for section, values in (extra or {}).items():
        data.setdefault(section, {}).update(values)
    manifest = project / "manifest.yaml"
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    return manifest


def hubsync_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "hubsync", *args]


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


def private_mounts_available() -> bool:
    """True when this test may mount filesystems in a private mount namespace (root, `unshare -m`)."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt 2>/dev/null || exit 3"],
        capture_output=True,
        timeout=30,
    )
    return probe.returncode == 0


needs_private_mounts = pytest.mark.skipif(
    not private_mounts_available(),
    reason="needs root and `unshare -m` to mount a tmpfs (a real read-only, full or mounted filesystem)",
)


def run_with_mount(
    mount: str, command: list[str], *, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `command` after the shell commands in `mount`, in a private mount namespace: the mounts vanish with
    the process and nothing outside it ever sees them."""
    script = f'set -e; {mount}; exec "$@"'
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", *command],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=300,
    )
