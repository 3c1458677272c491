"""Tests for hubsync.tensors: every input is a real file written by safetensors or torch.save."""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hubsync import tensors as T
from hubsync.errors import BuildError, FinetuneError
from hubsync.prefill import Place, Prefill

# A safetensors file and the tensors written into it.
Shard = tuple[Path, dict[str, "torch.Tensor"]]


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=g).to(torch.float16),
        "model.layers.0.input_layernorm.weight": torch.randn(8, generator=g),
        "model.rotary.inv_freq": torch.arange(5, dtype=torch.int64),
        "model.mask": torch.tensor([True, False, True]),
        "lm_head.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
    }


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape) and _bits(a) == _bits(b)


@pytest.fixture
def shard(tmp_path: Path) -> Shard:
    tensors = _tensors()
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "héllo"})
    return path, tensors


def _sharded(folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A two-shard checkpoint with its index, as transformers writes it."""
    tensors = _tensors(seed)
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    weight_map = {}
    for shard_name, members in parts.items():
        save_file({n: tensors[n] for n in members}, str(folder / shard_name), metadata={"format": "pt"})
        weight_map.update({n: shard_name for n in members})
    index = {"metadata": {"total_size": 123}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors


# ------------------------------------------------------------------------------------------------ headers


def test_header_of_a_file_written_by_safetensors(shard: Shard) -> None:
    path, tensors = shard
    header = T.read_safetensors_header(path)

    assert set(header.tensors) == set(tensors)
    assert header.metadata == {"format": "pt", "note": "héllo"}
    assert header.file_size == path.stat().st_size
    assert len(header.raw) == header.header_size and header.header_size % 8 == 0
    offsets = [info.data_offsets for info in header.tensors.values()]
    assert offsets == sorted(offsets), "tensors are listed in file order"
    for name, info in header.tensors.items():
        assert info.dtype == T.st_dtype(tensors[name].dtype)
        assert info.shape == tuple(tensors[name].shape)
        assert info.nbytes == tensors[name].numel() * tensors[name].element_size()
        assert info.numel == tensors[name].numel()
        start, end = info.absolute_range
        with open(path, "rb") as f:
            f.seek(start)
            assert f.read(end - start) == _bits(tensors[name])


def test_truncated_shard_is_reported_with_sizes(tmp_path: Path) -> None:
    path = tmp_path / "model-00002-of-00003.safetensors"
    save_file({"w": torch.zeros(64)}, str(path))
    full = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(full - 10)

    with pytest.raises(FinetuneError) as info:
        T.read_safetensors_header(path)
    assert str(info.value) == (
        f"model-00002-of-00003.safetensors is truncated: expected {full} bytes, found {full - 10}; "
        "re-download or re-save it"
    )


def _raw_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "expected"),
    [
        (b"{not json", b"", "has a corrupt header"),
        (b"[1, 2]", b"", "has a corrupt header (not a JSON object)"),
        (b'{"__metadata__": {"a": 1}}', b"", "__metadata__ must map strings to strings"),
        (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', b"\0" * 4, "needs 8"),
        (b'{"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8, "unsupported dtype"),
        (
            b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
            b' "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}',
            b"\0" * 12,
            "must be contiguous",
        ),
        (
            b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
            b' "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
            b"\0" * 4,
            "appears twice",
        ),
        (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 12, "after the last"),
    ],
)
def test_corrupt_headers_are_refused(tmp_path: Path, header: bytes, data: bytes, expected: str) -> None:
    path = _raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(FinetuneError, match="re-download or re-save it|re-save it") as info:
        T.read_safetensors_header(path)
    assert str(info.value).startswith("bad.safetensors")
    assert expected in str(info.value)


def test_absurd_length_prefix_and_lfs_pointer(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(FinetuneError, match="length prefix says .* more than safetensors allows"):
        T.read_safetensors_header(garbage)

    pointer = tmp_path / "pointer.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(FinetuneError, match="Git LFS pointer.*git lfs pull"):
        T.read_safetensors_header(pointer)


def test_error_class_can_be_chosen(tmp_path: Path) -> None:
    path = _raw_file(tmp_path / "out.safetensors", b"{oops")
    with pytest.raises(BuildError):
        T.read_safetensors_header(path, error=BuildError)


# ------------------------------------------------------------------------------------------------ checkpoints


def test_index_driven_listing_reports_stray_shards(tmp_path: Path) -> None:
    tensors = _sharded(tmp_path)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "consolidated.safetensors"))
    save_file({"lora_A": torch.zeros(2)}, str(tmp_path / "adapter_model.safetensors"))

    ckpt = T.list_checkpoint(tmp_path)

    assert ckpt.format == "safetensors"
    assert [p.name for p in ckpt.files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert [p.name for p in ckpt.stray_files] == ["consolidated.safetensors"]
    assert ckpt.index_metadata == {"total_size": 123}
    assert set(ckpt.tensors) == set(tensors)
    for name, ref in ckpt.tensors.items():
        assert isinstance(ref, T.TensorInfo)
        assert _bitwise_equal(T.load_tensor(ref), tensors[name])
    weight_map = T.read_index(tmp_path / "model.safetensors.index.json")
    assert all(ckpt.tensors[name].file.name == shard_name for name, shard_name in weight_map.items())


def test_index_naming_a_missing_shard_is_an_error(tmp_path: Path) -> None:
    _sharded(tmp_path)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FinetuneError, match="names shard model-00002-of-00002.safetensors, which is not in"):
        T.list_checkpoint(tmp_path)


def test_index_naming_a_tensor_its_shard_lacks_is_an_error(tmp_path: Path) -> None:
    _sharded(tmp_path)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(FinetuneError, match="maps ghost.weight to model-00001-of-00002.safetensors, which"):
        T.list_checkpoint(tmp_path)


def test_index_refuses_shard_paths_outside_the_folder(tmp_path: Path) -> None:
    index = {"weight_map": {"w": "../evil.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FinetuneError, match="not a plain file name"):
        T.list_checkpoint(tmp_path)


def test_single_file_checkpoints(tmp_path: Path) -> None:
    save_file({"w": torch.ones(3)}, str(tmp_path / "weights.safetensors"))
    ckpt = T.list_checkpoint(tmp_path)
    assert [p.name for p in ckpt.files] == ["weights.safetensors"] and ckpt.stray_files == ()

    save_file({"w": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    ckpt = T.list_checkpoint(tmp_path)
    assert [p.name for p in ckpt.files] == ["model.safetensors"]
    assert [p.name for p in ckpt.stray_files] == ["weights.safetensors"]

    (tmp_path / "model.safetensors").unlink()
    save_file({"w": torch.ones(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(FinetuneError, match="several safetensors files .* no model.safetensors.index.json"):
        T.list_checkpoint(tmp_path)


def test_empty_folder_says_what_was_expected(tmp_path: Path) -> None:
    save_file({"lora_A": torch.zeros(2)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(FinetuneError, match="no model weights in .*model.safetensors.index.json"):
        T.list_checkpoint(tmp_path)


def test_bin_checkpoint_is_listed_and_loaded(tmp_path: Path) -> None:
    tensors = _tensors(1)
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    ckpt = T.list_checkpoint(tmp_path)
    assert ckpt.format == "bin" and set(ckpt.tensors) == set(tensors)
    for name, ref in ckpt.tensors.items():
        assert isinstance(ref, T.BinTensorRef)
        assert (ref.dtype, ref.shape) == (T.st_dtype(tensors[name].dtype), tuple(tensors[name].shape))
        assert _bitwise_equal(T.load_tensor(ref), tensors[name])


def test_sharded_bin_checkpoint(tmp_path: Path) -> None:
    tensors = _tensors(2)
    names = sorted(tensors)
    weight_map = {}
    for i, members in enumerate((names[:2], names[2:]), start=1):
        shard_name = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({n: tensors[n] for n in members}, tmp_path / shard_name)
        weight_map.update({n: shard_name for n in members})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))

    ckpt = T.list_checkpoint(tmp_path)
    assert ckpt.format == "bin" and len(ckpt.files) == 2
    for name, ref in ckpt.tensors.items():
        assert ref.file.name == weight_map[name]
        assert _bitwise_equal(T.load_tensor(ref), tensors[name])


class TrainingState:
    """A custom class: loading it needs pickle to run code, which weights_only=True refuses."""

    def __init__(self) -> None:
        self.step = 7


def test_bin_that_needs_arbitrary_pickle_is_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2), "state": TrainingState()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FinetuneError, match="pytorch_model.bin cannot be loaded safely.*convert it to"):
        T.list_checkpoint(tmp_path)


def test_damaged_bin_is_refused(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(FinetuneError, match="not a readable PyTorch checkpoint"):
        T.list_checkpoint(tmp_path)


# ------------------------------------------------------------------------------------------------ loading


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.bool, torch.float8_e4m3fn]
)
def test_load_tensor_is_exact(tmp_path: Path, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    values = (torch.randn(7, 5, generator=g) * 100).to(dtype)
    path = tmp_path / "t.safetensors"
    odd = torch.ones(3, dtype=torch.uint8)  # puts the tensors after it at unaligned offsets
    save_file({"odd": odd, "t": values, "scalar": torch.tensor(2.5)}, str(path))
    header = T.read_safetensors_header(path)

    assert _bitwise_equal(T.load_tensor(header.tensors["t"]), values)
    assert T.load_tensor(header.tensors["scalar"]).shape == ()


def test_load_tensor_reads_only_its_range(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(4), "b": torch.ones(4)}, str(path))
    header = T.read_safetensors_header(path)
    # Destroy a's bytes: loading b must not notice.
    with open(path, "r+b") as f:
        f.seek(header.tensors["a"].absolute_range[0])
        f.write(b"\xff" * 16)
    assert torch.equal(T.load_tensor(header.tensors["b"]), torch.ones(4))


def test_tensor_bytes_equal(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(300, generator=g)
    save_file({"w": w, "v": w.clone()}, str(tmp_path / "a.safetensors"))
    changed = w.clone()
    changed[-1] += 1
    save_file({"w": changed}, str(tmp_path / "b.safetensors"))
    a = T.read_safetensors_header(tmp_path / "a.safetensors").tensors
    b = T.read_safetensors_header(tmp_path / "b.safetensors").tensors

    assert T.tensor_bytes_equal(a["w"], a["v"], chunk=64)
    assert T.tensor_bytes_equal(a["w"], a["w"])
    assert not T.tensor_bytes_equal(a["w"], b["w"], chunk=64)  # differs in the short last chunk
    assert not T.tensor_bytes_equal(a["w"], b["w"])


def test_same_after_roundtrip(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    base = torch.randn(64, 32, generator=g).to(torch.float16)
    path = tmp_path / "base.safetensors"
    save_file({"w": base}, str(path))
    info = T.read_safetensors_header(path).tensors["w"]

    trained_in_fp32 = base.to(torch.float32)
    assert T.same_after_roundtrip(info, trained_in_fp32)
    assert T.same_after_roundtrip(info, base.clone())
    nudged = trained_in_fp32.clone()
    nudged[3, 4] += 0.01
    assert not T.same_after_roundtrip(info, nudged)
    assert not T.same_after_roundtrip(info, trained_in_fp32[:10])


def test_nan_and_inf_detection() -> None:
    clean = torch.randn(100, generator=torch.Generator().manual_seed(6))
    assert not T.has_nan_or_inf(clean)
    assert not T.has_nan_or_inf(torch.arange(10))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            t = clean.to(dtype)
            t[57] = bad
            assert T.has_nan_or_inf(t, chunk=16), (bad, dtype)
    fp8 = clean.to(torch.float8_e4m3fn)
    assert not T.has_nan_or_inf(fp8)
    fp8[3] = float("nan")
    assert T.has_nan_or_inf(fp8)


def test_delta_stats() -> None:
    base = torch.tensor([3.0, 4.0]).to(torch.bfloat16)
    tuned = torch.tensor([3.0, 4.5]).to(torch.bfloat16)
    max_abs, rel = T.delta_stats(base, tuned, chunk=1)
    assert max_abs == pytest.approx(0.5) and rel == pytest.approx(0.1)
    assert T.delta_stats(torch.zeros(3), torch.zeros(3)) == (0.0, 0.0)
    assert T.delta_stats(torch.zeros(3), torch.ones(3))[1] == float("inf")


# ------------------------------------------------------------------------------------------------ writing


def _entries_from(header: T.SafetensorsHeader) -> list[T.ShardEntry]:
    return [T.ShardEntry(i.name, i.dtype, i.shape, i) for i in header.tensors.values()]


def test_write_shard_with_template_is_byte_identical(tmp_path: Path, shard: Shard) -> None:
    path, _ = shard
    header = T.read_safetensors_header(path)
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()

    digest = T.write_shard(out, _entries_from(header), header.metadata, template=header)

    assert out.read_bytes() == path.read_bytes()
    assert digest == T.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_write_shard_with_one_tensor_replaced(tmp_path: Path, shard: Shard) -> None:
    path, tensors = shard
    header = T.read_safetensors_header(path)
    tuned_name = "model.layers.0.mlp.up_proj.weight"
    tuned = tensors[tuned_name] + 1
    calls = []

    def produce() -> torch.Tensor:
        calls.append(tuned_name)
        return tuned.clone()

    entries = [
        T.ShardEntry(e.name, e.dtype, e.shape, produce) if e.name == tuned_name else e
        for e in _entries_from(header)
    ]
    out = tmp_path / "out.safetensors"
    digest = T.write_shard(out, entries, header.metadata, template=header)

    assert calls == [tuned_name]
    assert digest == T.sha256_file(out)
    base_bytes, new_bytes = path.read_bytes(), out.read_bytes()
    assert len(base_bytes) == len(new_bytes)
    start, end = header.tensors[tuned_name].absolute_range
    assert new_bytes[:start] == base_bytes[:start] and new_bytes[end:] == base_bytes[end:]
    assert new_bytes[start:end] != base_bytes[start:end]
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == header.metadata
        for name in tensors:
            expected = tuned if name == tuned_name else tensors[name]
            assert _bitwise_equal(f.get_tensor(name), expected)


def test_write_shard_with_a_dtype_change_builds_a_new_header(tmp_path: Path, shard: Shard) -> None:
    path, tensors = shard
    header = T.read_safetensors_header(path)
    changed = "model.layers.0.input_layernorm.weight"  # F32 in the base, written as BF16
    as_bf16 = tensors[changed].to(torch.bfloat16)
    entries = [
        T.ShardEntry(e.name, "BF16", e.shape, lambda: as_bf16.clone()) if e.name == changed else e
        for e in _entries_from(header)
    ]
    metadata = {"format": "pt", "b": "2", "a": "1"}
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"

    digest = T.write_shard(first, entries, metadata, template=header)
    assert T.write_shard(second, entries, metadata, template=header) == digest, "deterministic"

    raw = first.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    assert size % 8 == 0
    assert raw[8 : 8 + size].startswith(b'{"__metadata__":{"a":"1","b":"2","format":"pt"},')
    written = T.read_safetensors_header(first)
    assert list(written.tensors) == list(header.tensors), "entry order is kept"
    with safe_open(str(first), framework="pt") as f:
        assert f.metadata() == metadata
        for name in tensors:
            assert _bitwise_equal(f.get_tensor(name), as_bf16 if name == changed else tensors[name])


def test_template_not_reused_when_metadata_differs(tmp_path: Path, shard: Shard) -> None:
    path, _ = shard
    header = T.read_safetensors_header(path)
    entries = _entries_from(header)
    assert T.shard_header(entries, header.metadata, header) == header.raw
    assert T.shard_header(entries, {"format": "pt"}, header) != header.raw
    out = tmp_path / "o.safetensors"
    T.write_shard(out, entries, None, template=header)
    assert T.read_safetensors_header(out).metadata is None


def test_write_shard_refuses_a_source_of_the_wrong_shape(tmp_path: Path) -> None:
    entry = T.ShardEntry("w", "F32", (2, 2), lambda: torch.zeros(4))
    with pytest.raises(ValueError, match="source returned torch.float32 \\[4\\]"):
        T.write_shard(tmp_path / "o.safetensors", [entry], None)
    assert not (tmp_path / "o.safetensors").exists(), "a failed write leaves no partial shard"


def test_write_shard_reports_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(T, "_write_all", full)
    dest = tmp_path / "model-00001-of-00002.safetensors"
    expected = r"no space left on device writing .*model-00001-of-00002.safetensors: free \d+\.\d GB or set"
    with pytest.raises(BuildError, match=expected + r" output.dir elsewhere"):
        T.write_shard(dest, [T.ShardEntry("w", "F32", (4,), lambda: torch.zeros(4))], None)
    assert not dest.exists()


def test_write_shard_never_writes_through_a_hardlink(tmp_path: Path, shard: Shard) -> None:
    path, _ = shard
    before = path.read_bytes()
    out = tmp_path / "staged.safetensors"
    assert T.copy_file(path, out, mode="hardlink") == "hardlink"
    T.write_shard(out, [T.ShardEntry("w", "F32", (4,), lambda: torch.zeros(4))], None)
    assert path.read_bytes() == before, "the base (e.g. a cache blob) is untouched"


def _rss_peak_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux peak-RSS reset")
def test_write_shard_streams_with_bounded_memory(tmp_path: Path) -> None:
    # Five 40 MiB F32 tensors: a 200 MiB shard. Above glibc's 32 MiB mmap ceiling, a tensor's memory goes back
    # to the OS when freed, as a real model's big matrices do; smaller ones would measure heap reuse instead.
    n, numel = 5, 10 * 1024 * 1024
    base_path = tmp_path / "base.safetensors"
    g = torch.Generator().manual_seed(7)
    save_file({f"t{i}": torch.randn(numel, generator=g) for i in range(n)}, str(base_path))
    gc.collect()
    header = T.read_safetensors_header(base_path)

    def tuned(i: int) -> torch.Tensor:
        return torch.full((numel,), float(i))

    # Half raw copies, half produced tensors, alternating.
    entries = [
        T.ShardEntry(e.name, e.dtype, e.shape, e.source if i % 2 else (lambda i=i: tuned(i)))
        for i, e in enumerate(_entries_from(header))
    ]
    tuned(0)  # torch's first fill starts its thread pool: not write_shard's memory
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    start = _rss_kb()
    T.write_shard(tmp_path / "out.safetensors", entries, None, template=header)
    growth_mib = (_rss_peak_kb() - start) / 1024
    print(f"write_shard peak RSS growth: {growth_mib:.1f} MiB")

    tensor_mib = numel * 4 / 2**20
    # One produced tensor plus the 16 MiB copy buffer, with 16 MiB of slack; far below the 200 MiB written.
    assert growth_mib < tensor_mib + 16 + 16, f"peak RSS grew by {growth_mib:.0f} MiB"
    with safe_open(str(tmp_path / "out.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("t4"), tuned(4))


# ------------------------------------------------------------------------------------------------ files


def test_copy_file_copies_and_hardlinks(tmp_path: Path, shard: Shard) -> None:
    path, _ = shard
    copied = tmp_path / "copied.safetensors"
    (tmp_path / "copied.safetensors").write_bytes(b"old content that is longer than nothing")
    assert T.copy_file(path, copied) == "copy"
    assert copied.read_bytes() == path.read_bytes()
    assert copied.stat().st_ino != path.stat().st_ino

    linked = tmp_path / "linked.safetensors"
    assert T.copy_file(path, linked, mode="hardlink") == "hardlink"
    assert linked.stat().st_ino == path.stat().st_ino
    assert not list(tmp_path.glob(".*hubsync-link"))


def test_copy_file_falls_back_to_a_copy_across_devices(
    tmp_path: Path, shard: Shard, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = shard

    def cross_device(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(T.os, "link", cross_device)
    out = tmp_path / "out.safetensors"
    assert T.copy_file(path, out, mode="hardlink") == "copy"
    assert out.read_bytes() == path.read_bytes()


def test_sha256_file(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 + 5)
    (tmp_path / "f").write_bytes(data)
    assert T.sha256_file(tmp_path / "f", chunk=1024) == hashlib.sha256(data).hexdigest()


def test_dtype_helpers() -> None:
    assert T.torch_dtype("BF16") is torch.bfloat16
    assert T.torch_dtype("F8_E4M3") is torch.float8_e4m3fn
    assert T.st_dtype(torch.float16) == "F16" and T.st_dtype(torch.bool) == "BOOL"
    assert [T.dtype_from_name(n) for n in ("bfloat16", "float16", "float32", "torch.bfloat16")] == [
        "BF16",
        "F16",
        "F32",
        "BF16",
    ]
    with pytest.raises(ValueError, match="use one of bfloat16, float16, float32"):
        T.dtype_from_name("int4")
    with pytest.raises(ValueError):
        T.torch_dtype("F4")
    with pytest.raises(ValueError):
        T.ShardEntry("w", "F32", (2,), T.TensorInfo("w", "F16", (2,), Path("x"), (0, 4), 8, 4))


def test_importing_tensors_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, hubsync.tensors; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_copy_file_fallbacks_continue_where_the_last_method_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(300_000)
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(data)
    real_copy_file_range = os.copy_file_range
    calls = {"cfr": 0}

    def copy_once_then_refuse(fd_in: int, fd_out: int, count: int, *args: object) -> int:
        calls["cfr"] += 1
        if calls["cfr"] == 1:
            return real_copy_file_range(fd_in, fd_out, 1000)
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    def no_sendfile(*args: object) -> int:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(T.os, "copy_file_range", copy_once_then_refuse)
    monkeypatch.setattr(T.os, "sendfile", no_sendfile)
    assert T.copy_file(src, dst) == "copy"
    assert dst.read_bytes() == data


def test_hardlinking_a_file_onto_itself_leaves_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights")
    assert T.copy_file(path, path, mode="hardlink") == "hardlink"
    assert path.read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


# ------------------------------------------------------------------------------------------------ prefilled


def _prefilled(tmp_path: Path, shard: Shard, name: str, tuned: torch.Tensor) -> tuple[Prefill, Path]:
    """A staging shard into which `name`'s new bytes were written at its offset, as compare does."""
    path, _ = shard
    info = T.read_safetensors_header(path).tensors[name]
    staged = tmp_path / "staging" / path.name
    staged.parent.mkdir()
    place = Place(staged, info.absolute_range[0], info.nbytes, path.stat().st_size)
    kept = Prefill(staged.parent, {name: place})
    entry = kept.reserve(name, f"ft.{name}", info.dtype, info.nbytes)
    assert entry is not None and kept.reserve(name, "another source", info.dtype, info.nbytes) is None
    data = _bits(tuned)
    entry.write(data[:10])  # in pieces, as compare writes chunk by chunk
    entry.write(data[10:])
    entry.keep()
    return kept, staged


def test_a_shard_finished_in_place_equals_one_written_anew(tmp_path: Path, shard: Shard) -> None:
    path, tensors = shard
    header = T.read_safetensors_header(path)
    name = "model.layers.0.mlp.up_proj.weight"
    tuned = tensors[name] * 3
    kept, staged = _prefilled(tmp_path, shard, name, tuned)
    held = kept.held(f"ft.{name}", header.tensors[name].dtype)
    assert held is not None and T.read_safetensors_header(path).tensors[name].absolute_range[0] == held.offset
    inode = staged.stat().st_ino

    in_place = [
        T.ShardEntry(e.name, e.dtype, e.shape, held if e.name == name else e.source)
        for e in _entries_from(header)
    ]
    anew = [
        T.ShardEntry(e.name, e.dtype, e.shape, (lambda: tuned) if e.name == name else e.source)
        for e in _entries_from(header)
    ]
    digest = T.write_shard(staged, in_place, header.metadata, template=header)
    reference = tmp_path / "reference.safetensors"
    assert T.write_shard(reference, anew, header.metadata, template=header) == digest == T.sha256_file(staged)
    assert staged.read_bytes() == reference.read_bytes()
    assert staged.stat().st_ino == inode, "finished in place: the bytes compare wrote were not written again"
    kept.close()


def test_held_bytes_in_another_layout_are_copied_into_a_new_file(tmp_path: Path, shard: Shard) -> None:
    path, tensors = shard
    header = T.read_safetensors_header(path)
    name = "model.layers.0.mlp.up_proj.weight"
    tuned = tensors[name] * 3
    kept, staged = _prefilled(tmp_path, shard, name, tuned)
    held = kept.held(f"ft.{name}", "F16")
    assert held is not None
    # one more tensor in the shard: new offsets, so the held bytes must be copied, not taken where they lie
    entries = [T.ShardEntry("extra", "F32", (3,), lambda: torch.ones(3))] + [
        T.ShardEntry(e.name, e.dtype, e.shape, held if e.name == name else e.source)
        for e in _entries_from(header)
    ]
    T.write_shard(staged, entries, header.metadata, template=header)
    with safe_open(str(staged), framework="pt") as f:
        assert _bitwise_equal(f.get_tensor(name), tuned)
        assert _bitwise_equal(f.get_tensor("lm_head.weight"), tensors["lm_head.weight"])
    kept.close()


def test_copy_hashed_and_write_new_hash_what_they_write(tmp_path: Path, shard: Shard) -> None:
    path, _ = shard
    with T.Syncer() as syncer:
        sha = T.copy_hashed(path, tmp_path / "copy.safetensors", syncer=syncer)
        small = T.write_new(tmp_path / "config.json", b'{"a": 1}\n', syncer=syncer)
        syncer.wait()
    assert (tmp_path / "copy.safetensors").read_bytes() == path.read_bytes()
    assert sha == T.sha256_file(path) and small == hashlib.sha256(b'{"a": 1}\n').hexdigest()
