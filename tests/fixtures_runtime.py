"""Pytest plugin: the second verification runtime, a venv with transformers 4.40 on the CPU torch, made once per
session through `verify.requirements` (hubsync's own code path) and shared by every test that needs it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hubsync.verify import runtime as R

# The transformers the real MiniCPM-Llama3-V 2.5 code was written for, on the CPU torch of this machine.
LEGACY_REQUIREMENTS = ["transformers==4.40.2", "torch==2.13.0", "pillow"]


@pytest.fixture(scope="session")
def legacy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hubsync cache folder (HUBSYNC_CACHE_DIR) that holds the legacy runtime's venv, made once."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # one venv for all the workers of this run: the first makes it, the others wait on its lock
        cache = tmp_path_factory.getbasetemp().parent / "hubsync-legacy-cache"
        cache.mkdir(exist_ok=True)
    else:
        cache = tmp_path_factory.mktemp("hubsync-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HUBSYNC_CACHE_DIR", str(cache))
        patch.setenv(R.INSTALLER_ENV, "pip")  # pip reads this machine's pip.conf (the local torch wheel)
        R.requirements_runtime(LEGACY_REQUIREMENTS)
    return cache


@pytest.fixture(scope="session")
def legacy_runtime(legacy_cache: Path) -> tuple[R.Runtime, Path]:
    """The legacy runtime (found in its cache, not made again) and the cache folder it lives in."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HUBSYNC_CACHE_DIR", str(legacy_cache))
        patch.setenv(R.INSTALLER_ENV, "pip")
        return R.requirements_runtime(LEGACY_REQUIREMENTS), legacy_cache
