"""Pytest plugin: one local Hub emulator for the whole session, and the client environment pointing at it.

The Hub starts and the HF_* variables are set at *import* of this module, because huggingface_hub reads them once,
when it is first imported; conftest.py loads this plugin before any test module can import the client.
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from hubsync.testing.hub import DEFAULT_TOKEN, LocalHub

if TYPE_CHECKING:
    from huggingface_hub import HfApi

if "huggingface_hub" in sys.modules:
    # too late: the client has pinned its endpoint and cache paths already
    raise RuntimeError(
        "tests.fixtures_hub must be loaded before huggingface_hub is imported (see conftest.py)"
    )

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="hubsync-tests-"))
# LFS-only files (no xetHash), as the real Hub serves repos uploaded before the Xet migration; tests that need
# Xet-backed files ask for the `hub_kind` fixture
_HUB = LocalHub(_SESSION_DIR / "hub").start()
os.environ.update(_HUB.client_env(_SESSION_DIR / "hf_home", token=DEFAULT_TOKEN))
# hubsync's own cache (rename tables, converted checkpoints) too: tests never write the developer's ~/.cache
os.environ["HUBSYNC_CACHE_DIR"] = str(_SESSION_DIR / "hubsync-cache")


def _shutdown() -> None:
    _HUB.stop()
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


atexit.register(_shutdown)

_counter = itertools.count(1)


def unique_repo_name(prefix: str = "repo") -> str:
    """A repo name no other test of this session uses (the session Hub is shared)."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", prefix).strip("-.")[:60] or "repo"
    return f"{clean}-{next(_counter)}-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def hub() -> LocalHub:
    """The session's LocalHub; HF_ENDPOINT points at it."""
    return _HUB


@pytest.fixture(params=["lfs", "xet"])
def hub_kind(request: pytest.FixtureRequest, hub: LocalHub) -> Iterator[str]:
    """Run the test twice: against plain LFS files (no xetHash: server-side copies are impossible) and against
    Xet-backed files (copies work). The session Hub is switched for the test and back to LFS-only after it."""
    hub.xet = request.param == "xet"
    try:
        yield request.param
    finally:
        hub.xet = False


@pytest.fixture
def hub_env(hub: LocalHub, tmp_path: Path) -> dict[str, str]:
    """A full environment for a CLI subprocess: this process's env, the Hub's endpoint, a fresh HF_HOME."""
    return {**os.environ, **hub.client_env(tmp_path / "hf_home", token=DEFAULT_TOKEN)}


@pytest.fixture
def hf_api(hub: LocalHub) -> HfApi:
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.endpoint, token=DEFAULT_TOKEN)


@pytest.fixture
def repo_name(request: pytest.FixtureRequest) -> str:
    """A unique repo name (no namespace) derived from the test's name."""
    return unique_repo_name(request.node.name)


@pytest.fixture
def make_repo_name(request: pytest.FixtureRequest) -> Callable[[], str]:
    """Call it for as many unique repo names as a test needs."""
    return lambda: unique_repo_name(request.node.name)


@pytest.fixture(autouse=True)
def _reset_hub(hub: LocalHub) -> Iterator[None]:
    yield
    hub.clear_faults()
    hub.clear_log()
