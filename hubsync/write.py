"""Write the output folder exactly as the plan says, streaming, into a staging folder swapped in at the end.

An interrupted or failed build (a crash, a kill, a full disk) leaves the previous output untouched: nothing is
written into `output.dir` itself; a staging folder beside it is filled, fsynced and then exchanged with the
output in one rename. A stale staging folder from a killed build is removed by the next build. A file lock
beside the output makes a second concurrent build into the same folder refuse at once.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubsync import fsio
from hubsync import tensors as T
from hubsync.errors import BuildError
from hubsync.finetune import FinetuneInventory
from hubsync.plan import FilePlan, Plan
from hubsync.resolve import BaseInventory

log = logging.getLogger("hubsync")


@dataclass(frozen=True)
class WrittenFile:
    path: str
    sha256: str
    size: int
    source: str


class OutputLock:
    """An exclusive, non-blocking lock on an output folder, held for a whole build or verify.

    A lock file beside the output, locked with flock: the kernel drops the lock when the holder dies, so a
    killed build never leaves the folder locked. Only "held by someone else" says so; any other OS error
    (a read-only or missing parent, a file in the way) is one line naming the path and the cause.
    """

    def __init__(self, output: Path) -> None:
        self.output = output
        self.path = output.parent / f".{output.name}.hubsync.lock"
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        fsio.make_dir(self.output.parent, parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as err:
            raise fsio.os_error(err, self.path, "create the lock file") from None
        try:
            locked = _lock_nonblocking(fd)
        except OSError as err:
            os.close(fd)
            raise fsio.os_error(err, self.path, "lock") from None
        if not locked:
            os.close(fd)
            raise BuildError(
                f"another hubsync build or verify is using {self.output} right now: wait for it to finish, "
                "or build into another output.dir"
            )
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def _lock_nonblocking(fd: int) -> bool:
    """Lock `fd` exclusively; False when another process holds the lock. Other failures raise OSError."""
    if sys.platform == "win32":
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EDEADLK):
                return False
            raise
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _staging_prefix(output: Path) -> str:
    return f".{output.name}.hubsync-staging-"


def remove_stale_staging(output: Path) -> None:
    """Staging folders left by a killed build (only ever called while holding the output lock)."""
    for stale in output.parent.glob(_staging_prefix(output) + "*"):
        log.debug("removing the staging folder of an interrupted build: %s", stale)
        shutil.rmtree(stale, ignore_errors=True)


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return bool(result == 0)


def swap_into_place(staging: Path, output: Path) -> None:
    """Make `staging` the output. The old output is replaced in one step where the OS allows it. Callers
    check first that `output` may be replaced (hubsync.safety.check_replace)."""
    if not os.path.lexists(output):
        fsio.rename(staging, output)
    elif _exchange(staging, output):
        shutil.rmtree(staging)  # now holds the previous output
    else:
        # Fallback (non-Linux): two renames; a crash between them leaves the old build in `.old`, never a mix.
        old = output.with_name(f".{output.name}.hubsync-old")
        shutil.rmtree(old, ignore_errors=True)
        fsio.rename(output, old)
        fsio.rename(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    fsio.fsync_dir(output.parent)


def _rewrite_shard(
    dest: Path, shard: str, plan: Plan, base: BaseInventory, finetune: FinetuneInventory
) -> str:
    import torch  # noqa: F401  (tensors casts need it loaded; imported here to keep the CLI light)

    header = base.checkpoint.headers[base.folder / shard]
    by_name = {t.name: t for t in plan.tensors if t.shard == shard}
    entries = []
    for name, info in header.tensors.items():
        tp = by_name[name]
        source: T.TensorSource
        if tp.source == "finetune":
            assert tp.finetune_name is not None
            ft_info = finetune.checkpoint.tensors[tp.finetune_name]
            source = _cast_loader(ft_info, tp.dtype)
        elif tp.dtype != info.dtype:
            source = _cast_loader(info, tp.dtype)
        else:
            source = info
        entries.append(T.ShardEntry(name, tp.dtype, tuple(info.shape), source))
    return T.write_shard(dest, entries, header.metadata, template=header)


def _cast_loader(info: T.TensorRef, dtype: str) -> Callable[[], Any]:
    def load() -> Any:
        return T.load_tensor(info).to(T.torch_dtype(dtype)).contiguous()

    return load


def write_files(
    staging: Path,
    plan: Plan,
    base: BaseInventory,
    finetune: FinetuneInventory,
    *,
    link: str,
    card_text: str,
    on_file: Callable[[WrittenFile], None] | None = None,
) -> list[WrittenFile]:
    """Write every planned file except hubsync.json into `staging`; return what was written. `on_file` is
    called after each file (progress)."""
    written: list[WrittenFile] = []
    for item in plan.files:
        if item.action == "provenance":
            continue
        dest = staging / item.path
        fsio.make_dir(dest.parent, parents=True, exist_ok=True)
        sha = _write_one(item, dest, plan, base, finetune, link=link, card_text=card_text)
        written.append(WrittenFile(item.path, sha, dest.stat().st_size, item.source))
        if on_file is not None:
            on_file(written[-1])
        log.debug("wrote %s (%s, %s)", item.path, item.source, item.action)
    return written


def _write_one(
    item: FilePlan,
    dest: Path,
    plan: Plan,
    base: BaseInventory,
    finetune: FinetuneInventory,
    *,
    link: str,
    card_text: str,
) -> str:
    if item.action == "copy":
        src = (base.folder if item.source == "base" else finetune.folder) / item.path
        is_weight = item.path in {t.shard for t in plan.tensors}
        T.copy_file(src, dest, mode="hardlink" if (link == "hardlink" and is_weight) else "copy")
        return fsio.cached_sha256(src) or T.sha256_file(dest)
    if item.action == "rewrite-shard":
        return _rewrite_shard(dest, item.path, plan, base, finetune)
    if item.action in ("write-json", "write-index"):
        assert item.content is not None
        return fsio.write_bytes(dest, fsio.json_bytes(item.content))
    if item.action == "card":
        return fsio.write_bytes(dest, card_text.encode("utf-8"))
    raise AssertionError(f"unknown action {item.action}")  # the planner only emits the actions above


def new_staging(output: Path) -> Path:
    staging = output.parent / f"{_staging_prefix(output)}{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    fsio.make_dir(staging, parents=True)
    return staging


def relink_into_staging(folder: Path) -> Path:
    """A staging folder beside `folder` that is the same tree: every folder, every file as a hard link, every
    symlink as a symlink, hidden ones included, so that a few files can be replaced (unlink, then write) and
    the whole swapped in at once without losing anything. Never writes through a link."""
    staging = new_staging(folder)
    for here, dirs, files in os.walk(folder):
        rel = Path(here).relative_to(folder)
        for name in dirs:
            source, dest = Path(here) / name, staging / rel / name
            if source.is_symlink():
                _copy_link(source, dest)
            else:
                fsio.make_dir(dest)
        for name in files:
            source, dest = Path(here) / name, staging / rel / name
            if source.is_symlink():
                _copy_link(source, dest)
            else:
                T.copy_file(source, dest, mode="hardlink")
    return staging


def _copy_link(source: Path, dest: Path) -> None:
    try:
        os.symlink(os.readlink(source), dest)
    except OSError as err:
        raise fsio.os_error(err, dest, "create") from None
