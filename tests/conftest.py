"""Test wiring. The Hub emulator plugin comes first: it sets HF_ENDPOINT and friends before anything imports
huggingface_hub (the client reads them once, at import)."""

import os

import pytest

pytest_plugins = ["tests.fixtures_hub", "tests.fixtures_models", "tests.fixtures_runtime"]

# The suite may itself run inside GitHub Actions; hubsync's CI output (annotations, summaries) must only appear
# where a test asks for it, so the runner's variables are dropped for the whole session.
for _name in ("GITHUB_ACTIONS", "GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY", "GITHUB_ENV", "GITHUB_PATH"):
    os.environ.pop(_name, None)


@pytest.fixture(autouse=True)
def _no_last_build_in_the_checkout(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Builds record `.hubsync/last-build.json` in the working directory; keep tests out of the checkout."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
