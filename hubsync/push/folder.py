"""The build folder a push publishes: which one, and its files as they are now (hashed now, never taken from
the record)."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from hubsync.errors import PushError
from hubsync.push.plan import Files
from hubsync.record import last_build


def find_build(target: Path | None) -> Path:
    """The build folder: the manifest's output.dir, a build folder, or the last build made from this directory."""
    if target is None:
        last = last_build()
        if last is None:
            raise PushError(
                "no build recorded in this directory: run `hubsync build MANIFEST` first, or pass the manifest"
            )
        return last.output
    if target.is_dir():
        return target
    from hubsync.manifest import load_manifest

    return load_manifest(target).output.dir


def git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def local_files(folder: Path, current: Mapping[str, str]) -> Files:
    """Every file of the build folder with its sha256 (hashed now, in `current`), size and git blob id."""
    from hubsync.fsio import list_files
    from hubsync.tensors import sha256_file

    local = {}
    for rel in list_files(folder):
        path = folder / rel
        size = path.stat().st_size
        local[rel] = {
            "sha256": current.get(rel) or sha256_file(path),  # the record itself is not in `current`
            "size": size,
            "blob": git_blob_sha1(path) if size < 10_000_000 else None,
        }
    return local
