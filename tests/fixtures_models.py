"""Pytest plugin: tiny deterministic base models, their copies on the session Hub, and fine-tune outputs.

Session-scoped folders are shared by every test: treat them as read-only (copy one with `shutil.copytree`
before changing it). `trainer_output_factory` makes a fresh folder on every call, for tests that need a variant.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest

from hubsync.testing.hub import DEFAULT_TOKEN, LocalHub
from hubsync.testing.models import (
    PublishedModel,
    make_native_vlm,
    make_remote_code_vlm,
    make_trainer_output,
    publish_model,
)
from tests.fixtures_hub import unique_repo_name

# The namespace the default token may write to on the emulated Hub.
HUB_NAMESPACE = "my-org"


@pytest.fixture(scope="session")
def native_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LLaVA base snapshot (bf16, four shards) written by transformers 5's `save_pretrained`."""
    return make_native_vlm(tmp_path_factory.mktemp("native-base") / "tiny-llava")


@pytest.fixture(scope="session")
def remote_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A MiniCPM-V look-alike base snapshot (remote code, bf16, three shards), laid out as 4.x wrote it."""
    return make_remote_code_vlm(tmp_path_factory.mktemp("remote-base") / "tiny-minicpmv")


@pytest.fixture(scope="session")
def published_native_base(hub: LocalHub, native_base_dir: Path) -> PublishedModel:
    repo_id = f"{HUB_NAMESPACE}/{unique_repo_name('tiny-llava')}"
    return publish_model(native_base_dir, repo_id, endpoint=hub.endpoint, token=DEFAULT_TOKEN)


@pytest.fixture(scope="session")
def published_remote_base(hub: LocalHub, remote_base_dir: Path) -> PublishedModel:
    repo_id = f"{HUB_NAMESPACE}/{unique_repo_name('tiny-minicpmv')}"
    return publish_model(remote_base_dir, repo_id, endpoint=hub.endpoint, token=DEFAULT_TOKEN)


@pytest.fixture(scope="session")
def remote_trainer_output(
    tmp_path_factory: pytest.TempPathFactory, remote_base_dir: Path, published_remote_base: PublishedModel
) -> Path:
    """A vision fine-tune of the remote-code base: fp32 full state dict in one file, tokenizer, no processor
    config and no `.py` files, `auto_map` pointing at the published base as `repo--module.Class`."""
    return make_trainer_output(
        remote_base_dir,
        tmp_path_factory.mktemp("remote-trainer") / "checkpoint-3",
        base_repo_id=published_remote_base.repo_id,
    )


@pytest.fixture(scope="session")
def native_trainer_output(
    tmp_path_factory: pytest.TempPathFactory, native_base_dir: Path, published_native_base: PublishedModel
) -> Path:
    """A vision-tower + projector fine-tune of the LLaVA base: fp32, one file, tokenizer, no processor config."""
    return make_trainer_output(
        native_base_dir,
        tmp_path_factory.mktemp("native-trainer") / "checkpoint-3",
        base_repo_id=published_native_base.repo_id,
    )


TrainerOutputFactory = Callable[..., Path]


@pytest.fixture
def trainer_output_factory(
    tmp_path: Path,
    native_base_dir: Path,
    remote_base_dir: Path,
    published_native_base: PublishedModel,
    published_remote_base: PublishedModel,
) -> TrainerOutputFactory:
    """`factory(kind="remote" | "native", **options)` -> a new trainer-output folder under this test's tmp_path.

    Options are those of `make_trainer_output` (dtype, key_prefix, sharded, stray_shard, tune, steps, seed,
    also_perturb, key_style, config_updates); `base_repo_id` defaults to the published base.
    """
    counter = iter(range(1, 1_000_000))

    def factory(kind: Literal["remote", "native"] = "remote", **options: Any) -> Path:
        if kind == "remote":
            base_dir, published = remote_base_dir, published_remote_base
        elif kind == "native":
            base_dir, published = native_base_dir, published_native_base
        else:
            raise ValueError(f"kind must be 'remote' or 'native', not {kind!r}")
        options.setdefault("base_repo_id", published.repo_id)
        return make_trainer_output(base_dir, tmp_path / f"{kind}-trainer-{next(counter)}", **options)

    return factory
