"""The tuned tensors' output bytes, put where the write wants them while compare has them in hand.

compare reads every tuned tensor and casts it to the output dtype to classify it (a LoRA merge is computed
for the same reason). When the shard that will hold the tensor keeps the base's layout (the same header:
the same names, dtypes and shapes, which is what `output.dtype: base` gives), compare writes those bytes
straight into that shard in the staging folder, at the tensor's offset. The writer then fills in the rest of
the shard around them, and reads them back only to hash them: each tuned tensor is read, cast and written
once. A tensor whose bytes were not kept (its shard changes layout, the disk was full, or it turned out not to
change) is simply written by the writer as it would be without this.

The files live in the staging folder, so a killed build leaves nothing that the next build does not remove.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Entry", "HeldBytes", "Place", "Prefill"]


@dataclass(frozen=True)
class HeldBytes:
    """A tensor's bytes, already produced: `nbytes` bytes at `offset` of the open file `fd`."""

    fd: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Place:
    """Where a base tensor's bytes go in the output: `nbytes` at `offset` of `file`, a shard of `file_size`
    bytes laid out as the base's."""

    file: Path
    offset: int
    nbytes: int
    file_size: int


class Entry:
    """One tensor's room in its shard, written piece by piece in order."""

    def __init__(self, prefill: Prefill, key: tuple[str, str], fd: int, offset: int, nbytes: int) -> None:
        self.prefill, self.key, self.fd, self.offset, self.nbytes = prefill, key, fd, offset, nbytes
        self.filled = 0
        self.failed = False

    def write(self, data: Any) -> None:
        """Append the next piece (anything with the buffer protocol). A failed write (a full disk) marks the
        entry failed and stops the prefill: the writer will write the tensor, and report the disk itself."""
        if self.failed:
            return
        view = memoryview(data).cast("B")
        if self.filled + len(view) > self.nbytes:
            raise ValueError(f"{self.key[0]}: {self.filled + len(view)} bytes written into {self.nbytes}")
        try:
            while view:
                done = os.pwrite(self.fd, view, self.offset + self.filled)
                view = view[done:]
                self.filled += done
        except OSError:
            self.failed = True
            self.prefill.stop()

    def keep(self) -> None:
        """The bytes are complete and are the ones the output will hold: make them findable."""
        if not self.failed and self.filled == self.nbytes:
            self.prefill.commit(self)


class Prefill:
    """Output bytes of tuned tensors, written in place by compare, found by the writer by (fine-tune tensor
    name, output dtype). `places` says where each base tensor may go (files in `folder`, the staging folder).
    Thread-safe: compare's workers fill different tensors, of one shard or of several, side by side."""

    def __init__(self, folder: Path, places: Mapping[str, Place] | None = None) -> None:
        self.folder = folder
        self.places = dict(places or {})
        self._fds: dict[Path, int] = {}
        self._claimed: set[str] = set()  # a base tensor's room is given once (a tied copy gets none)
        self._held: dict[tuple[str, str], HeldBytes] = {}
        self._lock = threading.Lock()
        self._stopped = False

    def __enter__(self) -> Prefill:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reserve(self, base_name: str, source: str, dtype: str, nbytes: int) -> Entry | None:
        """Room for fine-tune tensor `source` as `dtype` in base tensor `base_name`'s place, or None."""
        place = self.places.get(base_name)
        with self._lock:
            if self._stopped or place is None or place.nbytes != nbytes or base_name in self._claimed:
                return None
            try:
                fd = self._open(place)
            except OSError:
                self._stopped = True
                return None
            self._claimed.add(base_name)
        return Entry(self, (source, dtype), fd, place.offset, nbytes)

    def _open(self, place: Place) -> int:
        fd = self._fds.get(place.file)
        if fd is None:
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(place.file, flags, 0o644)
            try:
                os.ftruncate(fd, place.file_size)  # sparse: what is not written costs no disk
            except OSError:
                os.close(fd)
                os.unlink(place.file)
                raise
            self._fds[place.file] = fd
        return fd

    def commit(self, entry: Entry) -> None:
        with self._lock:
            if not self._stopped:
                self._held[entry.key] = HeldBytes(entry.fd, entry.offset, entry.nbytes)

    def stop(self) -> None:
        """Keep nothing more (a write failed: the disk is full, or the file cannot grow)."""
        with self._lock:
            self._stopped = True

    def held(self, source: str, dtype: str) -> HeldBytes | None:
        """The kept bytes of fine-tune tensor `source` as `dtype`, if compare kept them."""
        with self._lock:
            return self._held.get((source, dtype))

    @property
    def kept_bytes(self) -> int:
        with self._lock:
            return sum(h.nbytes for h in self._held.values())

    def close(self) -> None:
        """Close the files (the writer has made them the output, or they are removed with the staging)."""
        with self._lock:
            self._held.clear()
            self._stopped = True
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)
