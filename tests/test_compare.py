"""compare's round-trip rule on hand-made tensors: a frozen tensor is unchanged when it equals the base rounded
through a floating dtype no wider than the one it was saved in, and only then."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hubsync import tensors as T
from hubsync.compare import Scan, TensorDiff, compare_tensor, rounding_notes, roundings

# One tensor of more than one compare chunk: the rule must hold for all of them.
CHUNK = T.CHUNK_ELEMENTS
TWO_CHUNKS = CHUNK + 1024


def _ref(path: Path, tensor: torch.Tensor) -> T.TensorRef:
    save_file({"w": tensor.contiguous()}, str(path))
    return T.read_safetensors_header(path).tensors["w"]


def _compare(tmp_path: Path, base: torch.Tensor, saved: torch.Tensor, out: str | None = None) -> TensorDiff:
    base_ref = _ref(tmp_path / "base.safetensors", base)
    saved_ref = _ref(tmp_path / "ft.safetensors", saved)
    return compare_tensor("w", "w", base_ref, saved_ref, out or base_ref.dtype)


def _weights(n: int = 4096, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return (torch.randn(n, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)


@pytest.mark.parametrize(
    ("saved", "base", "expected"),
    [
        ("F32", "F16", ("F32", "BF16")),  # an fp16 base seen through bf16, saved upcast
        ("F32", "BF16", ("F32", "F16")),
        ("F32", "F32", ("F32", "BF16", "F16")),
        ("BF16", "F16", ("BF16",)),  # fp16 holds the base exactly: rounding through it is no rounding
        ("BF16", "F32", ("BF16", "F16")),
        ("F16", "BF16", ("F16",)),
        ("I64", "I64", ("I64",)),
    ],
)
def test_roundings_are_no_wider_than_the_saved_dtype(
    saved: str, base: str, expected: tuple[str, ...]
) -> None:
    assert roundings(saved, base) == expected


def test_fp16_base_trained_in_bf16_and_saved_in_fp32_is_unchanged(tmp_path: Path) -> None:
    base = _weights()
    diff = _compare(tmp_path, base, base.to(torch.bfloat16).float())
    assert (diff.state, diff.rounding) == ("roundtrip", "BF16")


def test_exact_upcast_is_the_same(tmp_path: Path) -> None:
    base = _weights(dtype=torch.bfloat16)
    diff = _compare(tmp_path, base, base.float())
    assert (diff.state, diff.rounding) == ("same", None)


def test_bf16_copy_of_an_fp32_base_is_a_round_trip(tmp_path: Path) -> None:
    base = _weights(dtype=torch.float32)
    diff = _compare(tmp_path, base, base.to(torch.bfloat16))
    assert (diff.state, diff.rounding) == ("roundtrip", "BF16")


def test_change_below_bf16_resolution_of_a_bf16_base_is_still_a_change(tmp_path: Path) -> None:
    base = _weights(dtype=torch.bfloat16)
    nudged = base.float() * (1 + 1e-4)  # bf16 keeps 8 bits of mantissa: this vanishes in the cast back
    diff = _compare(tmp_path, base, nudged)
    assert (diff.state, diff.rounding) == ("vanished", None)


def test_a_real_change_in_fp32_of_an_fp16_base(tmp_path: Path) -> None:
    base = _weights()
    moved = base.float() + 0.01
    diff = _compare(tmp_path, base, moved)
    assert diff.state == "changed" and diff.rounding is None
    assert diff.max_abs == pytest.approx(0.01, rel=0.1)


def test_one_rounding_must_explain_the_whole_tensor(tmp_path: Path) -> None:
    """Chunk 1 saved exactly, chunk 2 rounded through bf16: no single rounding explains both, so it changed.
    Rounded through bf16 everywhere, it is unchanged, even though chunk 1 alone looks exact."""
    base = _weights(TWO_CHUNKS)
    exact_then_rounded = torch.cat([base[:CHUNK].float(), base[CHUNK:].to(torch.bfloat16).float()])
    mixed = _compare(tmp_path, base, exact_then_rounded)
    assert mixed.state in ("changed", "vanished") and mixed.rounding is None

    # chunk 1 holds values that bf16 represents exactly, so it passes as an exact copy; chunk 2 does not
    representable = torch.cat([torch.full((CHUNK,), 0.5), base[CHUNK:].float()]).half()
    uniform = _compare(tmp_path, representable, representable.to(torch.bfloat16).float())
    assert (uniform.state, uniform.rounding) == ("roundtrip", "BF16")


def test_rounding_notes_name_the_rounding_and_the_parts() -> None:
    def diff(name: str, state: str, rounding: str | None, saved: str = "F32") -> TensorDiff:
        return TensorDiff(name, name, state, saved, "F16", 4, rounding=rounding)  # type: ignore[arg-type]

    diffs = {
        d.name: d
        for d in (
            diff("language_model.model.layers.0.w", "roundtrip", "BF16"),
            diff("language_model.model.norm.weight", "roundtrip", "BF16"),
            diff("model.visual.blocks.0.w", "roundtrip", "BF16"),
            diff("vision_tower.w", "changed", None),
            diff("lm_head.weight", "roundtrip", "BF16", saved="BF16"),
            diff("other.w", "same", None),
        )
    }
    assert rounding_notes(diffs) == [
        "1 tensor(s) equal the base rounded through BF16 (saved as BF16): not a change (lm_head. 1)",
        (
            "3 tensor(s) equal the base rounded through BF16 (saved as F32 after a BF16 run): not a change "
            "(language_model. 2, model.visual. 1)"
        ),
    ]


def test_a_nan_that_rounding_by_bits_would_turn_into_zero_is_reported(tmp_path: Path) -> None:
    base = _weights(dtype=torch.bfloat16)
    saved = base.float() + 0.01
    saved.view(torch.int32)[7] = -1  # 0xFFFFFFFF: a NaN that becomes -0.0 if rounded by arithmetic alone
    diff = _compare(tmp_path, base, saved)
    assert (diff.state, diff.nonfinite) == ("changed", True)


def test_a_sample_is_decided_by_compares_own_rules() -> None:
    """hubsync.sample decides a window of values with the same Scan: roundings included."""
    base = _weights(2000).numpy()
    scan = Scan("F32", "F16", "F16")
    scan.feed(base, torch.from_numpy(base).to(torch.bfloat16).float().numpy())
    assert scan.decide() == ("roundtrip", "BF16")
    moved = Scan("F32", "F16", "F16")
    moved.feed(base, base.astype("float32") + 0.01)
    assert moved.decide() == ("changed", None) and moved.delta.max_abs == pytest.approx(0.01, rel=0.1)
