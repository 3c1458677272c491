"""The base's worker result, kept between verifications.

Every verify runs the pinned base beside the build, in the same runtime, on the same inputs; while one
fine-tune is iterated on, that half of the work is the same each time (for MiniCPM-Llama3-V 2.5 on a GPU: a
17 GB load and a generation). A base run that passed every step is kept in hubsync's cache under a key of
everything that decides it:

- the base's files: each one's path and, for the Hugging Face cache's symlinks, the blob they point at (named
  by its hash); for other files, size, modification time and inode (a local base edited in place gets a new
  key);
- the runtime: its interpreter and the versions of its packages, and `CUDA_VISIBLE_DEVICES`;
- the request (device, prompt, image file by the same fingerprint, tuned prefixes, memory budget);
- the worker script itself and hubsync's version.

A base run that failed, crashed or timed out is never kept. `HUBSYNC_VERIFY_CACHE=0` turns the cache off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hubsync import __version__
from hubsync.fsio import cache_dir
from hubsync.verify.runtime import WORKER, Runtime, WorkerResult

log = logging.getLogger("hubsync")

SWITCH = "HUBSYNC_VERIFY_CACHE"
FORMAT = 1


def enabled() -> bool:
    return os.environ.get(SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _fingerprint(path: Path) -> list[Any]:
    """What identifies a file's content without reading it."""
    if path.is_symlink():
        return ["link", os.readlink(path)]
    st = path.stat()
    return ["file", st.st_size, st.st_mtime_ns, st.st_ino]


def _folder_fingerprint(folder: Path) -> list[Any]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in (".git", "__pycache__"))
        for name in sorted(files):
            path = Path(root) / name
            found.append([path.relative_to(folder).as_posix(), *_fingerprint(path)])
    return found


def key(runtime: Runtime, request: Mapping[str, Any]) -> str:
    """The cache key of one base run (see the module's docstring)."""
    asked = {k: v for k, v in request.items() if k not in ("folder", "outputs_dir")}
    image = request.get("image")
    facts = {
        "format": FORMAT,
        "hubsync": __version__,
        "worker": hashlib.sha256(WORKER.read_bytes()).hexdigest(),
        "python": str(runtime.python),
        "versions": dict(runtime.versions),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "request": asked,
        "image": _fingerprint(Path(image)) if image else None,
        "base": _folder_fingerprint(Path(str(request["folder"]))),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _folder(cache_key: str) -> Path:
    return cache_dir() / "verify-base" / cache_key


def load(runtime: Runtime, cache_key: str) -> WorkerResult | None:
    """The kept result, or None (none kept, unreadable, or the cache is off)."""
    if not enabled():
        return None
    folder = _folder(cache_key)
    try:
        data = json.loads((folder / "result.json").read_text(encoding="utf-8"))
        seconds = float(json.loads((folder / "kept.json").read_text(encoding="utf-8"))["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(data, dict) or not data.get("finished"):
        return None
    log.info("verify: the base's run in this runtime is the one kept in %s", folder)
    return WorkerResult(runtime, data, 0, False, seconds, folder, [])


def worth_keeping(result: WorkerResult) -> bool:
    """Only a base run that finished with no failed step."""
    return (
        result.finished
        and result.returncode == 0
        and all(step.get("ok") is not False for step in result.steps.values())
    )


def save(cache_key: str, result: WorkerResult) -> None:
    """Keep a passing base run: its result and arrays, moved into place whole (a cache that cannot be written
    costs time, nothing else)."""
    if not enabled() or not worth_keeping(result):
        return
    target = _folder(cache_key)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{cache_key}-", dir=target.parent))
        try:
            shutil.copyfile(result.workdir / "result.json", staging / "result.json")
            if result.outputs_dir.is_dir():
                shutil.copytree(result.outputs_dir, staging / "outputs")
            (staging / "kept.json").write_text(json.dumps({"seconds": result.seconds}), encoding="utf-8")
            with contextlib.suppress(OSError):  # another verify kept it first
                os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as err:
        log.debug("verify: cannot keep the base's run in %s: %s", target, err)


__all__ = ["SWITCH", "enabled", "key", "load", "save", "worth_keeping"]
