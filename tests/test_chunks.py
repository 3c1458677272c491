"""compare's fast paths (hubsync.chunks) against torch, on the values where shortcuts go wrong: -0.0, NaN
payloads, subnormals, infinities, rounding ties. The casts must be torch's to the bit (outputs are checked
against transformers' and PEFT's, which cast with torch); equality is the bits, or else the values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hubsync import chunks

# fp32 bit patterns: zeros, subnormals, the normal range's ends, bf16 rounding ties (to even, up, down),
# infinities, and NaNs whose payload is only in the low 16 bits or fills every bit (a naive round-to-nearest
# turns those into Inf or into zero).
EDGE_F32 = np.array(
    [
        0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x00800000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F8000,
        0x3F800000, 0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0xBF808000, 0x7F800000, 0xFF800000,
        0x7FC00000, 0xFFC00000, 0x7F800001, 0x7F808000, 0x7FBFFFFF, 0x7FFF8000, 0x7FFFFFFF, 0xFFFFFFFF,
    ],
    dtype=np.uint32,
).view(np.float32)  # fmt: skip


def _random_f32(n: int = 100_000) -> np.ndarray:
    values = np.random.default_rng(0).standard_normal(n).astype(np.float32) * 0.02
    with np.errstate(all="ignore"):
        return np.concatenate([EDGE_F32, values, EDGE_F32 * 3.0])


def _torch_bits(t: torch.Tensor) -> np.ndarray:
    wide = t.element_size() == 4
    return (
        t.contiguous()
        .view(torch.int32 if wide else torch.int16)
        .numpy()
        .view(np.uint32 if wide else np.uint16)
    )


# (exponent, mantissa) masks: a NaN has every exponent bit and some mantissa bit set
_MASKS = {"BF16": (0x7F80, 0x007F), "F16": (0x7C00, 0x03FF), "F32": (0x7F800000, 0x007FFFFF)}


def _nan(bits: np.ndarray, dtype: str) -> np.ndarray:
    exponent, mantissa = _MASKS[dtype]
    return ((bits & exponent) == exponent) & ((bits & mantissa) != 0)


def _same_bits_or_both_nan(ours: np.ndarray, theirs: np.ndarray, dtype: str) -> None:
    nan = _nan(ours, dtype)
    assert (nan == _nan(theirs, dtype)).all(), "a NaN must stay a NaN, and only a NaN may become one"
    assert (ours[~nan] == theirs[~nan]).all(), "every other value is torch's, bit for bit"


def test_fp32_to_bf16_rounds_like_torch() -> None:
    values = _random_f32()
    ours = chunks.cast(values, "F32", "BF16", "t")
    _same_bits_or_both_nan(ours, _torch_bits(torch.from_numpy(values).to(torch.bfloat16)), "BF16")


@pytest.mark.parametrize("n", [1000, 1 << 17])  # numpy's cast below `chunks.SMALL`, torch's above it
def test_fp16_casts_are_torchs_on_both_paths(n: int) -> None:
    values = np.resize(_random_f32(), n)
    ours = chunks.cast(values, "F32", "F16", "t")
    theirs = _torch_bits(torch.from_numpy(values).to(torch.float16))
    _same_bits_or_both_nan(ours.view(np.uint16), theirs, "F16")
    back = chunks.cast(ours, "F16", "F32", "t2")
    _same_bits_or_both_nan(back.view(np.uint32), _torch_bits(torch.from_numpy(ours.copy()).float()), "F32")


def test_bf16_to_fp32_is_the_exact_shift() -> None:
    bits = np.arange(0, 1 << 16, dtype=np.uint16)  # every bf16 value, NaNs included
    ours = chunks.cast(bits, "BF16", "F32", "t")
    theirs = torch.from_numpy(bits.view(np.int16).copy()).view(torch.bfloat16).float()
    assert (ours.view(np.uint32) == _torch_bits(theirs)).all()


def test_fp64_to_bf16_rounds_through_fp32_as_torch_does() -> None:
    ties = [1 + 2**-8 + 2**-30, 1 + 2**-8, -(2**-140)]  # just above a tie, a tie, a bf16 subnormal
    with np.errstate(all="ignore"):
        values = np.concatenate([_random_f32().astype(np.float64), ties])
    ours = chunks.cast(values, "F64", "BF16", "t")
    _same_bits_or_both_nan(ours, _torch_bits(torch.from_numpy(values).to(torch.bfloat16)), "BF16")


def _pairs() -> list[tuple[float, float]]:
    specials = [0.0, -0.0, 1e-45, -1e-45, 1.0, float("inf"), float("-inf")]
    return [(a, b) for a in specials for b in specials]


@pytest.mark.parametrize(("a", "b"), _pairs())
def test_equality_is_the_bits_or_else_torch_equal(a: float, b: float) -> None:
    x, y = np.array([a] * 5000, np.float32), np.array([b] * 5000, np.float32)
    same_bits = x.view(np.uint32)[0] == y.view(np.uint32)[0]
    assert chunks.bits_equal(x, y) == same_bits
    assert chunks.equal(x, y, "F32") == (same_bits or torch.equal(torch.from_numpy(x), torch.from_numpy(y)))


def test_nan_equals_only_the_same_nan() -> None:
    quiet, other = EDGE_F32[16:17], EDGE_F32[18:19]  # 0x7FC00000, 0x7F800001
    assert not torch.equal(torch.from_numpy(quiet), torch.from_numpy(quiet))  # torch: NaN is never equal
    assert chunks.equal(quiet, quiet.copy(), "F32"), "the same NaN, bit for bit: inherited, not introduced"
    assert not chunks.equal(quiet, other, "F32")
    negative_zero = np.array([-0.0], np.float32)
    assert chunks.equal(negative_zero, np.array([0.0], np.float32), "F32") and not chunks.bits_equal(
        negative_zero, np.array([0.0], np.float32)
    )


def test_bf16_equality_compares_values_through_fp32() -> None:
    zero, negative_zero = np.array([0x0000] * 10, np.uint16), np.array([0x8000] * 10, np.uint16)
    assert chunks.equal(zero, negative_zero, "BF16") and not chunks.bits_equal(zero, negative_zero)
    assert not chunks.equal(zero, np.array([0x0001] * 10, np.uint16), "BF16"), "a bf16 subnormal is not 0"


def test_an_fp32_chunk_equals_a_bf16_base_only_with_zero_low_bits() -> None:
    """The rule the fast path relies on: fp32 == bf16 exactly iff the low 16 bits are 0 and the high match."""
    base = np.random.default_rng(1).integers(0, 1 << 16, 20_000, dtype=np.uint32).astype(np.uint16)
    base[(base & 0x7F80) == 0x7F80] = 0x3F80  # no NaN/Inf: torch.equal is the reference here
    exact = chunks.cast(base, "BF16", "F32", "seen").copy()
    assert chunks.equal(exact, exact.copy(), "F32")
    nudged = exact.copy()
    nudged.view(np.uint32)[12_345] |= 1  # one low bit set
    as_torch = torch.from_numpy(base.view(np.int16)).view(torch.bfloat16).float()
    assert torch.equal(torch.from_numpy(exact), as_torch) and not torch.equal(
        torch.from_numpy(nudged), as_torch
    )
    assert not chunks.equal(exact, nudged, "F32")


def test_round_trip_rule_is_torchs() -> None:
    base = (np.random.default_rng(2).standard_normal(10_000) * 0.02).astype(np.float16)
    saved = torch.from_numpy(base).to(torch.bfloat16).float().numpy()  # an fp16 base seen through bf16
    assert chunks.rounds_to(base, saved, "F16", "F32", "BF16")
    assert not chunks.rounds_to(base, base.astype(np.float32), "F16", "F32", "BF16")


@pytest.mark.parametrize(
    ("values", "dtype", "expected"),
    [
        (np.array([1.0, -0.0, 1e-45], np.float32), "F32", False),
        (np.array([3e38, -3e38], np.float32), "F32", False),  # finite, though their squares are not
        (np.array([1.0, np.inf], np.float32), "F32", True),
        (EDGE_F32[18:19], "F32", True),  # a NaN with its payload in the low bits
        (np.array([0x3F80, 0x7FC1], np.uint16), "BF16", True),
        (np.array([0x3F80, 0x7F7F], np.uint16), "BF16", False),
        (np.array([1.0, np.nan], np.float64), "F64", True),
        (np.array([1, 2], np.int64), "I64", False),
    ],
)
def test_nan_and_inf_are_found_through_one_reduction(values: np.ndarray, dtype: str, expected: bool) -> None:
    assert chunks.has_nonfinite(values, dtype) is expected


def test_a_nan_that_rounds_to_zero_is_still_a_nan_in_bf16() -> None:
    """0xFFFFFFFF + the rounding bias wraps to 0: a bf16 cast by bit arithmetic alone would hide it."""
    out = chunks.cast(EDGE_F32[-3:], "F32", "BF16", "t")  # 0x7FFF8000, 0x7FFFFFFF, 0xFFFFFFFF
    assert chunks.has_nonfinite(out, "BF16") and all((b & 0x7F80) == 0x7F80 and b & 0x7F for b in out)


def test_delta_measures_the_output_change() -> None:
    base = np.array([1.0, 2.0, -4.0], np.float32)
    delta = chunks.Delta()
    chunks.add_delta(delta, base + np.array([0.5, 0.0, -1.0], np.float32), base, "F32")
    assert (delta.max_abs, delta.diff_sq, delta.base_sq, delta.nonfinite) == (1.0, 1.25, 21.0, False)
    chunks.add_delta(delta, np.array([np.inf], np.float32), np.array([0.0], np.float32), "F32")
    assert delta.nonfinite
