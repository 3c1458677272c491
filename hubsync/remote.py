"""A Hub base's weights read where they lie: safetensors headers and small byte ranges over HTTP Range requests,
through huggingface_hub's own session, URLs and credentials, so that `hubsync plan`, `doctor` and
`validate --deep` cost kilobytes where a download costs the whole base (17 GB for MiniCPM-Llama3-V 2.5).

Each file's download URL is resolved once (a HEAD on `resolve/`, which for LFS files answers with a redirect to
a signed CDN URL), then every range of that file is read from it. A server that ignores the Range header and
starts sending the whole file is refused at once, never read to the end.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from hubsync import tensors as T
from hubsync.errors import BaseResolutionError

log = logging.getLogger("hubsync")

# Weight files a plan never downloads (their headers are read by range instead, or they are not needed).
WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.gguf",
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.ot",
    "*.tflite",
)
THREADS = 8  # huggingface_hub's own default for parallel downloads
R = TypeVar("R")


class RemoteFiles:
    """Byte ranges of the files of one repo at one commit, read with HTTP Range requests."""

    def __init__(self, repo_id: str, sha: str, sizes: dict[str, int], *, endpoint: str | None = None) -> None:
        self.repo_id = repo_id
        self.sha = sha
        self.sizes = sizes  # repo path -> size, from the repo's tree at `sha`
        self.endpoint = endpoint  # None: huggingface_hub's (HF_ENDPOINT)
        self.bytes_read = 0
        self.requests = 0
        self._urls: dict[str, str] = {}
        self._lock = threading.Lock()

    def _url(self, path: str) -> tuple[str, dict[str, str]]:
        """Where the bytes of `path` are served, and the headers to send there (no token to another host)."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.utils import build_hf_headers

        resolve = hf_hub_url(self.repo_id, path, revision=self.sha, endpoint=self.endpoint)
        with self._lock:
            url = self._urls.get(path)
        if url is None:
            url = get_hf_file_metadata(resolve).location
            with self._lock:
                self._urls[path] = url
        same_origin = urlsplit(url)[:2] == urlsplit(resolve)[:2]
        return url, build_hf_headers() if same_origin else {}

    def read(self, path: str, start: int, length: int) -> bytes:
        """`length` bytes of `path` from `start`; raises BaseResolutionError on any failure."""
        try:
            return self._read(path, start, length)
        except BaseResolutionError:
            raise
        except Exception as err:  # noqa: BLE001  (httpx, huggingface_hub and OS errors alike: not served)
            raise BaseResolutionError(
                f"cannot read {path} of {self.repo_id}@{self.sha[:12]} from the Hub "
                f"({type(err).__name__}: {_first_line(err)}): check the network, HF_ENDPOINT and HF_TOKEN, "
                "or download the base first (`hf download`) and run again"
            ) from None

    def _read(self, path: str, start: int, length: int) -> bytes:
        from huggingface_hub.utils import get_session, hf_raise_for_status

        if length <= 0:
            return b""
        url, headers = self._url(path)
        ranged = {**headers, "Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "identity"}
        with get_session().stream("GET", url, headers=ranged) as response:
            hf_raise_for_status(response)
            if response.status_code != 206:
                raise BaseResolutionError(
                    f"the Hub answered a range request for {path} of {self.repo_id} with the whole file: "
                    "hubsync does not download a base to plan: download it first (`hf download`), then run again"
                )
            data = b"".join(_take(response.iter_bytes(), length))
        if len(data) != length:
            raise BaseResolutionError(
                f"the Hub sent {len(data)} bytes of {path} where {length} were asked for: retry, or download "
                "the base first (`hf download`)"
            )
        with self._lock:
            self.bytes_read += length
            self.requests += 1
        return data

    def header(
        self, path: Path, *, error: type[BaseResolutionError] = BaseResolutionError
    ) -> T.SafetensorsHeader:
        """The safetensors header of the file `path` (a path in the snapshot folder, where the file would be)."""
        rel = path.name
        size = self.sizes.get(rel)
        if size is None:
            raise error(f"{rel} is not in {self.repo_id}@{self.sha[:12]}: check the base's index")
        if size < 8:
            raise error(f"{rel} is not a safetensors file: it is {size} bytes long; check the base repo")
        (header_size,) = struct.unpack("<Q", self.read(rel, 0, 8))
        if header_size > T.MAX_HEADER_SIZE or 8 + header_size > size:
            raise error(
                f"{rel} of {self.repo_id} has a corrupt header (length prefix {header_size} for a file of {size} "
                "bytes): check the base repo"
            )
        return T.parse_safetensors_header(path, size, self.read(rel, 8, header_size), error=error)


def _take(chunks: Iterable[bytes], length: int) -> Iterable[bytes]:
    """At most `length` bytes of a stream, and no more read from it."""
    left = length
    for chunk in chunks:
        if left <= 0:
            return
        yield chunk[:left]
        left -= len(chunk)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""


def parallel(call: Callable[[Any], R], items: Iterable[Any]) -> list[R]:
    """`call` over `items` on a few threads (range requests are round trips, not bandwidth), in order."""
    items = list(items)
    if len(items) < 2:
        return [call(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(THREADS, len(items))) as pool:
        return list(pool.map(call, items))


def repo_sizes(repo_id: str, sha: str) -> dict[str, int]:
    """Every file of the repo at `sha` with its size (one tree listing)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    try:
        entries = list(HfApi().list_repo_tree(repo_id, revision=sha, recursive=True))
    except Exception as err:  # noqa: BLE001  (any failure of the listing ends in the same one line)
        raise BaseResolutionError(
            f"cannot list the files of {repo_id}@{sha[:12]} ({type(err).__name__}: {_first_line(err)}): "
            "retry, or check HF_ENDPOINT and HF_TOKEN"
        ) from None
    return {
        e.path: int(e.size)
        for e in entries
        if isinstance(e, RepoFile) and e.path.split("/")[0] not in (".git", ".cache", ".huggingface")
    }


def remote_checkpoint(folder: Path, remote: RemoteFiles) -> T.Checkpoint:
    """The base's weights, listed from their headers over HTTP (the index, a small JSON, is in `folder`)."""
    fetched: dict[str, T.SafetensorsHeader] = {}
    indexes = [p for p in remote.sizes if "/" not in p and p.endswith(".safetensors.index.json")]
    shards = {s for i in indexes if (folder / i).is_file() for s in _index_shards(folder / i)}
    wanted = sorted(s for s in shards if s in remote.sizes)
    fetched.update(zip(wanted, parallel(lambda p: remote.header(folder / p), wanted)))  # all at once

    def read_header(path: Path, *, error: Any = BaseResolutionError) -> T.SafetensorsHeader:
        if path.name not in fetched:
            fetched[path.name] = remote.header(path, error=error)
        return fetched[path.name]

    return T.list_remote_checkpoint(folder, list(remote.sizes), read_header, error=BaseResolutionError)


def _index_shards(index: Path) -> set[str]:
    try:
        return set(T.read_index(index, error=BaseResolutionError).values())
    except BaseResolutionError:
        return set()  # list_remote_checkpoint reports a damaged index with its own message
