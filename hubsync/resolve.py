"""Resolve the base: a Hub repo at a revision becomes one commit sha and a local snapshot folder.

The revision is resolved once; from then on only the sha is used and recorded, so a branch that moves during
or after the build cannot change what was built (huggingface_hub's snapshot_download does the same).
Files land in huggingface_hub's normal cache, so a second build downloads nothing and `HF_HUB_OFFLINE=1`
works from the cache. `base.path` takes a local snapshot folder instead.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from hubsync.errors import BaseResolutionError
from hubsync.fsio import describe_os_error, is_filesystem_error, list_files, read_json_object
from hubsync.manifest import BaseSpec
from hubsync.remote import WEIGHT_PATTERNS, RemoteFiles, remote_checkpoint, repo_sizes
from hubsync.tensors import Checkpoint, list_checkpoint

# What a stage needs of the base's weights: "all" downloads them (build); "headers" reads only their headers
# over HTTP unless they are already in the cache (plan, doctor, validate --deep).
Weights = Literal["all", "headers"]

log = logging.getLogger("hubsync")


@dataclass(frozen=True)
class BaseInventory:
    """What the pinned base holds: its files, its tensors (from headers) and its config."""

    repo_id: str | None
    revision: str | None
    sha: str | None
    folder: Path
    files: tuple[str, ...]
    checkpoint: Checkpoint
    config: dict[str, Any]
    # Set when the weights were not downloaded: their tensors are known from headers read over HTTP, and
    # `remote` reads byte ranges of them. `checkpoint`'s paths then name files that are not on disk.
    remote: RemoteFiles | None = None

    @property
    def weights(self) -> str:
        """Where the weights are: "on disk", or "headers only" (not downloaded)."""
        return "on disk" if self.remote is None else "headers only"

    @cached_property
    def weight_map(self) -> dict[str, str]:
        """Tensor name -> shard path relative to the snapshot."""
        return {name: self.rel(info.file) for name, info in self.checkpoint.tensors.items()}

    @property
    def shard_names(self) -> tuple[str, ...]:
        return tuple(self.rel(p) for p in self.checkpoint.files)

    @property
    def index_name(self) -> str | None:
        return None if self.checkpoint.index_file is None else self.rel(self.checkpoint.index_file)

    def rel(self, path: Path) -> str:
        return path.relative_to(self.folder).as_posix()

    @property
    def label(self) -> str:
        return f"{self.repo_id}@{self.sha}" if self.repo_id else str(self.folder)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object of a model folder ({} when absent); a damaged one is a one-line error."""
    return read_json_object(path, error=BaseResolutionError, fix="re-download or fix it") or {}


def read_json_files(
    folder: Path, paths: Iterable[str], *, max_bytes: int = 5_000_000, always: Iterable[str] = ()
) -> dict[str, dict[str, Any]]:
    """The JSON objects among `paths` (repo-relative), skipping large files (tokenizer.json) unless named in
    `always`, and files that are not JSON objects."""
    keep = set(always)
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(paths):
        full = folder / path
        if not path.endswith(".json") or (full.stat().st_size > max_bytes and path not in keep):
            continue
        try:
            data = json.loads(full.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            found[path] = data
    return found


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download_base(repo_id: str, revision: str, *, weights: bool = True) -> tuple[str, Path]:
    """Resolve `revision` to a sha and fetch that snapshot into the cache (without its weight files unless
    `weights`). Returns (sha, folder)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}"
    skip = None if weights else list(WEIGHT_PATTERNS)
    try:
        if offline():
            folder = Path(
                snapshot_download(repo_id, revision=revision, local_files_only=True, ignore_patterns=skip)
            )
            return folder.name, folder
        # One resolution, by snapshot_download itself: it records refs/<branch> in the cache (so that
        # HF_HUB_OFFLINE=1 later finds the same commit) and names the snapshot folder by the commit sha.
        folder = Path(snapshot_download(repo_id, revision=revision, ignore_patterns=skip))
        return folder.name, folder
    except GatedRepoError:
        raise BaseResolutionError(
            f"{repo_id} is gated: accept its terms on the Hub with your account, then set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise BaseResolutionError(
            f"base repo {repo_id} was not found: check `base.repo`, or set HF_TOKEN if it is private"
        ) from None
    except RevisionNotFoundError:
        raise BaseResolutionError(
            f"revision '{revision}' does not exist in {repo_id}: check `base.revision` (a branch, tag or commit sha)"
        ) from None
    except LocalEntryNotFoundError:
        if offline():
            raise BaseResolutionError(
                f"{where} is not in the local cache and HF_HUB_OFFLINE=1: build once online, or unset HF_HUB_OFFLINE"
            ) from None
        raise BaseResolutionError(
            f"cannot reach the Hub to fetch {where}: check the network (or HF_ENDPOINT), "
            "or build from the cache with HF_HUB_OFFLINE=1"
        ) from None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", "?")
        raise BaseResolutionError(
            f"the Hub answered HTTP {status} while fetching {where}: retry later, or check HF_TOKEN"
        ) from None
    except OSError as err:
        if is_filesystem_error(err):  # a full or read-only cache is this machine's problem, not the network's
            raise BaseResolutionError(_cache_error(err, where)) from None
        raise BaseResolutionError(
            f"cannot reach the Hub to fetch {where} ({type(err).__name__}): check the network or HF_ENDPOINT, "
            "or build from the cache with HF_HUB_OFFLINE=1"
        ) from None


def _cache_error(err: OSError, where: str) -> str:
    from huggingface_hub import constants

    path = err.filename if isinstance(err.filename, str) else constants.HF_HUB_CACHE
    return (
        f"{describe_os_error(err, path, 'write')} (downloading {where} into the Hugging Face cache; "
        "HF_HUB_CACHE or HF_HOME can move the cache)"
    )


def resolve_base(spec: BaseSpec, *, weights: Weights = "all") -> BaseInventory:
    """Pin the base to a sha (or take a local folder) and read its file list, tensor headers and config.
    With `weights="headers"`, a Hub base's weight files are not downloaded unless already in the cache."""
    remote = None
    if spec.path is not None:
        folder = spec.path
        if not folder.is_dir():
            raise BaseResolutionError(f"base folder {folder} does not exist: check `base.path`")
        repo_id, revision, sha = None, None, None
    else:
        assert spec.repo is not None and spec.revision is not None  # guaranteed by the manifest schema
        repo_id, revision = spec.repo, spec.revision
        sha, folder = download_base(repo_id, revision, weights=weights == "all")
        if sha != revision:
            log.info("base %s@%s resolved to commit %s", repo_id, revision, sha)
        if weights == "headers" and not _weights_cached(folder):
            remote = _remote_base(repo_id, sha)
    checkpoint = (
        list_checkpoint(folder, error=BaseResolutionError)
        if remote is None
        else remote_checkpoint(folder, remote)
    )
    if checkpoint.format != "safetensors":
        raise BaseResolutionError(
            f"the base {folder} has no safetensors weights (only {checkpoint.format}): hubsync keeps the base's "
            "shards byte for byte and needs safetensors: use a revision of the base that has them"
        )
    return BaseInventory(
        repo_id=repo_id,
        revision=revision,
        sha=sha,
        folder=folder,
        files=list_files(folder) if remote is None else tuple(sorted(remote.sizes)),
        checkpoint=checkpoint,
        config=read_json(folder / "config.json"),
        remote=remote,
    )


def _weights_cached(folder: Path) -> bool:
    """Whether an earlier download left the snapshot's weights in the cache (then a plan reads them there)."""
    try:
        list_checkpoint(folder, error=BaseResolutionError)
    except BaseResolutionError:
        return False
    return True


def _remote_base(repo_id: str, sha: str) -> RemoteFiles:
    if offline():
        raise BaseResolutionError(
            f"the weights of {repo_id}@{sha[:12]} are not in the local cache and HF_HUB_OFFLINE=1: their headers "
            "are read from the Hub: unset HF_HUB_OFFLINE, or download the base once online"
        )
    log.info("reading the headers of %s@%s over HTTP (its weights are not downloaded)", repo_id, sha[:12])
    return RemoteFiles(repo_id, sha, repo_sizes(repo_id, sha))
