"""Compare each fine-tune tensor with its base tensor, one pair at a time, and record the facts.

This is the only step before writing that reads tensor data. Its output (`TensorDiff` per tensor) is an input
of the pure planner, which decides from these facts alone. Memory: one base tensor, one fine-tune tensor and
their casts at a time; tensors saved in the base's dtype are compared byte by byte without torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from hubsync import tensors as T
from hubsync.finetune import FinetuneInventory
from hubsync.resolve import BaseInventory

# same:      identical to the base (or the base seen in the training dtype, bit for bit)
# roundtrip: the base seen in the training dtype, but casting back loses bits (e.g. a bf16 base trained in fp16)
# vanished:  changed in training, but identical to the base once cast to the output dtype
# changed:   differs from the base in the output
# unchecked: not compared (a plan made from the base's headers, without its bytes); `build` compares it
State = Literal["same", "roundtrip", "vanished", "changed", "unchecked"]


@dataclass(frozen=True)
class TensorDiff:
    name: str  # base name
    source: str  # fine-tune name
    state: State
    finetune_dtype: str
    output_dtype: str
    numel: int
    nonfinite: bool = False
    max_abs: float = 0.0
    rel: float = 0.0
    sampled: bool = False  # decided on a sample of the values (hubsync.sample), not on every byte


def _compare_one(
    name: str, source: str, base_info: T.TensorRef, ft_info: T.TensorRef, out_dtype: str
) -> TensorDiff:
    numel = base_info.numel
    if (
        ft_info.dtype == base_info.dtype == out_dtype
        and isinstance(ft_info, T.TensorInfo)
        and isinstance(base_info, T.TensorInfo)
    ):
        if T.tensor_bytes_equal(base_info, ft_info):
            return TensorDiff(name, source, "same", ft_info.dtype, out_dtype, numel)
    import torch

    out = T.torch_dtype(out_dtype)
    # When the training dtype holds every base value exactly and the output is the base's dtype, a chunk
    # equal to the base-as-trained is equal in the output too: no second cast or compare is needed.
    exact_back = out_dtype == base_info.dtype and ft_info.dtype in _WIDER.get(base_info.dtype, {base_info.dtype})
    seen_all = out_all = True
    nonfinite = False
    max_abs = diff_sq = 0.0
    # Chunk by chunk, so that memory stays at a few chunks even for a 500 MB embedding matrix.
    for b, t in zip(T.iter_tensor_chunks(base_info), T.iter_tensor_chunks(ft_info)):
        seen_equal = torch.equal(b.to(t.dtype), t)  # the base as the training run saw it
        if seen_equal and exact_back:
            continue
        o, bo = t.to(out), b.to(out)
        out_equal = torch.equal(o, bo)  # NaN is never equal, so an equal chunk holds none
        seen_all &= seen_equal
        out_all &= out_equal
        if out_equal or seen_equal or not t.is_floating_point():
            continue
        if T.has_nan_or_inf(t):
            nonfinite = True
            continue
        d = o.float() - bo.float()
        max_abs = max(max_abs, float(d.abs().max()))
        diff_sq += float(torch.linalg.vector_norm(d)) ** 2
    if out_all:
        state: State = "same" if seen_all else "vanished"
        return TensorDiff(name, source, state, ft_info.dtype, out_dtype, numel)
    if seen_all:
        return TensorDiff(name, source, "roundtrip", ft_info.dtype, out_dtype, numel)
    if nonfinite or not torch_is_float(ft_info.dtype):
        return TensorDiff(name, source, "changed", ft_info.dtype, out_dtype, numel, nonfinite, math.nan, math.nan)
    # ||base|| only for tensors that changed (the tuned ones): a second, cheap pass over the base alone.
    base_sq = sum(float(torch.linalg.vector_norm(b.float())) ** 2 for b in T.iter_tensor_chunks(base_info))
    rel = math.sqrt(diff_sq) / math.sqrt(base_sq) if base_sq > 0 else (0.0 if diff_sq == 0 else math.inf)
    return TensorDiff(name, source, "changed", ft_info.dtype, out_dtype, numel, False, max_abs, rel)


# Training dtypes that hold every value of a base dtype exactly (so casting back is the identity).
_WIDER: dict[str, set[str]] = {
    "BF16": {"BF16", "F32", "F64"},
    "F16": {"F16", "F32", "F64"},
    "F32": {"F32", "F64"},
    "F64": {"F64"},
}


def torch_is_float(st_dtype: str) -> bool:
    return st_dtype.startswith(("F", "BF"))


def iter_diffs(
    base: BaseInventory, finetune: FinetuneInventory, output_dtype: Callable[[str], str]
) -> Iterator[TensorDiff]:
    """Yield one TensorDiff per mapped fine-tune tensor, in base order (so shards are read sequentially)."""
    by_base = {base_name: ft_name for ft_name, base_name in finetune.base_names.items()}
    for name, base_info in base.checkpoint.tensors.items():
        source = by_base.get(name)
        if source is None:
            continue
        ft_info = finetune.checkpoint.tensors[source]
        yield _compare_one(name, source, base_info, ft_info, output_dtype(base_info.dtype))


def compare(
    base: BaseInventory, finetune: FinetuneInventory, output_dtype: Callable[[str], str]
) -> dict[str, TensorDiff]:
    return {d.name: d for d in iter_diffs(base, finetune, output_dtype)}
