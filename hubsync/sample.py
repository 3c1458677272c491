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
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hubsync import tensors as T
from hubsync.compare import TensorDiff
from hubsync.finetune import FinetuneInventory
from hubsync.resolve import BaseInventory

if TYPE_CHECKING:
    import torch

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


def _finetune_values(ft: T.TensorRef, w: _Window) -> torch.Tensor:
    import torch

    if isinstance(ft, T.TensorInfo):  # the same elements, read from the fine-tune's own file
        size = ft.nbytes // ft.numel
        with open(ft.file, "rb") as f:
            f.seek(ft.absolute_range[0] + w.first * size)
            data = bytearray(f.read(w.count * size))
        return torch.frombuffer(data, dtype=T.torch_dtype(ft.dtype))
    return T.load_tensor(ft).reshape(-1)[w.first : w.first + w.count]


def _classify(w: _Window, raw: bytes, ft: T.TensorRef, info: T.TensorRef, out_dtype: str) -> TensorDiff:
    """compare's states, decided on the sample (see compare.py for what each state means)."""
    import torch

    b = torch.frombuffer(bytearray(raw), dtype=T.torch_dtype(info.dtype))
    t = _finetune_values(ft, w)
    out = T.torch_dtype(out_dtype)
    seen_equal = torch.equal(b.to(t.dtype), t)
    o, bo = t.to(out), b.to(out)
    diff = TensorDiff(w.name, w.source, "same", ft.dtype, out_dtype, info.numel, sampled=True)
    if torch.equal(o, bo):
        return diff if seen_equal else _replace(diff, state="vanished")
    if seen_equal:
        return _replace(diff, state="roundtrip")
    if t.is_floating_point() and T.has_nan_or_inf(t):
        return _replace(diff, state="changed", nonfinite=True, max_abs=math.nan, rel=math.nan)
    max_abs = float((o.double() - bo.double()).abs().max()) if t.is_floating_point() else math.nan
    return _replace(diff, state="changed", max_abs=max_abs, rel=math.nan)


def _replace(diff: TensorDiff, **changes: object) -> TensorDiff:
    from dataclasses import replace

    return replace(diff, **changes)  # type: ignore[arg-type]
