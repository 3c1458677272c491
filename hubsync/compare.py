"""Compare each fine-tune tensor with its base tensor, one pair at a time, and record the facts.

This is the only step before writing that reads tensor data. Its output (`TensorDiff` per tensor) is an input
of the pure planner, which decides from these facts alone. Memory: one base tensor, one fine-tune tensor and
their casts at a time; tensors saved in the base's dtype are compared byte by byte without torch.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from hubsync import tensors as T
from hubsync.finetune import FinetuneInventory
from hubsync.resolve import BaseInventory

# same:      identical to the base (or the base seen in the saved dtype, bit for bit)
# roundtrip: the base rounded through a floating dtype no wider than the saved one (a bf16 base trained in
#            fp16; an fp16 base trained in bf16 and saved upcast to fp32): not a change; `rounding` says which
# vanished:  changed in training, but identical to the base once cast to the output dtype
# changed:   differs from the base in the output
# unchecked: not compared (a plan made from the base's headers, without its bytes); `build` compares it
State = Literal["same", "roundtrip", "vanished", "changed", "unchecked"]
ORDER: dict[str, int] = {"unchecked": -1, "same": 0, "roundtrip": 1, "vanished": 2, "changed": 3}


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
    rounding: str | None = None  # for roundtrip: the dtype the base was rounded through
    sampled: bool = False  # decided on a sample of the values (hubsync.sample), not on every byte


# Training dtypes that hold every value of a base dtype exactly (so casting back is the identity).
_WIDER: dict[str, set[str]] = {
    "BF16": {"BF16", "F32", "F64"},
    "F16": {"F16", "F32", "F64"},
    "F32": {"F32", "F64"},
    "F64": {"F64"},
}
_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8}


def roundings(saved: str, base: str) -> tuple[str, ...]:
    """The floating dtypes the base may have been rounded through before it was saved in `saved`: `saved`
    itself first (the common case), then those no wider than it that do not hold every value of `base` (the
    others give `saved` back)."""
    if saved not in _BYTES or base not in _WIDER:
        return (saved,)
    others = (d for d in ("BF16", "F16", "F32") if d != saved and d not in _WIDER[base])
    return (saved, *(d for d in others if _BYTES[d] <= _BYTES[saved]))


@dataclass
class _Scan:
    """What one pass over a tensor pair's chunks found."""

    seen_all: bool = True  # every chunk equals the base as the saved dtype holds it
    out_all: bool = True  # every chunk equals the base in the output dtype
    viable: set[str] | None = None  # other roundings that explain every chunk the saved dtype did not
    nonfinite: bool = False
    max_abs: float = 0.0
    diff_sq: float = 0.0


def _scan(base_info: T.TensorRef, ft_info: T.TensorRef, out_dtype: str) -> _Scan:
    import torch

    out = T.torch_dtype(out_dtype)
    others = roundings(ft_info.dtype, base_info.dtype)[1:]
    # When the saved dtype holds every base value exactly and the output is the base's dtype, a chunk equal
    # to the base-as-saved is equal in the output too: no second cast or compare is needed.
    exact_back = out_dtype == base_info.dtype and ft_info.dtype in _WIDER.get(
        base_info.dtype, {base_info.dtype}
    )
    scan = _Scan()
    # Chunk by chunk, so that memory stays at a few chunks even for a 500 MB embedding matrix.
    for b, t in zip(T.iter_tensor_chunks(base_info), T.iter_tensor_chunks(ft_info)):
        seen_equal = torch.equal(b.to(t.dtype), t)
        if seen_equal and exact_back:
            continue
        if not seen_equal and (scan.viable is None or scan.viable):
            found = {d for d in others if torch.equal(b.to(T.torch_dtype(d)).to(t.dtype), t)}
            scan.viable = found if scan.viable is None else scan.viable & found
        o, bo = t.to(out), b.to(out)
        out_equal = torch.equal(o, bo)  # NaN is never equal, so an equal chunk holds none
        scan.seen_all &= seen_equal
        scan.out_all &= out_equal
        if out_equal or seen_equal or not t.is_floating_point():
            continue
        if T.has_nan_or_inf(t):
            scan.nonfinite = True
            continue
        d = o.float() - bo.float()
        scan.max_abs = max(scan.max_abs, float(d.abs().max()))
        scan.diff_sq += float(torch.linalg.vector_norm(d)) ** 2
    return scan


def _rounded_through(base_info: T.TensorRef, ft_info: T.TensorRef, viable: set[str]) -> str | None:
    """The first rounding that explains the whole tensor (a second pass, only when the first found one that
    explains the chunks the saved dtype did not)."""
    import torch

    for dtype in (d for d in roundings(ft_info.dtype, base_info.dtype) if d in viable):
        rounded = T.torch_dtype(dtype)
        chunks = zip(T.iter_tensor_chunks(base_info), T.iter_tensor_chunks(ft_info))
        if all(torch.equal(b.to(rounded).to(t.dtype), t) for b, t in chunks):
            return dtype
    return None


def _compare_one(
    name: str, source: str, base_info: T.TensorRef, ft_info: T.TensorRef, out_dtype: str
) -> TensorDiff:
    numel = base_info.numel
    if (
        ft_info.dtype == base_info.dtype == out_dtype
        and isinstance(ft_info, T.TensorInfo)
        and isinstance(base_info, T.TensorInfo)
        and T.tensor_bytes_equal(base_info, ft_info)
    ):
        return TensorDiff(name, source, "same", ft_info.dtype, out_dtype, numel)
    meta = (ft_info.dtype, out_dtype, numel)
    scan = _scan(base_info, ft_info, out_dtype)
    if scan.seen_all:
        if scan.out_all:
            return TensorDiff(name, source, "same", *meta)
        return TensorDiff(name, source, "roundtrip", *meta, rounding=ft_info.dtype)
    rounding = _rounded_through(base_info, ft_info, scan.viable) if scan.viable else None
    if rounding is not None:
        return TensorDiff(name, source, "roundtrip", *meta, rounding=rounding)
    if scan.out_all:
        return TensorDiff(name, source, "vanished", *meta)
    if scan.nonfinite or not torch_is_float(ft_info.dtype):
        return TensorDiff(name, source, "changed", *meta, scan.nonfinite, math.nan, math.nan)
    # ||base|| only for tensors that changed (the tuned ones): a second, cheap pass over the base alone.
    import torch

    base_sq = sum(float(torch.linalg.vector_norm(b.float())) ** 2 for b in T.iter_tensor_chunks(base_info))
    diff = math.sqrt(scan.diff_sq)
    rel = diff / math.sqrt(base_sq) if base_sq > 0 else (0.0 if scan.diff_sq == 0 else math.inf)
    return TensorDiff(name, source, "changed", *meta, False, scan.max_abs, rel)


def torch_is_float(st_dtype: str) -> bool:
    return st_dtype.startswith(("F", "BF"))


def iter_diffs(
    base: BaseInventory, finetune: FinetuneInventory, output_dtype: Callable[[str], str]
) -> Iterator[TensorDiff]:
    """Yield one TensorDiff per mapped fine-tune tensor, in base order (so shards are read sequentially). A
    tied copy (the output head saved beside the embedding it shares) is compared too, and the more changed of
    the two speaks for the base tensor: an untied head that moved is not hidden behind a frozen embedding."""
    by_base = {base_name: ft_name for ft_name, base_name in finetune.base_names.items()}
    copies = {base_name: ft_name for ft_name, base_name in finetune.tied.items()}
    for name, base_info in base.checkpoint.tensors.items():
        sources = [s for s in (by_base.get(name), copies.get(name)) if s is not None]
        out = output_dtype(base_info.dtype)
        diffs = [_compare_one(name, s, base_info, finetune.checkpoint.tensors[s], out) for s in sources]
        if diffs:
            yield max(diffs, key=lambda d: ORDER[d.state])


def compare(
    base: BaseInventory, finetune: FinetuneInventory, output_dtype: Callable[[str], str]
) -> dict[str, TensorDiff]:
    return {d.name: d for d in iter_diffs(base, finetune, output_dtype)}


def rounding_notes(diffs: Mapping[str, TensorDiff]) -> list[str]:
    """One plan note per (saved dtype, rounding): how many tensors it explained, in which parts."""
    groups: dict[tuple[str, str], Counter[str]] = {}
    for d in diffs.values():
        if d.state == "roundtrip" and d.rounding is not None:
            groups.setdefault((d.finetune_dtype, d.rounding), Counter())[_part(d.name)] += 1
    notes = []
    for (saved, rounding), parts in sorted(groups.items()):
        where = ", ".join(f"{p} {n}" for p, n in sorted(parts.items()))
        how = f"saved as {saved}" if saved == rounding else f"saved as {saved} after a {rounding} run"
        notes.append(
            f"{sum(parts.values())} tensor(s) equal the base rounded through {rounding} ({how}): not a change "
            f"({where})"
        )
    return notes


def _part(name: str) -> str:
    """The top module of a tensor name, looking through a wrapping `model.` (`model.visual.`, `vpm.`)."""
    parts = name.split(".")
    depth = 2 if parts[0] == "model" and len(parts) > 2 else 1
    return ".".join(parts[:depth]) + "."
