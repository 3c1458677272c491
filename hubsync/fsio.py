"""Small filesystem helpers every stage shares: durable and atomic writes, JSON objects in and out, file
listings, and OS errors turned into one line that names the path and the cause.

Standard library only (plus hubsync.errors), so any stage can use it without import cost.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from hubsync.errors import BuildError, HubsyncError

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Top-level folders that are never part of a model repo's files.
IGNORED_TOP_LEVEL = (".git", ".cache", ".huggingface")

_CAUSES = {
    errno.ENOSPC: "no space left on the device: free some space",
    getattr(errno, "EDQUOT", errno.ENOSPC): "the disk quota is exceeded: free some space",
    errno.EACCES: "permission denied: make the folder writable or choose another path",
    errno.EPERM: "the operation is not permitted: make the folder writable or choose another path",
    errno.EROFS: "the filesystem is read-only: choose a path on a writable filesystem",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EEXIST: "something is already there: remove it or choose another path",
    errno.EBUSY: "the path is busy (a mount point or in use): choose another path",
    errno.EISDIR: "a folder is in the way: remove it or choose another path",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter path",
}


def describe_os_error(err: OSError, path: str | os.PathLike[str], doing: str) -> str:
    """One line: what failed on which path, why, and what to do (`doing` is e.g. "write", "create")."""
    cause = _CAUSES.get(err.errno or 0)
    if cause is None:
        cause = f"{err.strerror or type(err).__name__}: check the path"
    return f"cannot {doing} {path}: {cause}"


def is_filesystem_error(err: OSError) -> bool:
    """An error of this machine's files (a full disk, a read-only folder), as opposed to the network's."""
    return err.filename is not None or err.errno in _CAUSES


def os_error(
    err: OSError, path: str | os.PathLike[str], doing: str, error: type[HubsyncError] = BuildError
) -> HubsyncError:
    return error(describe_os_error(err, path, doing))


def cache_dir() -> Path:
    """hubsync's own cache (verification runtimes, converted checkpoints): $HUBSYNC_CACHE_DIR, else
    $XDG_CACHE_HOME/hubsync, else ~/.cache/hubsync. Never inside an input."""
    explicit = os.environ.get("HUBSYNC_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "hubsync"


def make_dir(
    folder: Path, *, parents: bool = False, exist_ok: bool = False, error: type[HubsyncError] = BuildError
) -> None:
    """mkdir whose OS errors (a file in the way, a read-only or full filesystem) are one line."""
    try:
        folder.mkdir(parents=parents, exist_ok=exist_ok)
    except OSError as err:
        raise os_error(err, _failing_path(err, folder), "create", error) from None


def rename(src: Path, dst: Path, *, error: type[HubsyncError] = BuildError) -> None:
    """os.rename whose OS errors (a mount point, another filesystem, a busy folder) are one line."""
    try:
        os.rename(src, dst)
    except OSError as err:
        raise os_error(err, dst, f"move {src} to", error) from None


def _failing_path(err: OSError, fallback: Path) -> str | os.PathLike[str]:
    """The path the OS named in the error (with parents=True, maybe an ancestor), else `fallback`."""
    return err.filename if isinstance(err.filename, (str, os.PathLike)) else fallback


def fsync_dir(folder: Path) -> None:
    """Make new directory entries durable; some filesystems refuse fsync on a directory, which is harmless."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def json_bytes(content: Any) -> bytes:
    """JSON as transformers writes it (2-space indent, key order kept, trailing newline), deterministic."""
    return (json.dumps(content, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_bytes(dest: Path, data: bytes, *, error: type[HubsyncError] = BuildError) -> str:
    """Write `data` to `dest` and fsync it; return its sha256. OS errors become one-line `error`s."""
    try:
        with open(dest, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise os_error(err, dest, "write", error) from None
    return hashlib.sha256(data).hexdigest()


def replace_atomically(path: Path, data: bytes, *, error: type[HubsyncError] = BuildError) -> str:
    """Replace `path` with `data` in one rename (a kill leaves the old file or the new, never half of one)."""
    tmp = path.with_name(f".{path.name}.hubsync-tmp")
    sha = write_bytes(tmp, data, error=error)
    try:
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise os_error(err, path, "replace", error) from None
    fsync_dir(path.parent)
    return sha


def read_json_object(path: Path, *, error: type[HubsyncError], fix: str) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when the file does not exist. A file that cannot be read, is not
    JSON, or is not an object raises `error` with "<path> ...: <fix>"."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except OSError as err:
        raise error(f"{describe_os_error(err, path, 'read')} ({fix})") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise error(f"{path} is not valid JSON ({err}): {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, not an object: {fix}")
    return data


def list_files(folder: Path) -> tuple[str, ...]:
    """Every file under `folder`, as sorted repo-relative posix paths (no .git, no hidden cache folders)."""
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_dir() or rel.parts[0] in IGNORED_TOP_LEVEL:
            continue
        found.append(rel.as_posix())
    return tuple(sorted(found))


def cached_sha256(src: Path) -> str | None:
    """The Hub cache names an LFS blob by its sha256: reuse it instead of hashing gigabytes again."""
    if src.is_symlink():
        target = src.resolve()
        if SHA256_RE.match(target.name) and target.stat().st_size == src.stat().st_size:
            return target.name
    return None
