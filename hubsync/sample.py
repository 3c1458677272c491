"""What can be said of the tensors when the base's weights were not downloaded (a plan made from headers).

`unchecked_diffs`: no data is compared; the plan takes the declared tuned tensors from the fine-tune and says
which rules `build` still has to check. `sample_diffs`: a few kilobytes of each base tensor, read over HTTP
ranges (hubsync.remote), are compared with the same values of the fine-tune's tensor. A difference in the
sample is certain (a frozen part that changed, the parts that were tuned); an equal sample is not proof, and
`build` compares every byte. Tensors that only exist as a recipe (a LoRA merge needs the base's bytes) are
never sampled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from hubsync import chunks
from hubsync import tensors as T
from hubsync.compare import Scan, TensorDiff
from hubsync.finetune import FinetuneInventory
from hubsync.resolve import BaseInventory

if TYPE_CHECKING:
    import numpy as np

    from hubsync.remote import RemoteFiles

SAMPLE_VALUES = 1024  # per tensor, from its middle: 2-4 kB of a bf16/fp32 tensor
MERGE_GAP = 16 * 1024  # two samples closer than this in one shard are read with one request (a round
# trip costs more than 16 kB of transfer on any network worth using)


@dataclass(frozen=True)
class _Window:
    """The sampled values of one tensor: elements [first, first + count), and where they are in the base."""

    name: str
    source: str
    shard: str
    offset: int  # byte offset in the shard
    first: int
    count: int
    itemsize: int


def unchecked_diffs(
    base: BaseInventory, finetune: FinetuneInventory, output_dtype: Callable[[str], str], names: Iterable[str]
) -> dict[str, TensorDiff]:
    """A TensorDiff in state `unchecked` for each base tensor in `names` that the fine-tune has."""
    by_base = {base_name: ft_name for ft_name, base_name in finetune.base_names.items()}
    out = {}
    for name in names:
        source = by_base.get(name)
        if source is None:
            continue
        info, ft = base.checkpoint.tensors[name], finetune.checkpoint.tensors[source]
        out[name] = TensorDiff(name, source, "unchecked", ft.dtype, output_dtype(info.dtype), info.numel)
    return out


def sample_diffs(
    base: BaseInventory, finetune: FinetuneInventory, output_dtype: Callable[[str], str], names: Iterable[str]
) -> dict[str, TensorDiff]:
    """Each base tensor in `names` that the fine-tune has, compared on a sample of its values."""
    assert base.remote is not None, "sampling reads a base whose weights were not downloaded"
    by_base = {base_name: ft_name for ft_name, base_name in finetune.base_names.items()}
    wanted = [n for n in names if n in by_base]
    windows = [w for n in wanted if (w := _window(base, n, by_base[n], finetune)) is not None]
    values = _read_windows(base.remote, windows)
    diffs = unchecked_diffs(base, finetune, output_dtype, wanted)  # what cannot be sampled stays unchecked
    for w in windows:
        info, ft = base.checkpoint.tensors[w.name], finetune.checkpoint.tensors[w.source]
        diffs[w.name] = _classify(w, values[w.name], ft, info, output_dtype(info.dtype))
    return diffs


def _window(base: BaseInventory, name: str, source: str, finetune: FinetuneInventory) -> _Window | None:
    info, ft = base.checkpoint.tensors[name], finetune.checkpoint.tensors[source]
    if not isinstance(info, T.TensorInfo) or isinstance(ft, T.ComputedTensor):
        return None
    if info.numel == 0 or info.nbytes % info.numel or ft.nbytes % max(ft.numel, 1):
        return None  # sub-byte dtypes: no element boundaries to cut at
    count = min(info.numel, SAMPLE_VALUES)
    first = (info.numel - count) // 2
    itemsize = info.nbytes // info.numel
    shard = base.rel(info.file)
    return _Window(name, source, shard, info.absolute_range[0] + first * itemsize, first, count, itemsize)


def _read_windows(remote: RemoteFiles, windows: list[_Window]) -> dict[str, bytes]:
    """The base's bytes of every window, with nearby windows of a shard read in one request."""
    from hubsync.remote import parallel

    groups: list[list[_Window]] = []
    for w in sorted(windows, key=lambda w: (w.shard, w.offset)):
        last = groups[-1][-1] if groups else None
        if last is not None and last.shard == w.shard and w.offset - _end(last) <= MERGE_GAP:
            groups[-1].append(w)
        else:
            groups.append([w])
    chunks = parallel(lambda g: remote.read(g[0].shard, g[0].offset, _end(g[-1]) - g[0].offset), groups)
    values = {}
    for group, chunk in zip(groups, chunks):
        for w in group:
            start = w.offset - group[0].offset
            values[w.name] = chunk[start : start + w.count * w.itemsize]
    return values


def _end(w: _Window) -> int:
    return w.offset + w.count * w.itemsize


def _finetune_values(ft: T.TensorRef, w: _Window) -> np.ndarray:
    """The fine-tune's values at the window's elements (a numpy chunk, see hubsync.chunks)."""
    import numpy as np

    if isinstance(ft, T.TensorInfo):  # the same elements, read from the fine-tune's own file
        size = ft.nbytes // ft.numel
        with open(ft.file, "rb") as f:
            f.seek(ft.absolute_range[0] + w.first * size)
            data = bytearray(f.read(w.count * size))
        return np.frombuffer(data, dtype=chunks.storage(ft.dtype))
    return chunks.from_torch(T.load_tensor(ft))[w.first : w.first + w.count]


def _classify(w: _Window, raw: bytes, ft: T.TensorRef, info: T.TensorRef, out_dtype: str) -> TensorDiff:
    """compare's states, decided by compare's own rules (`Scan`) on the sample: a difference is certain, an
    equality is not, and the relative change of a sample says nothing of the tensor's."""
    import numpy as np

    b = np.frombuffer(bytearray(raw), dtype=chunks.storage(info.dtype))
    scan = Scan(ft.dtype, info.dtype, out_dtype)
    scan.feed(b, _finetune_values(ft, w))
    state, rounding = scan.decide()
    diff = TensorDiff(
        w.name, w.source, state, ft.dtype, out_dtype, info.numel, rounding=rounding, sampled=True
    )
    if state != "changed":
        return diff
    nonfinite = scan.delta.nonfinite
    max_abs = scan.delta.max_abs if chunks.is_float(ft.dtype) and not nonfinite else math.nan
    return replace(diff, nonfinite=nonfinite, max_abs=max_abs, rel=math.nan)
