"""Tensor chunks compared and cast at memory speed: the arithmetic of compare's one pass.

A chunk is a contiguous 1-D numpy array holding a piece of a tensor in its safetensors dtype; bf16, which
numpy lacks, is held as its bit patterns (uint16). What makes this fast, each measured on the 2-core build
machine (docs/performance.md):

- numpy, not torch, for bf16, fp32 and fp64: importing torch takes longer (about 1.8 s there) than comparing
  a gigabyte. torch is imported only for what numpy cannot do fast or at all (fp16 casts, fp8, integer to
  float), and then runs on one thread per compare worker.
- Equality is decided on bits first, with the C library's `memcmp` (through ctypes, which releases the GIL):
  it runs at memory bandwidth and stops at the first difference.
- Values are compared only where bits differ, to keep the rule compare always had (-0.0 equals 0.0); a short
  prefix is compared first, so a chunk that really changed costs microseconds, not a second pass.
- An exact upcast (bf16 to fp32 is a 16-bit shift) makes "the fp32 chunk equals the bf16 base" one shift and
  one memcmp. fp32 to bf16 is rounded to nearest-even on the bits, as torch rounds it.
- Casts write into buffers that a thread keeps from chunk to chunk (`Scratch`): a fresh 16 MB array per
  chunk costs more in page faults than the cast itself.
- NaN/Inf are found through reductions: a finite sum of squares proves every value finite; only a chunk
  whose sum is not finite is searched value by value.
"""

from __future__ import annotations

import ctypes
import math
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

PREFIX = 4096  # elements compared by value before a whole chunk is
BLOCK = 1 << 18  # elements per pass of a multi-pass cast: the passes then run in the CPU's cache
SMALL = 1 << 16  # below this many elements, numpy's slow fp16 casts cost less than importing torch

# How numpy holds each safetensors dtype (bf16 and fp8 as their bits). numpy is imported where it is used:
# the CLI imports this module's importers, and must start fast.
STORAGE: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "uint16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "C64": "complex64",
    "F8_E5M2": "uint8",  # fp8 as its bits, cast through torch
    "F8_E4M3": "uint8",
    "F8_E8M0": "uint8",
}
FLOATS = ("F64", "F32", "F16", "BF16")

# Names of torch dtype attributes, looked up lazily so that this table costs no torch import.
TORCH_NAMES: dict[str, str] = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E8M0": "float8_e8m0fnu",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
    "C64": "complex64",
}


def _load_memcmp() -> Callable[[int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None)
        fn = libc.memcmp
    except (OSError, AttributeError):  # no C library to call into (an unusual platform): numpy instead
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn  # type: ignore[no-any-return]


_memcmp = _load_memcmp()


def is_float(dtype: str) -> bool:
    return dtype.startswith(("F", "BF"))


def storage(dtype: str) -> Any:
    """The numpy dtype a chunk of `dtype` is held in; KeyError for dtypes numpy cannot hold."""
    return STORAGE[dtype]


class Scratch:
    """Buffers one thread reuses for every chunk: `get(role, np_dtype, n)` is an array over the role's buffer,
    grown when a chunk needs more. Its contents are valid until the next `get` of the same role."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, role: str, dtype: Any, n: int) -> np.ndarray:
        import numpy as np

        size = n * np.dtype(dtype).itemsize
        buffer = self._buffers.get(role)
        if buffer is None or buffer.nbytes < size:
            buffer = self._buffers[role] = np.empty(max(size, 64), dtype=np.uint8)
        return buffer[:size].view(dtype)


_local = threading.local()


def scratch() -> Scratch:
    """This thread's scratch buffers."""
    found = getattr(_local, "scratch", None)
    if found is None:
        found = _local.scratch = Scratch()
    return found  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------------------------ torch


class _TorchThreads:
    """Whether torch must run on one thread, and the count to give back afterwards."""

    limited = False
    restore: int | None = None


_torch_threads = _TorchThreads()


def torch_module() -> Any:
    """torch, imported on first need; on one thread while compare's workers run (see `one_torch_thread`)."""
    import torch

    if _torch_threads.limited and torch.get_num_threads() != 1:
        if _torch_threads.restore is None:
            _torch_threads.restore = torch.get_num_threads()
        torch.set_num_threads(1)
    return torch


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """While compare's own threads work side by side, torch's thread pool would fight them for the cores (and
    on a loaded machine a pool waiting for a busy core is several times slower than one thread). Applies now
    if torch is loaded, else when `torch_module` loads it."""
    _torch_threads.limited = True
    if "torch" in sys.modules:
        torch_module()
    try:
        yield
    finally:
        _torch_threads.limited = False
        torch = sys.modules.get("torch")
        if torch is not None and _torch_threads.restore is not None:
            torch.set_num_threads(_torch_threads.restore)
        _torch_threads.restore = None


def from_torch(t: torch.Tensor) -> np.ndarray:
    """A contiguous 1-D chunk of a torch tensor, without a copy (bf16 as its bits)."""
    import numpy as np

    torch = torch_module()
    flat = t.detach().reshape(-1).contiguous()
    if flat.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()  # type: ignore[no-any-return]


def _to_torch(a: np.ndarray, dtype: str) -> torch.Tensor:
    import numpy as np

    torch = torch_module()
    if dtype == "BF16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a).view(getattr(torch, TORCH_NAMES[dtype]))


# ------------------------------------------------------------------------------------------------ casts


def cast(a: np.ndarray, src: str, dst: str, role: str, buffers: Scratch | None = None) -> np.ndarray:
    """Chunk `a` of dtype `src` as `dst`, written into the role's scratch buffer (`a` itself when the dtypes
    agree). The same values as torch's `.to()` gives, bit for bit, NaN payloads aside."""
    import numpy as np

    if src == dst:
        return a
    buffers = buffers or scratch()
    out = buffers.get(role, storage(dst), a.size)
    if (src, dst) == ("BF16", "F32"):
        np.left_shift(a, 16, out=out.view(np.uint32), dtype=np.uint32)
    elif (src, dst) == ("F32", "BF16"):
        round_to_bf16(a, out, buffers)
    elif {src, dst} <= {"F32", "F64"} or ({src, dst} <= {"F16", "F32", "F64"} and a.size <= SMALL):
        with np.errstate(all="ignore"):  # overflow to Inf is the cast's answer, not a warning to print
            np.copyto(out, a, casting="unsafe")
    elif "BF16" in (src, dst) and {src, dst} <= set(FLOATS):  # through fp32, as torch goes from and to bf16
        return cast(cast(a, src, "F32", role + "-f32", buffers), "F32", dst, role, buffers)
    else:  # fp16, fp8, integers and floats: torch's own cast (numpy's fp16 is five times slower)
        _to_torch(out, dst).copy_(_to_torch(a, src))
    return out


def round_to_bf16(a: np.ndarray, out: np.ndarray, buffers: Scratch) -> None:
    """fp32 -> bf16, rounded to nearest-even on the bits, in cache-sized blocks. A NaN rounds to a NaN
    (0x7FC0 or 0xFFFF by sign; which NaN is moot: a tensor with NaN is never written)."""
    import numpy as np

    bits = a.view(np.uint32)
    for start in range(0, a.size, BLOCK):
        u = bits[start : start + BLOCK]
        t = buffers.get("round", np.uint32, u.size)
        np.right_shift(u, 16, out=t)
        np.bitwise_and(t, 1, out=t)
        np.add(t, 0x7FFF, out=t)
        np.add(t, u, out=t)
        np.right_shift(t, 16, out=out[start : start + BLOCK], casting="unsafe")
    # A NaN whose payload is in the low bits would round to Inf or to zero: only NaNs can do that, and only
    # a non-finite sum finds them, so the cost is one reduction.
    if not math.isfinite(_sum_sq(a)):
        nan = np.isnan(a)
        if nan.any():
            out[nan] = np.where(np.signbit(a[nan]), 0xFFFF, 0x7FC0)


# ------------------------------------------------------------------------------------------------ equality


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two contiguous chunks hold the same bytes (NaN payloads and the sign of zero count)."""
    import numpy as np

    if a.nbytes != b.nbytes:
        return False
    if a.nbytes == 0:
        return True
    if _memcmp is not None and a.flags.c_contiguous and b.flags.c_contiguous:
        return _memcmp(a.ctypes.data, b.ctypes.data, a.nbytes) == 0
    return bool(np.array_equal(a.view(np.uint8), b.view(np.uint8)))


def equal(a: np.ndarray, b: np.ndarray, dtype: str) -> bool:
    """compare's equality of two chunks of `dtype`: the same bits, or the same values (so -0.0 equals 0.0,
    as it always has; a NaN equals only the same NaN, bit for bit)."""
    if bits_equal(a, b):
        return True
    if not is_float(dtype) or a.size != b.size:
        return False  # integers: equal values are equal bits
    head = min(PREFIX, a.size)
    return _values_equal(a[:head], b[:head], dtype) and _values_equal(a, b, dtype)


def _values_equal(a: np.ndarray, b: np.ndarray, dtype: str) -> bool:
    import numpy as np

    if dtype == "BF16":
        buffers = Scratch()  # rare (bits differ, values may not): no need to keep these
        return bool(np.array_equal(cast(a, dtype, "F32", "a", buffers), cast(b, dtype, "F32", "b", buffers)))
    return bool(np.array_equal(a, b))


def rounds_to(b: np.ndarray, t: np.ndarray, base: str, saved: str, through: str) -> bool:
    """Whether `b` rounded through `through`, then cast to `saved`, is `t` (compare's round-trip rule). A
    short prefix first: a rounding that does not explain it is ruled out at once."""
    head = min(PREFIX, b.size)
    parts = [(b[:head], t[:head])] if head < b.size else []
    return all(_round_trip_equal(pb, pt, base, saved, through) for pb, pt in [*parts, (b, t)])


def _round_trip_equal(b: np.ndarray, t: np.ndarray, base: str, saved: str, through: str) -> bool:
    rounded = cast(b, base, through, "through")
    return equal(cast(rounded, through, saved, "through-back"), t, saved)


# ------------------------------------------------------------------------------------------------ measures


@dataclass
class Delta:
    """The size of a change, summed over chunks: max |out - base|, Σ (out - base)², Σ base², and whether a
    value was NaN or Inf (then the sums mean nothing)."""

    max_abs: float = 0.0
    diff_sq: float = 0.0
    base_sq: float = 0.0
    nonfinite: bool = False


def for_sums(a: np.ndarray, dtype: str, role: str) -> np.ndarray:
    """A floating chunk in the dtype its sums are taken in: fp64 as it is, everything else in fp32."""
    return a if dtype == "F64" else cast(a, dtype, "F32", role)


def add_delta(
    delta: Delta, out: np.ndarray, base: np.ndarray, dtype: str, *, base32: np.ndarray | None = None
) -> None:
    """Add one chunk's change (both chunks in the output `dtype`) to `delta`, in fp32 (exact for a difference
    of two bf16 or fp16 values; the sums are Python floats). `base32`: `base` exactly in fp32, if at hand."""
    import numpy as np

    buffers = scratch()
    base32 = for_sums(base, dtype, "delta-base") if base32 is None else base32
    out32 = for_sums(out, dtype, "delta")
    diff = buffers.get("delta-diff", out32.dtype, out32.size)
    with np.errstate(all="ignore"):
        np.subtract(out32, base32, out=diff)
    diff_sq, base_sq = _sum_sq(diff), _sum_sq(base32)
    # Not finite: a NaN or an Inf in the output (a value too large for its dtype), else a change too large
    # to square in fp32 or a base that is not finite.
    if not (math.isfinite(diff_sq) and math.isfinite(base_sq)) and has_nonfinite(out, dtype):
        delta.nonfinite = True
        return
    if diff.size:
        delta.max_abs = max(delta.max_abs, -float(diff.min()), float(diff.max()))
    delta.diff_sq += diff_sq
    delta.base_sq += base_sq


def _sum_sq(a: np.ndarray) -> float:
    """Σ a² (a BLAS dot: one read of the chunk); Inf or NaN when a value is, or when the sum overflows."""
    import numpy as np

    with np.errstate(all="ignore"):
        return float(np.dot(a, a))


def norm_sq(a: np.ndarray, dtype: str) -> float:
    """Σ a² of a chunk, in fp32 (fp64 for fp64)."""

    return _sum_sq(for_sums(a, dtype, "norm"))


def has_nonfinite(a: np.ndarray, dtype: str) -> bool:
    """Whether a floating chunk holds NaN or ±Inf: one reduction (a finite sum of squares proves every value
    finite), and the value-by-value search only when it is not finite."""
    import numpy as np

    if not is_float(dtype) or a.size == 0:
        return False
    values = for_sums(a, dtype, "finite")
    if math.isfinite(_sum_sq(values)):
        return False
    return not bool(np.isfinite(values).all())


def raw(a: np.ndarray) -> memoryview:
    """The bytes of a contiguous chunk, without a copy."""
    import numpy as np

    return a.reshape(-1).view(np.uint8).data
