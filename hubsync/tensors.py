"""Tensor I/O: read safetensors headers, find a checkpoint's weights, load one tensor, stream shards out.

Everything here works on byte ranges, never on whole files or state dicts, so memory stays at about one
tensor whatever the model size. Rewritten shards copy untuned tensors as raw bytes, which is what keeps them
identical to the base; only tensors produced by a callable go through torch.

torch is imported inside the functions that need it: `hubsync --help` and `hubsync validate` import this
module through the CLI and must stay fast.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import stat
import struct
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, Union

from hubsync import chunks
from hubsync.errors import BuildError, FinetuneError, HubsyncError
from hubsync.fsio import fsync_dir
from hubsync.prefill import HeldBytes

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = [
    "BinTensorRef",
    "ComputedTensor",
    "Checkpoint",
    "SafetensorsHeader",
    "ShardEntry",
    "TensorInfo",
    "TensorRef",
    "Syncer",
    "build_header",
    "copy_file",
    "copy_hashed",
    "delta_stats",
    "dtype_from_name",
    "dtype_nbytes",
    "has_nan_or_inf",
    "iter_chunks",
    "list_checkpoint",
    "list_remote_checkpoint",
    "load_tensor",
    "parse_safetensors_header",
    "read_index",
    "read_safetensors_header",
    "same_after_roundtrip",
    "sha256_file",
    "shard_header",
    "st_dtype",
    "template_matches",
    "tensor_bytes_equal",
    "torch_dtype",
    "write_new",
    "write_shard",
]

# safetensors refuses headers above this size (MAX_HEADER_SIZE in the Rust crate); a larger length prefix
# means the first 8 bytes are not a length at all.
MAX_HEADER_SIZE = 100_000_000
COPY_CHUNK = 16 * 1024 * 1024
HASH_CHUNK = 8 * 1024 * 1024
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
_ADAPTER_PREFIX = "adapter_model"
_LFS_POINTER_START = b"version https://git-lfs"

# Bits per element of every dtype safetensors 0.8 knows. Sub-byte dtypes can be copied as raw bytes but not
# loaded into torch (their torch counterparts pack several values per element and change the shape).
_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "C64": 64,
}

_ST_TO_TORCH = chunks.TORCH_NAMES
_TORCH_TO_ST: dict[str, str] = {v: k for k, v in _ST_TO_TORCH.items()}

_DTYPE_ALIASES: dict[str, str] = {
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "float32": "F32",
    "fp32": "F32",
    "float": "F32",
}

ErrorType = type[HubsyncError]
HeaderReader = Callable[..., "SafetensorsHeader"]  # (path, *, error) -> SafetensorsHeader


# ------------------------------------------------------------------------------------------------ dtypes


def dtype_nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Bytes that a tensor of `dtype` and `shape` takes in a safetensors file."""
    bits = _DTYPE_BITS.get(dtype)
    if bits is None:
        raise ValueError(f"unknown safetensors dtype {dtype!r}; known: {', '.join(sorted(_DTYPE_BITS))}")
    total_bits = math.prod(shape) * bits
    if total_bits % 8:
        raise ValueError(f"{dtype} tensor of shape {list(shape)} does not end on a byte boundary")
    return total_bits // 8


def torch_dtype(st_dtype: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype string ("BF16" -> torch.bfloat16)."""
    import torch

    name = _ST_TO_TORCH.get(st_dtype)
    found = getattr(torch, name, None) if name else None
    if not isinstance(found, torch.dtype):
        raise ValueError(f"safetensors dtype {st_dtype!r} has no torch equivalent that hubsync can load")
    return found


def st_dtype(dtype: torch.dtype) -> str:
    """The safetensors dtype string for a torch dtype (torch.bfloat16 -> "BF16")."""
    name = str(dtype).removeprefix("torch.")
    if name not in _TORCH_TO_ST:
        raise ValueError(f"torch dtype {dtype} cannot be stored in safetensors")
    return _TORCH_TO_ST[name]


def dtype_from_name(name: str) -> str:
    """The safetensors dtype for a dtype as people write it in a manifest or config ("bfloat16", "fp16")."""
    key = name.strip().lower().removeprefix("torch.")
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {name!r}; use one of bfloat16, float16, float32")
    return _DTYPE_ALIASES[key]


# ------------------------------------------------------------------------------------------------ headers


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file: enough to copy or load it reading nothing else."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    data_offsets: tuple[int, int]
    header_size: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def absolute_range(self) -> tuple[int, int]:
        """Byte range in the file; data offsets count from the end of the 8-byte length and the header."""
        base = 8 + self.header_size
        return base + self.data_offsets[0], base + self.data_offsets[1]


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed, validated safetensors header. `raw` is the header exactly as stored (padding included), so a
    rewritten shard can reuse it byte for byte."""

    file: Path
    tensors: dict[str, TensorInfo]  # in file (offset) order
    metadata: dict[str, str] | None
    header_size: int
    raw: bytes

    @property
    def data_size(self) -> int:
        return max((t.data_offsets[1] for t in self.tensors.values()), default=0)

    @property
    def file_size(self) -> int:
        return 8 + self.header_size + self.data_size


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys; a header naming a tensor twice is ambiguous, refuse it.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_safetensors_header(
    path: str | os.PathLike[str], *, error: ErrorType = FinetuneError
) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file, reading nothing past it.

    Checks what safetensors itself checks when it opens a file (header length, JSON object, string metadata,
    contiguous offsets that match dtype and shape, data ending exactly at the end of the file), so a file that
    passes here also opens there. `error` is the class raised: FinetuneError for a fine-tune, BuildError or
    BaseResolutionError when the caller reads a base or an output.
    """
    path = Path(path)
    size, header_size, raw = _read_header_bytes(path, error)
    return parse_safetensors_header(path, size, raw, error=error)


def parse_safetensors_header(
    path: Path, size: int, raw: bytes, *, error: ErrorType = FinetuneError
) -> SafetensorsHeader:
    """A header read by other means (e.g. an HTTP range request of a file `size` bytes long), validated exactly as
    `read_safetensors_header` validates one read from disk. `path` is where the file is, or would be."""
    header_size = len(raw)
    name = path.name
    try:
        parsed = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as err:
        raise error(f"{name} has a corrupt header ({err}): re-download or re-save it") from err
    if not isinstance(parsed, dict):
        raise error(f"{name} has a corrupt header (not a JSON object): re-download or re-save it")
    metadata = parsed.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise error(f"{name} has a corrupt header (__metadata__ must map strings to strings): re-save it")
    infos = [_tensor_info(path, tname, entry, header_size, error) for tname, entry in parsed.items()]
    # Physical order, which is also the order safetensors writes the JSON in. A stable sort keeps the JSON
    # order among zero-size tensors that share an offset.
    infos.sort(key=lambda t: t.data_offsets)
    _check_data_layout(name, infos, 8 + header_size, size, error)
    return SafetensorsHeader(
        file=path,
        tensors={info.name: info for info in infos},
        metadata=metadata,
        header_size=header_size,
        raw=raw,
    )


def _read_header_bytes(path: Path, error: ErrorType) -> tuple[int, int, bytes]:
    """(file size, header size, header bytes), with the length prefix checked against the file."""
    name = path.name
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise error(
                    f"{name} is not a safetensors file: it is {size} bytes long; re-download or re-save it"
                )
            if prefix + f.read(len(_LFS_POINTER_START) - 8) == _LFS_POINTER_START:
                raise error(
                    f"{name} is a Git LFS pointer, not the weights: run `git lfs pull` in {path.parent}"
                )
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > MAX_HEADER_SIZE:
                raise error(
                    f"{name} has a corrupt header: its length prefix says {header_size} bytes, more than "
                    f"safetensors allows ({MAX_HEADER_SIZE}); re-download or re-save it"
                )
            if 8 + header_size > size:
                raise error(
                    f"{name} is truncated: expected at least {8 + header_size} bytes, found {size}; "
                    "re-download or re-save it"
                )
            f.seek(8)
            return size, header_size, f.read(header_size)
    except FileNotFoundError as err:
        raise error(f"{path} does not exist: check the path") from err
    except IsADirectoryError as err:
        raise error(f"{path} is a folder, not a safetensors file: point at the weights file") from err
    except OSError as err:
        raise error(f"cannot read {path}: {err.strerror or err}") from err


def _check_data_layout(
    name: str, infos: list[TensorInfo], data_start: int, size: int, error: ErrorType
) -> None:
    """Tensors must be contiguous from the end of the header and end exactly at the end of the file."""
    position = 0
    for info in infos:
        if info.data_offsets[0] != position:
            raise error(
                f"{name} has a corrupt header: tensor {info.name} starts at data offset "
                f"{info.data_offsets[0]} where {position} was expected (tensors must be contiguous); "
                "re-download or re-save it"
            )
        position = info.data_offsets[1]
    expected = data_start + position
    if size < expected:
        raise error(
            f"{name} is truncated: expected {expected} bytes, found {size}; re-download or re-save it"
        )
    if size > expected:
        raise error(
            f"{name} is corrupt: expected {expected} bytes, found {size} (data after the last tensor); "
            "re-download or re-save it"
        )


def _tensor_info(path: Path, tname: str, entry: object, header_size: int, error: ErrorType) -> TensorInfo:
    where = f"{path.name} has a corrupt header: tensor {tname}"
    if not isinstance(entry, dict):
        raise error(f"{where} is not an object: re-download or re-save it")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPE_BITS:
        raise error(
            f"{path.name}: tensor {tname} has unsupported dtype {dtype!r}: re-save it as BF16, F16 or F32"
        )
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise error(f"{where} has an invalid shape {shape!r}: re-download or re-save it")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise error(f"{where} has invalid data_offsets {offsets!r}: re-download or re-save it")
    try:
        nbytes = dtype_nbytes(dtype, shape)
    except ValueError as err:
        raise error(f"{where}: {err}: re-download or re-save it") from err
    if offsets[1] - offsets[0] != nbytes:
        raise error(
            f"{where} spans {offsets[1] - offsets[0]} bytes but {dtype} {shape} needs {nbytes}: "
            "re-download or re-save it"
        )
    return TensorInfo(
        name=tname,
        dtype=dtype,
        shape=tuple(shape),
        file=path,
        data_offsets=(offsets[0], offsets[1]),
        header_size=header_size,
        nbytes=nbytes,
    )


# ----------------------------------------------------------------------------------------------- checkpoints


@dataclass(frozen=True)
class BinTensorRef:
    """A tensor inside a pickled PyTorch checkpoint. Its bytes have no fixed place in the file, so loading it
    means loading (memory-mapping) the whole shard; `load_tensor` keeps one such shard open at a time."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ComputedTensor:
    """A tensor that exists only as a recipe (e.g. a LoRA merge W + s·B·A), computed when loaded.

    `compute` must return a tensor of `dtype` and `shape`; it is called once per load and its result is not
    kept, so memory stays at about the tensors the recipe itself needs."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    compute: Callable[[], torch.Tensor]
    file: Path = Path("<computed>")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return dtype_nbytes(self.dtype, self.shape)


TensorRef = Union[TensorInfo, BinTensorRef, ComputedTensor]


@dataclass(frozen=True)
class Checkpoint:
    """The weights of a model folder: which files, which tensors where, and what was found but not used."""

    folder: Path
    format: Literal["safetensors", "bin"]
    files: tuple[Path, ...]
    tensors: dict[str, TensorRef]
    stray_files: tuple[Path, ...] = ()
    index_file: Path | None = None
    index_metadata: dict[str, Any] | None = None
    headers: dict[Path, SafetensorsHeader] = field(default_factory=dict)  # safetensors only


def _read_index_document(path: Path, error: ErrorType) -> tuple[dict[str, str], dict[str, Any] | None]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise error(f"{path} does not exist: check the path") from err
    except (UnicodeDecodeError, ValueError) as err:
        raise error(f"{path.name} is not valid JSON ({err}): re-download it or regenerate the index") from err
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise error(f"{path.name} has no valid weight_map (tensor name -> shard file): regenerate the index")
    for shard in set(weight_map.values()):
        # Shard names come from a downloaded file: never let one point outside the folder.
        if not shard or shard != Path(shard).name or shard in (".", ".."):
            raise error(
                f"{path.name} names shard {shard!r}, which is not a plain file name: regenerate the index"
            )
    metadata = doc.get("metadata")
    return weight_map, metadata if isinstance(metadata, dict) else None


def read_index(path: str | os.PathLike[str], *, error: ErrorType = FinetuneError) -> dict[str, str]:
    """The weight_map (tensor name -> shard file name) of a sharded checkpoint's index JSON."""
    return _read_index_document(Path(path), error)[0]


def _weight_files(folder: Path, suffix: str) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.name.endswith(suffix) and not p.name.startswith(_ADAPTER_PREFIX) and p.is_file()
    )


def list_checkpoint(folder: str | os.PathLike[str], *, error: ErrorType = FinetuneError) -> Checkpoint:
    """Find the weights in a model folder. The first that exists wins: a safetensors index, a single
    `model.safetensors`, any other single `*.safetensors`, a `pytorch_model.bin` index, `pytorch_model.bin`.

    Safetensors files not used are listed in `stray_files` and never read; adapter_model.* files are ignored
    (adapters are handled elsewhere). Only headers are read for safetensors; .bin shards are memory-mapped
    to list their tensors.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise error(f"{folder} is not a folder: point at the folder that holds the model weights")
    safetensors_files = _weight_files(folder, ".safetensors")

    index = folder / SAFETENSORS_INDEX
    if not index.is_file():
        other_indexes = _weight_files(folder, ".safetensors.index.json")
        index = other_indexes[0] if len(other_indexes) == 1 else index
    if index.is_file():
        return _list_safetensors_index(folder, index, safetensors_files, error)

    if safetensors_files:
        return _list_single_safetensors(folder, safetensors_files, error)
    bin_index = folder / BIN_INDEX
    if bin_index.is_file():
        return _list_bin_index(folder, bin_index, error)
    single_bin = folder / BIN_SINGLE
    # The one other single state dict is FSDP's full state dict as accelerate and the Trainer name it
    # (`pytorch_model_fsdp.bin`); with several candidates none is guessed.
    others = [p for p in _weight_files(folder, ".bin") if p.name.startswith("pytorch_model")]
    if not single_bin.is_file() and len(others) == 1:
        single_bin = others[0]
    if single_bin.is_file():
        return Checkpoint(
            folder=folder, format="bin", files=(single_bin,), tensors=dict(list_bin(single_bin, error))
        )
    raise error(
        f"no model weights in {folder}: expected {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, a *.safetensors "
        f"file or {BIN_SINGLE}: check the fine-tune path"
    )


def list_remote_checkpoint(
    folder: Path, files: Sequence[str], read_header: HeaderReader, *, error: ErrorType
) -> Checkpoint:
    """The safetensors weights of a model whose weight files are not on disk: `files` lists the repo's files,
    `read_header` reads a header by other means (HTTP ranges); only the index must be in `folder`. The same
    choice of files and the same checks as `list_checkpoint`."""
    top = {f for f in files if "/" not in f}
    present = sorted(
        folder / f for f in top if f.endswith(".safetensors") and not f.startswith(_ADAPTER_PREFIX)
    )
    indexes = sorted(f for f in top if f.endswith(".safetensors.index.json"))
    index = SAFETENSORS_INDEX if SAFETENSORS_INDEX in indexes else (indexes[0] if len(indexes) == 1 else None)
    listed = {folder / f for f in top}
    if index is not None and (folder / index).is_file():
        return _list_safetensors_index(
            folder, folder / index, present, error, read_header, exists=lambda p: p in listed
        )
    if present:
        return _list_single_safetensors(folder, present, error, read_header, exists=lambda p: p in listed)
    raise error(
        f"no safetensors weights in {folder.name}: expected {SAFETENSORS_INDEX} or a *.safetensors file"
    )


def _list_single_safetensors(
    folder: Path,
    present: list[Path],
    error: ErrorType,
    read_header: HeaderReader = read_safetensors_header,
    exists: Callable[[Path], bool] = Path.is_file,
) -> Checkpoint:
    chosen = folder / SAFETENSORS_SINGLE
    if not exists(chosen):
        if len(present) > 1:
            names = ", ".join(p.name for p in present)
            raise error(
                f"{folder} holds several safetensors files ({names}) but no {SAFETENSORS_INDEX}: "
                "add the index or keep only the weights file"
            )
        chosen = present[0]
    header = read_header(chosen, error=error)
    return Checkpoint(
        folder=folder,
        format="safetensors",
        files=(chosen,),
        tensors=dict(header.tensors),
        stray_files=tuple(p for p in present if p != chosen),
        headers={chosen: header},
    )


def _list_bin_index(folder: Path, bin_index: Path, error: ErrorType) -> Checkpoint:
    weight_map, metadata = _read_index_document(bin_index, error)
    shards = sorted({folder / s for s in weight_map.values()})
    tensors: dict[str, TensorRef] = {}
    for shard in shards:
        if not shard.is_file():
            raise error(f"{BIN_INDEX} names {shard.name}, which is not in {folder}: re-download it")
        found = list_bin(shard, error)
        for tname, ref in found.items():
            if weight_map.get(tname) != shard.name:
                raise error(
                    f"{shard.name} holds {tname}, which {BIN_INDEX} does not map to it: regenerate the index"
                )
            tensors[tname] = ref
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise error(
            f"{BIN_INDEX} lists {len(missing)} tensor(s) missing from their shard (first: {missing[0]} "
            f"in {weight_map[missing[0]]}): re-download the shards or regenerate the index"
        )
    used = set(shards)
    return Checkpoint(
        folder=folder,
        format="bin",
        files=tuple(shards),
        tensors={k: tensors[k] for k in weight_map if k in tensors},
        # Only pytorch_model*.bin: a Trainer folder also holds training_args.bin, which holds no weights.
        stray_files=tuple(
            p for p in _weight_files(folder, ".bin") if p.name.startswith("pytorch_model") and p not in used
        ),
        index_file=bin_index,
        index_metadata=metadata,
    )


def _list_safetensors_index(
    folder: Path,
    index: Path,
    present: list[Path],
    error: ErrorType,
    read_header: HeaderReader = read_safetensors_header,
    exists: Callable[[Path], bool] = Path.is_file,
) -> Checkpoint:
    weight_map, metadata = _read_index_document(index, error)
    shard_names = sorted(set(weight_map.values()))
    headers: dict[Path, SafetensorsHeader] = {}
    for shard_name in shard_names:
        shard = folder / shard_name
        if not exists(shard):
            raise error(f"{index.name} names shard {shard_name}, which is not in {folder}: re-download it")
        headers[shard] = read_header(shard, error=error)
    tensors: dict[str, TensorRef] = {}
    for tname, shard_name in weight_map.items():
        info = headers[folder / shard_name].tensors.get(tname)
        if info is None:
            raise error(
                f"{index.name} maps {tname} to {shard_name}, which does not hold it: regenerate the index"
            )
        tensors[tname] = info
    for shard, header in headers.items():
        unlisted = [t for t in header.tensors if weight_map.get(t) != shard.name]
        if unlisted:
            raise error(
                f"{shard.name} holds {len(unlisted)} tensor(s) that {index.name} does not map to it "
                f"(first: {unlisted[0]}): regenerate the index"
            )
    return Checkpoint(
        folder=folder,
        format="safetensors",
        files=tuple(headers),
        tensors=tensors,
        stray_files=tuple(p for p in present if p not in headers),
        index_file=index,
        index_metadata=metadata,
        headers=headers,
    )


def _torch_load(path: Path, error: ErrorType) -> dict[str, Any]:
    import pickle

    import torch

    # mmap keeps memory at what is touched; it needs the zip format that torch.save has written since 1.6,
    # older files are read whole.
    use_mmap = zipfile.is_zipfile(path)
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu", mmap=use_mmap)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise error(
            f"{path.name} cannot be loaded safely: it needs arbitrary pickled code ({first}): convert it to "
            "safetensors in an environment you trust and point hubsync at that"
        ) from err
    except Exception as err:  # torch raises RuntimeError, EOFError, zipfile errors... for a damaged file
        raise error(
            f"{path.name} is not a readable PyTorch checkpoint ({err}): re-download or re-save it"
        ) from err
    if not isinstance(obj, dict):
        raise error(
            f"{path.name} holds a {type(obj).__name__}, not a state dict; save model.state_dict() instead"
        )
    return obj


def list_bin(path: Path, error: ErrorType) -> dict[str, BinTensorRef]:
    import torch

    refs: dict[str, BinTensorRef] = {}
    for tname, value in _torch_load(path, error).items():
        if not isinstance(value, torch.Tensor):
            continue  # optimizer steps, config values: not weights
        try:
            dtype = st_dtype(value.dtype)
        except ValueError as err:
            raise error(
                f"{path.name}: tensor {tname} has dtype {value.dtype}, which safetensors cannot hold"
            ) from err
        shape = tuple(value.shape)
        refs[tname] = BinTensorRef(tname, dtype, shape, path, dtype_nbytes(dtype, shape))
    return refs


class _BinShardCache:
    """Keeps the state dict of one .bin shard memory-mapped, so loading its tensors one by one does not
    unpickle the shard again for each of them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[Path, int, int] | None = None
        self._state: dict[str, Any] | None = None

    def get(self, path: Path, error: ErrorType) -> dict[str, Any]:
        st = path.stat()
        key = (path.resolve(), st.st_mtime_ns, st.st_size)
        with self._lock:
            if self._key != key or self._state is None:
                self._state = None  # drop the previous mapping before opening the next one
                self._state = _torch_load(path, error)
                self._key = key
            return self._state

    def clear(self) -> None:
        with self._lock:
            self._key, self._state = None, None


_bin_cache = _BinShardCache()


# ------------------------------------------------------------------------------------------------ reading


def _read_exact(f: IO[bytes], view: memoryview, file: Path, error: ErrorType) -> None:
    filled = 0
    while filled < len(view):
        try:
            n = f.readinto(view[filled:])  # type: ignore[attr-defined]
        except OSError as err:
            raise error(
                f"cannot read {file}: {err.strerror or err}: check the disk and re-download it"
            ) from err
        if not n:
            raise error(
                f"{file.name} is truncated: it ended while reading a tensor: re-download or re-save it"
            )
        filled += n


def load_tensor(info: TensorRef, *, error: ErrorType = FinetuneError) -> torch.Tensor:
    """One tensor, read from its byte range alone (no mmap of the file, no other tensor touched)."""
    import torch

    try:
        dtype = torch_dtype(info.dtype)
    except ValueError as err:
        raise error(f"{info.file.name}: tensor {info.name}: {err}: re-save it as BF16, F16 or F32") from err

    if isinstance(info, ComputedTensor):
        value = info.compute()
        if tuple(value.shape) != tuple(info.shape):
            raise error(
                f"computed tensor {info.name} has shape {list(value.shape)}, expected {list(info.shape)}"
            )
        return value.to(dtype)
    if isinstance(info, BinTensorRef):
        value = _bin_cache.get(info.file, error).get(info.name)
        if not isinstance(value, torch.Tensor):
            raise error(
                f"{info.file.name} no longer holds tensor {info.name}: it changed while hubsync ran; build again"
            )
        # A copy, so that the caller neither writes through the mapping nor keeps the whole shard mapped.
        return value.detach().clone(memory_format=torch.contiguous_format)

    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    buffer = bytearray(info.nbytes)
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.absolute_range[0])
        _read_exact(f, memoryview(buffer), info.file, error)
    # frombuffer shares the bytearray's memory (no second copy) and keeps it alive.
    return torch.frombuffer(buffer, dtype=dtype).reshape(info.shape)


CHUNK_ELEMENTS = 1 << 18  # 1 MB of fp32: a chunk and its casts stay in the CPU's cache (1.5x faster than 4M)


def iter_chunks(
    info: TensorRef,
    max_elements: int = CHUNK_ELEMENTS,
    *,
    error: ErrorType = FinetuneError,
    reuse: str | None = None,
) -> Iterator[np.ndarray]:
    """A tensor as consecutive 1-D numpy chunks of at most `max_elements` (see hubsync.chunks: bf16 as its
    bits), so that comparing two large tensors needs a few chunks of memory, not the tensors. Safetensors
    chunks are read from their own byte ranges, without torch; other sources are loaded whole (there is no
    cheaper way) and split.

    With `reuse` (a name for the buffer, see `chunks.Scratch`), every chunk is read into the same buffer of
    this thread: a chunk is then valid only until the next one is yielded, and no memory is allocated (nor
    page-faulted in) per chunk."""
    import numpy as np

    if not isinstance(info, TensorInfo) or info.nbytes == 0 or info.nbytes % max(info.numel, 1):
        chunks.torch_module()  # loaded through chunks: on one thread while compare's workers run
        flat = chunks.from_torch(load_tensor(info, error=error))
        for start in range(0, flat.size, max_elements):
            yield flat[start : start + max_elements]
        return
    dtype = chunks.storage(info.dtype)
    itemsize = info.nbytes // info.numel
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.absolute_range[0])
        for start in range(0, info.numel, max_elements):
            count = min(max_elements, info.numel - start)
            if reuse is None:
                buffer = np.empty(count * itemsize, dtype=np.uint8)
            else:
                buffer = chunks.scratch().get(reuse, np.uint8, count * itemsize)
            _read_exact(f, buffer.data, info.file, error)
            yield buffer.view(dtype)


def _iter_range(
    f: IO[bytes], start: int, length: int, buffer: bytearray, file: Path, error: ErrorType
) -> Iterator[memoryview]:
    """Yield the bytes of [start, start+length) in chunks of len(buffer), reusing that one buffer."""
    f.seek(start)
    view = memoryview(buffer)
    remaining = length
    while remaining:
        chunk = view[: min(remaining, len(buffer))]
        _read_exact(f, chunk, file, error)
        remaining -= len(chunk)
        yield chunk


def tensor_bytes_equal(a: TensorInfo, b: TensorInfo, *, chunk: int = COPY_CHUNK) -> bool:
    """Whether two stored tensors have the same dtype, shape and bytes; compared in chunks, without torch."""
    if (a.dtype, a.shape, a.nbytes) != (b.dtype, b.shape, b.nbytes):
        return False
    if a.absolute_range == b.absolute_range and os.path.samefile(a.file, b.file):
        return True
    size = min(chunk, max(a.nbytes, 1))
    buf_a, buf_b = bytearray(size), bytearray(size)
    with open(a.file, "rb", buffering=0) as fa, open(b.file, "rb", buffering=0) as fb:
        chunks_a = _iter_range(fa, a.absolute_range[0], a.nbytes, buf_a, a.file, FinetuneError)
        chunks_b = _iter_range(fb, b.absolute_range[0], b.nbytes, buf_b, b.file, FinetuneError)
        for _ in zip(chunks_a, chunks_b):
            # Whole buffers, because bytearray equality is a memcmp and memoryview equality is ~40x slower.
            # A short last chunk leaves equal tails: every earlier chunk compared equal.
            if buf_a != buf_b:
                return False
    return True


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's bytes in C order, without a copy when it is already contiguous on the CPU."""
    import torch

    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def same_after_roundtrip(base: TensorInfo, tuned: torch.Tensor) -> bool:
    """True when `tuned`, cast to the base's dtype, is bitwise the base tensor.

    This accepts a tensor that training upcast (an F16 base trained in fp32 or bf16) and never changed: the
    cast back restores the base's exact bits, so the tensor is untouched even though the saved values differ.
    """
    import torch

    if tuple(tuned.shape) != base.shape:
        return False
    stored = load_tensor(base)
    cast = tuned.detach().cpu().to(stored.dtype).contiguous()
    # Bits, not values: NaN payloads and -0.0 vs 0.0 count as differences.
    return torch.equal(cast.reshape(-1).view(torch.uint8), stored.reshape(-1).view(torch.uint8))


def _flat_chunks(t: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), chunk):
        yield flat[start : start + chunk]


def has_nan_or_inf(t: torch.Tensor, *, chunk: int = 1 << 22) -> bool:
    """Whether a floating tensor holds NaN or ±Inf. Works in fp32 chunks, so fp8 (where torch has no
    isfinite) is covered and memory stays at one chunk."""
    import torch

    if not (t.is_floating_point() or t.is_complex()):
        return False
    for part in _flat_chunks(t.detach(), chunk):
        values = part if part.is_complex() else part.to(torch.float32)
        # a finite norm proves every value finite (one reduction); only a chunk whose norm is not is searched
        if not math.isfinite(float(torch.linalg.vector_norm(values))) and not bool(
            torch.isfinite(values).all()
        ):
            return True
    return False


def delta_stats(base: torch.Tensor, tuned: torch.Tensor, *, chunk: int = 1 << 22) -> tuple[float, float]:
    """(max |tuned - base|, ||tuned - base|| / ||base||), computed in fp32 chunks; the per-chunk norms are
    summed in Python floats (float64), which is plenty for a figure in a report and far cheaper than
    casting every chunk to float64.

    rel is 0.0 for two zero tensors and inf when only the base is zero.
    """
    import torch

    if tuple(base.shape) != tuple(tuned.shape):
        raise ValueError(f"delta_stats needs equal shapes, got {tuple(base.shape)} and {tuple(tuned.shape)}")
    max_abs = 0.0
    diff_sq = 0.0
    base_sq = 0.0
    for b, t in zip(_flat_chunks(base.detach(), chunk), _flat_chunks(tuned.detach(), chunk)):
        b32 = b.to(torch.float32)
        d = t.to(torch.float32) - b32
        if d.numel() == 0:
            continue
        chunk_max = float(d.abs().max())
        if math.isnan(chunk_max):
            return math.nan, math.nan  # a NaN on either side makes both figures meaningless
        max_abs = max(max_abs, chunk_max)
        diff_sq += float(torch.linalg.vector_norm(d)) ** 2
        base_sq += float(torch.linalg.vector_norm(b32)) ** 2
    if base_sq == 0.0:
        return max_abs, 0.0 if diff_sq == 0.0 else math.inf
    return max_abs, math.sqrt(diff_sq) / math.sqrt(base_sq)


# ------------------------------------------------------------------------------------------------ writing


TensorSource = Union[TensorInfo, HeldBytes, Callable[[], "torch.Tensor"]]


@dataclass(frozen=True)
class ShardEntry:
    """One tensor of a shard to write. `source` is the TensorInfo whose bytes to copy as they are, bytes
    already produced (`HeldBytes`: a tensor compare cast to the output dtype, see hubsync.prefill), or a
    zero-argument callable that returns the tensor, already in `dtype`; it is called when the tensor is
    written and its result dropped right after."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorSource

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        if not self.name or self.name == "__metadata__":
            raise ValueError(f"invalid tensor name {self.name!r}")
        if not all(_is_int(d) and d >= 0 for d in self.shape):
            raise ValueError(f"{self.name}: invalid shape {self.shape}")
        dtype_nbytes(self.dtype, self.shape)  # raises ValueError for an unknown dtype
        if isinstance(self.source, TensorInfo):
            if (self.source.dtype, self.source.shape) != (self.dtype, self.shape):
                raise ValueError(
                    f"{self.name}: raw copy source is {self.source.dtype} {list(self.source.shape)}, "
                    f"entry says {self.dtype} {list(self.shape)}; a raw copy cannot change dtype or shape"
                )
        elif isinstance(self.source, HeldBytes):
            if self.source.nbytes != self.nbytes:
                raise ValueError(
                    f"{self.name}: {self.source.nbytes} held bytes for a {self.dtype} {list(self.shape)} tensor "
                    f"of {self.nbytes} bytes"
                )
        elif not callable(self.source):
            raise TypeError(f"{self.name}: source must be a TensorInfo or a callable, not {self.source!r}")

    @property
    def nbytes(self) -> int:
        return dtype_nbytes(self.dtype, self.shape)


def template_matches(
    entries: Sequence[ShardEntry], metadata: Mapping[str, str] | None, template: SafetensorsHeader
) -> bool:
    """Whether `template`'s header describes exactly these entries (same names, order, dtypes, shapes) and
    this metadata, so that its bytes can be reused as they are."""
    if (dict(metadata) if metadata is not None else None) != template.metadata:
        return False
    if len(entries) != len(template.tensors):
        return False
    return all(
        (e.name, e.dtype, e.shape) == (t.name, t.dtype, t.shape)
        for e, t in zip(entries, template.tensors.values())
    )


def build_header(entries: Sequence[ShardEntry], metadata: Mapping[str, str] | None) -> bytes:
    """A new safetensors header (without the 8-byte length) for entries in the given order.

    Same form as safetensors writes: compact JSON, `__metadata__` first, data_offsets in entry order, spaces
    up to a multiple of 8 bytes so the data section is 8-aligned. Unlike safetensors (whose metadata order is
    a hash map's), metadata keys are sorted, so the same inputs always give the same bytes.
    """
    doc: dict[str, Any] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        doc["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for entry in entries:
        if entry.name in doc:
            raise ValueError(f"tensor {entry.name} appears twice in one shard")
        end = offset + entry.nbytes
        doc[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def shard_header(
    entries: Sequence[ShardEntry],
    metadata: Mapping[str, str] | None,
    template: SafetensorsHeader | None = None,
) -> bytes:
    """The header `write_shard` will write: the template's own bytes when it matches, a new one otherwise.
    Pure, so a plan can show shard sizes and whether a header is kept without writing anything."""
    if template is not None and template_matches(entries, metadata, template):
        return template.raw
    return build_header(entries, metadata)


def _write_all(fd: int, data: memoryview | bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _pread_exact(fd: int, view: memoryview, offset: int, file: Path, error: ErrorType) -> None:
    filled = 0
    while filled < len(view):
        try:
            n = os.preadv(fd, [view[filled:]], offset + filled)
        except OSError as err:
            raise error(f"cannot read {file}: {err.strerror or err}: check the disk and build again") from err
        if not n:
            raise error(
                f"{file.name} is truncated: it ended while reading a tensor: re-download or re-save it"
            )
        filled += n


def _open_fresh(path: Path) -> int:
    """Create `path` as a new file. An existing file or link is unlinked first rather than truncated: it may
    be a hardlink to, or a symlink into, the Hugging Face cache, whose blob must never be written through."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
            os.unlink(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)


def _write_failure(dest: Path, needed: int, written: int, err: OSError) -> BuildError:
    """The error for a failed write of `needed` bytes to `dest`, of which `written` are there (and are about
    to be removed, which is why they count as free)."""
    if err.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return BuildError(f"cannot write {dest}: {err.strerror or err}: check the output folder")
    try:
        free = shutil.disk_usage(dest.parent).free + written
    except OSError:
        free = 0
    short_gb = max(math.ceil(max(needed - free, 0) / 1e8) / 10, 0.1)
    return BuildError(
        f"no space left on device writing {dest}: free {short_gb:.1f} GB or set output.dir elsewhere"
    )


def _open_source(path: Path) -> IO[bytes]:
    try:
        return open(path, "rb", buffering=0)
    except OSError as err:
        raise BuildError(
            f"cannot read {path}: {err.strerror or err}; check that the base is complete"
        ) from err


def _remove_partial(path: Path) -> None:
    try:
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass


class Syncer:
    """Makes written files durable in a second thread, so that the disk writes one file back while the next
    is being produced. A writer hands over the file's open descriptor (fsync through another descriptor could
    miss a write-back error that happened before it was opened); `wait()` returns when every file is on disk
    and raises the first failure."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hubsync-fsync")
        self._pending: list[Any] = []

    def submit(self, fd: int, dest: Path, size: int) -> None:
        self._pending.append(self._pool.submit(self._sync, fd, dest, size))

    @staticmethod
    def _sync(fd: int, dest: Path, size: int) -> None:
        try:
            os.fsync(fd)
        except OSError as err:
            raise _write_failure(dest, size, size, err) from err
        finally:
            os.close(fd)

    def wait(self) -> None:
        try:
            for future in self._pending:
                future.result()
        finally:
            self._pending.clear()

    def close(self) -> None:
        """Wait for the files handed over (their descriptors are closed), without raising."""
        for future in self._pending:
            future.exception()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Syncer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _finish_file(fd: int, dest: Path, size: int, syncer: Syncer | None) -> None:
    """fsync and close now, or hand the descriptor to `syncer`."""
    if syncer is not None:
        syncer.submit(fd, dest, size)
        return
    try:
        Syncer._sync(fd, dest, size)
    except BaseException:
        _remove_partial(dest)
        raise


class _HashedOutput:
    """A new file and the sha256 of what has been written to it. The hash runs in a second thread, on the
    buffer just written, while the next piece is read: hashlib and os.write both release the GIL, so a
    rewritten shard costs the time of its I/O, not I/O plus hashing. Raw copies go through two reused
    buffers, each reused only once its hash is done."""

    def __init__(self, dest: Path, total: int, *, in_place: int | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.dest, self.total, self.written = dest, total, 0
        try:
            if in_place is None:
                self.fd = _open_fresh(dest)
            else:
                # `in_place`: the open descriptor of a file of ours in the staging folder that already holds
                # some of the bytes. Its duplicate shares its write-back error state, so the fsync at the end
                # also reports a failure to write back what compare wrote.
                self.fd = os.dup(in_place)
                os.lseek(self.fd, 0, os.SEEK_SET)
                os.ftruncate(self.fd, total)
        except OSError as err:
            raise _write_failure(dest, total, 0, err) from err
        self._digest = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="hubsync-sha256")
        self._buffers: list[bytearray] = []
        self._hashing: list[Any] = [None, None]
        self._turn = 0

    def emit(self, data: memoryview | bytes) -> Any:
        """Write `data` and queue it for hashing; the returned future is done once it is hashed (until then
        `data` must not change)."""
        try:
            _write_all(self.fd, data)
        except OSError as err:
            raise _write_failure(self.dest, self.total, self.written, err) from err
        self.written += len(data)
        return self._hasher.submit(self._digest.update, data)

    def copy_range(self, fd: int, start: int, length: int, file: Path) -> None:
        """Copy `length` bytes from `start` of the open file `fd`."""
        if not self._buffers:
            self._buffers = [bytearray(COPY_CHUNK // 2), bytearray(COPY_CHUNK // 2)]
        position, end = start, start + length
        while position < end:
            turn, self._turn = self._turn, self._turn ^ 1
            if self._hashing[turn] is not None:
                self._hashing[turn].result()  # its previous piece is hashed: the buffer is free
            view = memoryview(self._buffers[turn])[: min(end - position, len(self._buffers[turn]))]
            _pread_exact(fd, view, position, file, BuildError)
            self._hashing[turn] = self.emit(view)
            position += len(view)

    def hash_range(self, fd: int, start: int, length: int, file: Path) -> None:
        """The next `length` bytes are already in the file (they are `length` bytes at `start` of `fd`): hash
        them, write nothing."""
        if not self._buffers:
            self._buffers = [bytearray(COPY_CHUNK // 2), bytearray(COPY_CHUNK // 2)]
        position, end = start, start + length
        while position < end:
            turn, self._turn = self._turn, self._turn ^ 1
            if self._hashing[turn] is not None:
                self._hashing[turn].result()
            view = memoryview(self._buffers[turn])[: min(end - position, len(self._buffers[turn]))]
            _pread_exact(fd, view, position, file, BuildError)
            self._hashing[turn] = self._hasher.submit(self._digest.update, view)
            position += len(view)
        os.lseek(self.fd, length, os.SEEK_CUR)
        self.written += length

    def finish(self, syncer: Syncer | None) -> str:
        """Wait for the hash, check the size, then fsync (or hand the file to `syncer`)."""
        self._hasher.shutdown(wait=True)
        size = os.fstat(self.fd).st_size
        if size != self.total:
            raise BuildError(
                f"{self.dest} is {size} bytes after writing, {self.total} were expected: rebuild it"
            )
        fd, self.fd = self.fd, -1
        _finish_file(fd, self.dest, self.total, syncer)
        return self._digest.hexdigest()

    def abort(self) -> None:
        """Whatever stopped the write, a half-written file must not look like an output."""
        self._hasher.shutdown(wait=True, cancel_futures=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        _remove_partial(self.dest)


def write_new(dest: str | os.PathLike[str], data: bytes, *, syncer: Syncer | None = None) -> str:
    """Write a small file (JSON, a card) as a new file and return its sha256; fsynced now or through
    `syncer`."""
    dest = Path(dest)
    out = _HashedOutput(dest, len(data))
    try:
        out.emit(data)
        return out.finish(syncer)
    except BaseException:
        out.abort()
        raise


def write_shard(
    dest: str | os.PathLike[str],
    entries: Sequence[ShardEntry],
    metadata: Mapping[str, str] | None,
    *,
    template: SafetensorsHeader | None = None,
    syncer: Syncer | None = None,
) -> str:
    """Write one safetensors shard by streaming and return its sha256, hashed while it is written.

    Raw sources (the base's bytes, or bytes compare already produced) are copied through two reused
    buffers; callable sources are called one at a time and freed after writing, so memory stays at about one
    tensor. When `template` matches (see `template_matches`), its header bytes are reused, so a shard whose
    tuned tensors keep their dtype and shape has the base's header byte for byte. A new header is checked by
    opening the result with safetensors itself. The file is fsynced before this returns, or, with `syncer`,
    once `syncer.wait()` does.
    """
    dest = Path(dest)
    reuse_template = template is not None and template_matches(entries, metadata, template)
    header = template.raw if template is not None and reuse_template else build_header(entries, metadata)
    start = 8 + len(header)
    in_place = _already_in(dest, entries, start)
    fd = next((e.source.fd for e in entries if e.name in in_place and isinstance(e.source, HeldBytes)), None)
    out = _HashedOutput(dest, start + sum(e.nbytes for e in entries), in_place=fd)
    try:
        out.emit(struct.pack("<Q", len(header)) + header)
        _write_entries(out, entries, in_place)
        digest = out.finish(syncer)
    except BaseException:
        out.abort()
        raise
    if not reuse_template:
        _check_with_safetensors(dest, [e.name for e in entries], metadata)
    return digest


def _already_in(dest: Path, entries: Sequence[ShardEntry], start: int) -> set[str]:
    """The entries whose bytes compare already wrote into `dest` itself, at the offset they have in this
    layout (see hubsync.prefill); empty when `dest` is not such a file."""
    held = [(e, e.source) for e in entries if isinstance(e.source, HeldBytes)]
    try:
        here = os.lstat(dest)
    except OSError:
        return set()
    if not held or not stat.S_ISREG(here.st_mode):
        return set()
    offsets, position = {}, start
    for entry in entries:
        offsets[entry.name] = position
        position += entry.nbytes
    found = set()
    for entry, source in held:
        st = os.fstat(source.fd)
        if (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino):
            if source.offset != offsets[entry.name]:
                return set()  # not this layout after all: write the file anew, copying from the old one
            found.add(entry.name)
    return found


def _write_entries(out: _HashedOutput, entries: Sequence[ShardEntry], in_place: set[str]) -> None:
    sources: dict[Path, IO[bytes]] = {}
    try:
        for entry in entries:
            source = entry.source
            if isinstance(source, TensorInfo):
                if source.file not in sources:
                    sources[source.file] = _open_source(source.file)
                out.copy_range(
                    sources[source.file].fileno(), source.absolute_range[0], source.nbytes, source.file
                )
            elif isinstance(source, HeldBytes):
                where = Path(f"<{entry.name}, written by compare>")
                if entry.name in in_place:
                    out.hash_range(source.fd, source.offset, source.nbytes, where)
                else:
                    out.copy_range(source.fd, source.offset, source.nbytes, where)
            else:
                _write_produced(out, entry)
    finally:
        for src in sources.values():
            src.close()


def _write_produced(out: _HashedOutput, entry: ShardEntry) -> None:
    import torch

    assert callable(entry.source) and not isinstance(entry.source, (TensorInfo, HeldBytes))
    tensor = entry.source()
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{entry.name}: source returned {type(tensor).__name__}, not a Tensor")
    if tensor.dtype != torch_dtype(entry.dtype) or tuple(tensor.shape) != entry.shape:
        raise ValueError(
            f"{entry.name}: source returned {tensor.dtype} {list(tensor.shape)}, the shard "
            f"expects {entry.dtype} {list(entry.shape)}"
        )
    out.emit(_raw_bytes(tensor)).result()  # hashed before the tensor is freed


def _check_with_safetensors(dest: Path, names: list[str], metadata: Mapping[str, str] | None) -> None:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(dest), framework="numpy") as f:
            keys = list(f.keys())
            stored_metadata = f.metadata()
    except SafetensorError as err:
        raise BuildError(
            f"safetensors cannot read the shard hubsync wrote to {dest} ({err}): this is a bug in hubsync, please report it"
        ) from err
    if sorted(keys) != sorted(names) or (stored_metadata or None) != (dict(metadata) if metadata else None):
        raise BuildError(
            f"safetensors reads different tensors or metadata from {dest} than were written: this is a bug in hubsync, please report it"
        )


# ------------------------------------------------------------------------------------------------ files


def sha256_file(path: str | os.PathLike[str], chunk: int = HASH_CHUNK) -> str:
    """sha256 of a file, streamed through one reused buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


# errnos after which the next copy method may work: the call or this pair of filesystems does not support it.
_COPY_FALLBACK_ERRNOS = {
    errno.EXDEV,
    errno.ENOSYS,
    errno.EINVAL,
    errno.EOPNOTSUPP,
    getattr(errno, "ENOTSUP", errno.EOPNOTSUPP),
    errno.EBADF,
    errno.EPERM,
}
_LINK_FALLBACK_ERRNOS = {
    errno.EXDEV,
    errno.EPERM,
    errno.EMLINK,
    errno.EOPNOTSUPP,
    getattr(errno, "ENOTSUP", errno.EOPNOTSUPP),
    errno.ENOSYS,
}


def _hardlink(src: Path, dst: Path) -> bool:
    """Link `dst` to `src`'s file; False where linking is impossible (another device, no links)."""
    tmp = dst.with_name(f".{dst.name}.hubsync-link")
    _remove_partial(tmp)
    try:
        # Resolve first: os.link may link the symlink itself (the HF cache's links are relative, so a
        # linked link would dangle); the blob is what must be shared.
        os.link(src.resolve(), tmp)
    except OSError as err:
        if err.errno not in _LINK_FALLBACK_ERRNOS:
            raise BuildError(f"cannot hardlink {src} to {dst}: {err.strerror or err}") from err
        return False
    os.replace(tmp, dst)
    # rename() between two links to one inode does nothing and leaves tmp behind (src is dst).
    _remove_partial(tmp)
    fsync_dir(dst.parent)
    return True


def copy_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    mode: Literal["copy", "hardlink"] = "copy",
    syncer: Syncer | None = None,
) -> Literal["copy", "hardlink"]:
    """Copy `src` to `dst` byte for byte and fsync it (now, or through `syncer`); return how it was done.

    "copy" lets the kernel move the bytes (copy_file_range, which can reflink, then sendfile, then a plain
    read/write loop). "hardlink" links instead and falls back to a copy where linking is impossible (another
    device, a filesystem without links); the return value says which happened. A hardlinked output shares its
    inode with the source, so nothing may ever write into it in place: every writer here unlinks first.
    """
    src, dst = Path(src), Path(dst)
    if mode == "hardlink":
        if _hardlink(src, dst):
            return "hardlink"
    elif mode != "copy":
        raise ValueError(f"unknown copy mode {mode!r}")

    fin = _open_source(src)
    with fin:
        size = os.fstat(fin.fileno()).st_size
        try:
            out = _open_fresh(dst)
        except OSError as err:
            raise _write_failure(dst, size, 0, err) from err
        try:
            try:
                _kernel_copy(fin.fileno(), out, size)
                copied = os.fstat(out).st_size
            except OSError as err:
                raise _write_failure(dst, size, os.fstat(out).st_size, err) from err
            if copied != size:
                raise BuildError(
                    f"copying {src} to {dst} stopped after {copied} of {size} bytes: build again"
                )
        except BaseException:
            os.close(out)
            _remove_partial(dst)
            raise
    _finish_file(out, dst, size, syncer)
    return "copy"


def copy_hashed(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, syncer: Syncer | None = None
) -> str:
    """Copy `src` to `dst` and return the sha256 of the bytes copied, hashed as they pass (a kernel copy
    would have to read the copy again to hash it). fsynced now, or through `syncer`."""
    src, dst = Path(src), Path(dst)
    fin = _open_source(src)
    with fin:
        out = _HashedOutput(dst, os.fstat(fin.fileno()).st_size)
        try:
            out.copy_range(fin.fileno(), 0, out.total, src)
            return out.finish(syncer)
        except BaseException:
            out.abort()
            raise


def _kernel_copy(fd_in: int, fd_out: int, size: int) -> None:
    # Each method continues from the file positions the previous one left, so a fallback after a partial
    # copy neither skips nor repeats bytes.
    remaining = size
    methods: list[Callable[[int], int]] = []
    if hasattr(os, "copy_file_range"):
        methods.append(lambda n: os.copy_file_range(fd_in, fd_out, n))
    if hasattr(os, "sendfile"):
        methods.append(lambda n: os.sendfile(fd_out, fd_in, None, n))
    for method in methods:
        try:
            while remaining > 0:
                n = method(min(remaining, 1 << 30))
                if n == 0:
                    break
                remaining -= n
            if remaining <= 0:
                return
        except OSError as err:
            if err.errno not in _COPY_FALLBACK_ERRNOS:
                raise
    buffer = bytearray(COPY_CHUNK)
    view = memoryview(buffer)
    while True:
        n = os.readv(fd_in, [buffer])
        if n == 0:
            return
        _write_all(fd_out, view[:n])
