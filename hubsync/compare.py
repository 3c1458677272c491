"""Compare each fine-tune tensor with its base tensor, one pair at a time, and record the facts.

This is the only step before writing that reads tensor data. Its output (`TensorDiff` per tensor) is an input
of the pure planner, which decides from these facts alone. Memory: one base tensor, one fine-tune tensor and
their casts at a time; tensors saved in the base's dtype are compared byte by byte without torch.
"""

from __future__ import annotations

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
State = Literal["same", "roundtrip", "vanished", "changed"]


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


def _compare_one(
    name: str, source: str, base_info: T.TensorRef, ft_info: T.TensorRef, out_dtype: str
) -> TensorDiff:
    numel = base_info.numel
    if ft_info.dtype == base_info.dtype == out_dtype and isinstance(ft_info, T.TensorInfo) and isinstance(
        base_info, T.TensorInfo
    ):
        if T.tensor_bytes_equal(base_info, ft_info):
            return TensorDiff(name, source, "same", ft_info.dtype, out_dtype, numel)
    import torch

    base = T.load_tensor(base_info)
    tuned = T.load_tensor(ft_info)
    is_float = tuned.is_floating_point()
    nonfinite = bool(is_float and T.has_nan_or_inf(tuned))
    output = tuned.to(T.torch_dtype(out_dtype))
    base_out = base.to(T.torch_dtype(out_dtype))
    same_in_output = bool(torch.equal(output.view(-1), base_out.view(-1))) if not nonfinite else False
    if same_in_output:
        seen_in_training = base.to(tuned.dtype)
        if torch.equal(seen_in_training.view(-1), tuned.view(-1)):
            return TensorDiff(name, source, "same", ft_info.dtype, out_dtype, numel)
        return TensorDiff(name, source, "vanished", ft_info.dtype, out_dtype, numel)
    if not nonfinite and tuned.dtype != base.dtype:
        seen_in_training = base.to(tuned.dtype)
        if torch.equal(seen_in_training.view(-1), tuned.view(-1)):
            return TensorDiff(name, source, "roundtrip", ft_info.dtype, out_dtype, numel)
    max_abs, rel = T.delta_stats(base, output) if is_float and not nonfinite else (float("nan"), float("nan"))
    return TensorDiff(name, source, "changed", ft_info.dtype, out_dtype, numel, nonfinite, max_abs, rel)


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
