"""Write the output folder exactly as the plan says, streaming, into a staging folder swapped in at the end.

An interrupted or failed build (a crash, a kill, a full disk) leaves the previous output untouched: nothing is
written into `output.dir` itself; a staging folder beside it is filled, fsynced and then exchanged with the
output in one rename. A stale staging folder from a killed build is removed by the next build. A file lock
beside the output makes a second concurrent build into the same folder refuse at once.
"""

from __future__ import annotations

import contextlib
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
from hubsync.prefill import Prefill
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
    dest: Path,
    shard: str,
    plan: Plan,
    base: BaseInventory,
    finetune: FinetuneInventory,
    kept: Prefill | None,
    syncer: T.Syncer,
) -> str:
    header = base.checkpoint.headers[base.folder / shard]
    by_name = {t.name: t for t in plan.tensors if t.shard == shard}
    entries = []
    for name, info in header.tensors.items():
        tp = by_name[name]
        if tp.source == "finetune":
            assert tp.finetune_name is not None
            source = _finetune_source(tp.finetune_name, finetune, tp.dtype, kept)
        elif tp.dtype != info.dtype:
            source = _cast_loader(info, tp.dtype)
        else:
            source = info
        entries.append(T.ShardEntry(name, tp.dtype, tuple(info.shape), source))
    return T.write_shard(dest, entries, header.metadata, template=header, syncer=syncer)


def _finetune_source(
    name: str, finetune: FinetuneInventory, dtype: str, kept: Prefill | None
) -> T.TensorSource:
    """A tuned tensor's bytes in the output dtype: where compare put them (see hubsync.prefill), as stored
    when the fine-tune saved them in that dtype, or cast again."""
    ft_info = finetune.checkpoint.tensors[name]
    held = kept.held(name, dtype) if kept is not None else None
    if held is not None:
        return held
    if isinstance(ft_info, T.TensorInfo) and ft_info.dtype == dtype:
        return ft_info
    return _cast_loader(ft_info, dtype)


def _cast_loader(info: T.TensorRef, dtype: str) -> Callable[[], Any]:
    def load() -> Any:
        return T.load_tensor(info).to(T.torch_dtype(dtype)).contiguous()

    return load


class HeadStart:
    """What a build writes into its staging folder before its plan exists, so that the disk is busy while the
    CPU compares: the tuned tensors compare produces (`kept`, see hubsync.prefill), and the base shards the
    plan will copy whatever compare finds (`copy_early`: no tuned tensor, no dtype change; see
    `plan.certain_copies`), copied in a second thread. Every file is made durable by one `syncer` in a third.
    `write_files` takes what is here and writes the rest; a build that stops before it removes the staging
    folder, and this with it."""

    def __init__(self, staging: Path, link: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.staging, self.link = staging, link
        self.kept = Prefill(staging)
        self.syncer = T.Syncer()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hubsync-copy")
        self._copies: dict[str, Any] = {}

    def __enter__(self) -> HeadStart:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def copy_early(self, base: BaseInventory, shards: list[str]) -> None:
        for shard in shards:
            self._copies[shard] = self._pool.submit(self._copy_one, base, shard)

    def _copy_one(self, base: BaseInventory, shard: str) -> WrittenFile:
        dest = self.staging / shard
        fsio.make_dir(dest.parent, parents=True, exist_ok=True)
        sha = copy_one(base.folder / shard, dest, link=self.link, weight=True, syncer=self.syncer)
        return WrittenFile(shard, sha, dest.stat().st_size, "base")

    def copied(self, item: FilePlan) -> WrittenFile | None:
        """The file as copied early, when the plan copies it from the base (waits for the copy)."""
        future = self._copies.get(item.path)
        if future is None or (item.action, item.source) != ("copy", "base"):
            return None
        return future.result()  # type: ignore[no-any-return]

    def close(self) -> None:
        """Wait for the copies and the fsyncs (nothing runs on in the background), then close the files."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.syncer.close()
        self.kept.close()


def write_files(
    staging: Path,
    plan: Plan,
    base: BaseInventory,
    finetune: FinetuneInventory,
    *,
    link: str,
    card_text: str,
    on_file: Callable[[WrittenFile], None] | None = None,
    head: HeadStart | None = None,
) -> list[WrittenFile]:
    """Write every planned file except hubsync.json into `staging`; return what was written. `on_file` is
    called after each file (progress); `head` holds what the build wrote before the plan. Each file is
    fsynced in a second thread while the next one is written; all are on disk when this returns."""
    written: list[WrittenFile] = []
    with contextlib.ExitStack() as stack:
        syncer = head.syncer if head is not None else stack.enter_context(T.Syncer())
        shards = frozenset(t.shard for t in plan.tensors)
        out = _Output(plan, base, finetune, link, card_text, head.kept if head else None, syncer, shards)
        for item in plan.files:
            if item.action == "provenance":
                continue
            done = head.copied(item) if head is not None else None
            written.append(done or out.write(item, staging / item.path))
            if on_file is not None:
                on_file(written[-1])
            log.debug("wrote %s (%s, %s)", item.path, item.source, item.action)
        syncer.wait()
    return written


@dataclass(frozen=True)
class _Output:
    """What writing one planned file needs."""

    plan: Plan
    base: BaseInventory
    finetune: FinetuneInventory
    link: str
    card_text: str
    kept: Prefill | None
    syncer: T.Syncer
    shards: frozenset[str]

    def write(self, item: FilePlan, dest: Path) -> WrittenFile:
        fsio.make_dir(dest.parent, parents=True, exist_ok=True)
        sha = self._write(item, dest)
        return WrittenFile(item.path, sha, dest.stat().st_size, item.source)

    def _write(self, item: FilePlan, dest: Path) -> str:
        """Write one file; return its sha256."""
        if item.action == "copy":
            src = (self.base.folder if item.source == "base" else self.finetune.folder) / item.path
            return copy_one(src, dest, link=self.link, weight=item.path in self.shards, syncer=self.syncer)
        if item.action == "rewrite-shard":
            return _rewrite_shard(
                dest, item.path, self.plan, self.base, self.finetune, self.kept, self.syncer
            )
        if item.action in ("write-json", "write-index"):
            assert item.content is not None
            return T.write_new(dest, fsio.json_bytes(item.content), syncer=self.syncer)
        if item.action == "card":
            return T.write_new(dest, self.card_text.encode("utf-8"), syncer=self.syncer)
        raise AssertionError(f"unknown action {item.action}")  # the planner only emits the actions above


def copy_one(src: Path, dest: Path, *, link: str, weight: bool, syncer: T.Syncer) -> str:
    """Copy one file into the output; return its sha256. A kernel copy (or a hard link, for weights with
    `link: hardlink`) when the source's sha256 is known (the Hugging Face cache names its blobs by it); else a
    copy that hashes what passes, so the copy is never read again to hash it."""
    known = fsio.cached_sha256(src)
    if link == "hardlink" and weight:
        T.copy_file(src, dest, mode="hardlink", syncer=syncer)
        return known or T.sha256_file(dest)
    if known is not None:
        T.copy_file(src, dest, syncer=syncer)
        return known
    return T.copy_hashed(src, dest, syncer=syncer)


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
