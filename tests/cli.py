"""The one way tests run the CLI: `python -m hubsync ...` in a subprocess, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Exit code, stdout and stderr of `hubsync ARGS`. `env` is the whole environment (default: this
    process's), `extra_env` is laid over it; HUBSYNC_DEBUG is dropped unless one of them sets it."""
    full = dict(os.environ if env is None else env)
    if "HUBSYNC_DEBUG" not in (extra_env or {}) and (env is None or "HUBSYNC_DEBUG" not in env):
        full.pop("HUBSYNC_DEBUG", None)
    full.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "hubsync", *args],
        env=full,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )
