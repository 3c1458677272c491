"""Compare each fine-tune tensor with its base tensor, in one pass, and record the facts.

This is the only step before writing that reads tensor data. Its output (`TensorDiff` per tensor) is an input
of the pure planner, which decides from these facts alone. One pass over each pair classifies it, looks for
NaN/Inf and measures the change, and, for the tensors the write will take from the fine-tune, produces their
output bytes: they go straight into the staging shard (`Prefill`), so that the writer does not read and cast
the fine-tune again (or compute a LoRA merge again). The arithmetic per chunk lives in `chunks` (bitwise
equality first, casts into reused buffers); tensor pairs are compared by two threads where there are two
cores. Memory: a few chunks per thread, plus the tensor a recipe (a LoRA merge) computes.
"""

from __future__ import annotations

import math
import os
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from hubsync import chunks
from hubsync import tensors as T
from hubsync.finetune import FinetuneInventory
from hubsync.prefill import Prefill
from hubsync.resolve import BaseInventory

if TYPE_CHECKING:
    import numpy as np

# same:      identical to the base (or the base seen in the saved dtype, bit for bit)
# roundtrip: the base rounded through a floating dtype no wider than the saved one (a bf16 base trained in
#            fp16; an fp16 base trained in bf16 and saved upcast to fp32): not a change; `rounding` says which
# vanished:  changed in training, but identical to the base once cast to the output dtype
# changed:   differs from the base in the output
# unchecked: not compared (a plan made from the base's headers, without its bytes); `build` compares it
# "Identical" means the same bits or the same values (-0.0 is 0.0; a NaN equals only itself, bit for bit).
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


class Scan:
    """compare's rules, applied to one tensor pair chunk by chunk (`feed`), then decided (`decide`). The
    same object decides a sampled window of values (hubsync.sample). Chunks are numpy arrays (see
    hubsync.chunks)."""

    def __init__(self, saved: str, base: str, out: str) -> None:
        self.saved, self.base, self.out = saved, base, out
        self.others = roundings(saved, base)[1:]
        # When the saved dtype holds every base value exactly and the output is the base's dtype, a chunk equal
        # to the base-as-saved is equal in the output too: no cast or second compare is needed.
        self.exact_back = out == base and saved in _WIDER.get(base, {base})
        # The base cast for the first test is the base in fp32, exactly, when it is saved in fp32: the change
        # is measured against it without a second cast.
        self.reuse_seen = out == base and saved == "F32" and base in ("BF16", "F16", "F32")
        self.seen_all = True  # every chunk equals the base as the saved dtype holds it
        self.out_all = True  # every chunk equals the base in the output dtype
        self.viable: set[str] | None = None  # other roundings that explain every chunk that is not seen-equal
        self.seen_some = False  # some chunk was seen-equal, so `viable` was not tried on it
        self.delta = chunks.Delta()
        self.unmeasured: list[int] = []  # chunks whose base norm the relative change still needs
        self._chunks = 0

    def feed(self, b: np.ndarray, t: np.ndarray, *, keep: bool = False) -> np.ndarray | None:
        """One chunk: `b` of the base, `t` as saved. With `keep`, return `t` as written to the output (valid
        until the next chunk)."""
        index, self._chunks = self._chunks, self._chunks + 1
        seen = chunks.cast(b, self.base, self.saved, "seen")
        seen_equal = chunks.equal(seen, t, self.saved)
        self.seen_all &= seen_equal
        self.seen_some |= seen_equal
        if seen_equal and self.exact_back:
            self.unmeasured.append(index)
            return chunks.cast(t, self.saved, self.out, "out") if keep else None
        if not seen_equal:
            self._narrow(b, t)
        o, bo = chunks.cast(t, self.saved, self.out, "out"), chunks.cast(b, self.base, self.out, "base-out")
        out_equal = chunks.equal(o, bo, self.out)  # a chunk equal in the output holds no NaN the base lacks
        self.out_all &= out_equal
        if out_equal or seen_equal or not chunks.is_float(self.saved):
            self.unmeasured.append(index)
        else:
            chunks.add_delta(self.delta, o, bo, self.out, base32=seen if self.reuse_seen else None)
        return o if keep else None

    def _narrow(self, b: np.ndarray, t: np.ndarray) -> None:
        """Keep the roundings that also explain this chunk (tried while any is left)."""
        candidates = self.others if self.viable is None else tuple(d for d in self.others if d in self.viable)
        self.viable = {d for d in candidates if chunks.rounds_to(b, t, self.base, self.saved, d)}

    def decide(self, recheck: Callable[[set[str]], str | None] | None = None) -> tuple[State, str | None]:
        """(state, rounding). `recheck(viable)` finds the rounding that explains the whole tensor, for when
        some chunks were seen-equal and the roundings were not tried on them."""
        if self.seen_all:
            return ("same", None) if self.out_all else ("roundtrip", self.saved)
        rounding = None
        if self.viable:
            if not self.seen_some:
                rounding = next(d for d in self.others if d in self.viable)
            elif recheck is not None:
                rounding = recheck(self.viable)
        if rounding is not None:
            return "roundtrip", rounding
        return ("vanished", None) if self.out_all else ("changed", None)


def _rounded_through(base_info: T.TensorRef, ft_info: T.TensorRef, viable: set[str]) -> str | None:
    """The first rounding that explains the whole tensor (a second pass, only when some chunks equal the base
    as saved and the others are explained by a rounding: it must explain those too)."""
    for dtype in (d for d in roundings(ft_info.dtype, base_info.dtype) if d in viable):
        pairs = zip(_chunks_of(base_info, "base"), _chunks_of(ft_info, "finetune"))
        if all(chunks.rounds_to(b, t, base_info.dtype, ft_info.dtype, dtype) for b, t in pairs):
            return dtype
    return None


def _chunks_of(info: T.TensorRef, reuse: str) -> Iterator[np.ndarray]:
    return T.iter_chunks(info, reuse=reuse)


def compare_tensor(
    name: str,
    source: str,
    base_info: T.TensorRef,
    ft_info: T.TensorRef,
    out_dtype: str,
    *,
    keep: Prefill | None = None,
) -> TensorDiff:
    """One fine-tune tensor against its base tensor, in one pass. With `keep`, the tensor's output bytes (the
    fine-tune's values cast to `out_dtype`) are written there as they are produced, and kept when it changed
    (the writer takes exactly those)."""
    scan = Scan(ft_info.dtype, base_info.dtype, out_dtype)
    nbytes = T.dtype_nbytes(out_dtype, base_info.shape)
    entry = keep.reserve(name, source, out_dtype, nbytes) if keep is not None else None
    for b, t in zip(_chunks_of(base_info, "base"), _chunks_of(ft_info, "finetune")):
        out = scan.feed(b, t, keep=entry is not None)
        if entry is not None and out is not None:
            entry.write(chunks.raw(out))
    diff = _diff(name, source, base_info, ft_info, scan)
    if entry is not None and diff.state == "changed" and not diff.nonfinite:
        entry.keep()
    return diff


def _diff(name: str, source: str, base_info: T.TensorRef, ft_info: T.TensorRef, scan: Scan) -> TensorDiff:
    meta = (ft_info.dtype, scan.out, base_info.numel)
    state, rounding = scan.decide(lambda viable: _rounded_through(base_info, ft_info, viable))
    if state != "changed":
        return TensorDiff(name, source, state, *meta, rounding=rounding)
    delta = scan.delta
    if delta.nonfinite or not chunks.is_float(ft_info.dtype):
        return TensorDiff(name, source, "changed", *meta, delta.nonfinite, math.nan, math.nan)
    # ||base|| of the chunks that equal the base (a tensor changed in places): they were not measured
    base_sq = delta.base_sq + _base_norm_sq(base_info, set(scan.unmeasured))
    diff = math.sqrt(delta.diff_sq)
    rel = diff / math.sqrt(base_sq) if base_sq > 0 else (0.0 if delta.diff_sq == 0 else math.inf)
    return TensorDiff(name, source, "changed", *meta, False, delta.max_abs, rel)


def _base_norm_sq(base_info: T.TensorRef, indexes: set[int]) -> float:
    if not indexes:
        return 0.0
    pieces = enumerate(_chunks_of(base_info, "base"))
    return sum(chunks.norm_sq(b, base_info.dtype) for i, b in pieces if i in indexes)


def iter_diffs(
    base: BaseInventory,
    finetune: FinetuneInventory,
    output_dtype: Callable[[str], str],
    *,
    keep: Prefill | None = None,
    wanted: Callable[[str], bool] | None = None,
    workers: int | None = None,
) -> Iterator[TensorDiff]:
    """Yield one TensorDiff per mapped fine-tune tensor, in base order. A tied copy (the output head saved
    beside the embedding it shares) is compared too, and the more changed of the two speaks for the base
    tensor: an untied head that moved is not hidden behind a frozen embedding.

    With `keep`, the output bytes of the tensors whose base names `wanted` accepts (the tuned ones: only those
    are ever taken from the fine-tune) are written where the write wants them. `workers` threads compare
    pairs side by side (default: see `_workers`)."""
    by_base = {base_name: ft_name for ft_name, base_name in finetune.base_names.items()}
    copies = {base_name: ft_name for ft_name, base_name in finetune.tied.items()}
    tensors = finetune.checkpoint.tensors

    def one(name: str) -> TensorDiff | None:
        base_info = base.checkpoint.tensors[name]
        out = output_dtype(base_info.dtype)
        keep_here = keep if keep is not None and (wanted is None or wanted(name)) else None
        diffs = [
            compare_tensor(name, s, base_info, tensors[s], out, keep=keep_here)
            for s in (by_base.get(name), copies.get(name))
            if s is not None
        ]
        return max(diffs, key=lambda d: ORDER[d.state]) if diffs else None

    names = [n for n in base.checkpoint.tensors if n in by_base or n in copies]
    yield from (d for d in _in_order(one, names, workers or _workers(tensors.values())) if d is not None)


def _workers(finetune: Iterable[T.TensorRef]) -> int:
    """Two threads where there are two cores and a pair costs a few chunks of memory. A tensor that exists
    whole in memory (a LoRA merge, a `.bin` shard's tensor) costs its size per thread: those are compared one
    at a time, and torch's own threads work the merge's matrix product instead."""
    if not all(isinstance(t, T.TensorInfo) for t in finetune):
        return 1
    return min(2, os.cpu_count() or 1)


def _in_order(
    fn: Callable[[str], TensorDiff | None], names: Iterable[str], workers: int
) -> Iterator[TensorDiff | None]:
    """fn over names, `workers` at a time, results in order. A bounded window of pairs in flight keeps
    memory at a few tensors per worker."""
    if workers <= 1:
        yield from map(fn, names)
        return
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(workers, thread_name_prefix="hubsync-compare")
    window: deque[Any] = deque()
    try:
        with chunks.one_torch_thread():
            for name in names:
                window.append(pool.submit(fn, name))
                if len(window) > 2 * workers:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
