"""The build record: what a build folder is, how it was made, and what its verification proved.

This module is the only place that knows the record's file names and layout:

- `hubsync.json`, inside the build folder and published with it: the manifest as data (paths relative to the
  manifest's folder, never a local absolute path), the pinned base, every file's sha256 and source, the tuned
  tensors, the card's inputs, and the verification (results only: the same build verified the same way gives
  the same bytes, so an identical rebuild publishes nothing new);
- a local, unpublished sidecar beside the build folder (`.<name>.hubsync-local.json`): the absolute paths a
  later `hubsync verify` needs (manifest, fine-tune, base), the runtime verification used, timings and peak
  memory;
- `.hubsync/last-build.json` in the working directory: which build a bare `hubsync push` publishes.

It also owns the verification gate that `hubsync push` applies. Everyone else reads and writes records through
the types here, never by string keys.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hubsync import fsio, progress
from hubsync.errors import RecordError, VerifyError

RECORD_FILE = "hubsync.json"
LAST_BUILD = Path(".hubsync") / "last-build.json"
_FIX = "rebuild the folder with `hubsync build`"


# ------------------------------------------------------------------------------------------------ parts


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int
    source: str  # base | finetune | generated


@dataclass(frozen=True)
class TunedTensor:
    finetune_name: str
    dtype: str
    shard: str


@dataclass(frozen=True)
class BaseRef:
    repo: str | None
    revision: str | None
    sha: str | None
    path: str | None  # a local base folder, relative to the manifest's folder

    @property
    def label(self) -> str:
        return f"{self.repo}@{(self.sha or '')[:12]}" if self.repo else "a local base folder"


@dataclass(frozen=True)
class CheckResult:
    """One verification check: its verdict (None: not applicable or skipped, the reason in `detail`)."""

    name: str
    ok: bool | None
    detail: str
    evidence: tuple[str, ...] = ()
    figures: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "detail": self.detail,
            "evidence": list(self.evidence),
            "figures": dict(self.figures),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CheckResult:
        return cls(
            name=str(data["name"]),
            ok=data.get("ok"),
            detail=str(data.get("detail", "")),
            evidence=tuple(str(e) for e in data.get("evidence") or ()),
            figures=dict(data.get("figures") or {}),
        )


@dataclass(frozen=True)
class Verification:
    """What a verification proved, and which file contents (sha256) it covered."""

    passed: bool
    device: str
    device_map: str | None
    runtime: Mapping[str, Any]  # kind (current | python | requirements) and its requirements
    versions: Mapping[str, str]  # python, torch, transformers... of the runtime, and hubsync's
    checks: tuple[CheckResult, ...]
    files_sha256: Mapping[str, str]

    @property
    def first_failure(self) -> CheckResult | None:
        return next((c for c in self.checks if c.ok is False), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "device": self.device,
            "device_map": self.device_map,
            "runtime": dict(self.runtime),
            "versions": dict(self.versions),
            "checks": [c.to_json() for c in self.checks],
            "files_sha256": dict(sorted(self.files_sha256.items())),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Verification:
        return cls(
            passed=bool(data["passed"]),
            device=str(data.get("device", "?")),
            device_map=data.get("device_map"),
            runtime=dict(data.get("runtime") or {}),
            versions={str(k): str(v) for k, v in dict(data.get("versions") or {}).items()},
            checks=tuple(CheckResult.from_json(c) for c in data.get("checks") or ()),
            files_sha256={str(k): str(v) for k, v in dict(data.get("files_sha256") or {}).items()},
        )


# ------------------------------------------------------------------------------------------------ record


@dataclass(frozen=True)
class BuildRecord:
    """hubsync.json: how a build folder was made, and its verification."""

    hubsync_version: str
    manifest: Mapping[str, Any]  # the manifest as data, local paths relative to its folder
    manifest_file: str  # the manifest's file name (no folder)
    base: BaseRef
    finetune_path: str  # relative to the manifest's folder
    finetune_format: str
    files: Mapping[str, FileEntry]
    tuned_tensors: Mapping[str, TunedTensor]
    prefixes: tuple[Mapping[str, Any], ...]
    notes: tuple[str, ...]
    card_inputs: Mapping[str, Any]
    verification: Verification | None = None

    # ---- what the manifest said, read back
    def _section(self, name: str) -> Mapping[str, Any]:
        value = self.manifest.get(name)
        return value if isinstance(value, Mapping) else {}

    @property
    def tuned_prefixes(self) -> tuple[str, ...]:
        declared = self._section("finetune").get("tuned")
        # an adapter implies its tuned parts; the plan recorded them per prefix
        return tuple(declared or (str(p["prefix"]) for p in self.prefixes))

    @property
    def output_dtype(self) -> str:
        return str(self._section("output").get("dtype", "base"))

    @property
    def verify_settings(self) -> Mapping[str, Any]:
        return self._section("verify")

    @property
    def push_settings(self) -> Mapping[str, Any] | None:
        push = self.manifest.get("push")
        return push if isinstance(push, Mapping) and push.get("repo") else None

    @property
    def content_id(self) -> str:
        """Identifies the built content (every file but the card and the record), for commit messages."""
        files = {p: f.sha256 for p, f in sorted(self.files.items()) if p not in ("README.md", RECORD_FILE)}
        return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]

    def base_shards(self) -> dict[str, str]:
        """Output path -> sha256 of the safetensors shards copied unchanged from a Hub base."""
        if not self.base.repo:
            return {}
        tuned = {t.shard for t in self.tuned_tensors.values()}
        return {
            path: f.sha256
            for path, f in self.files.items()
            if path.endswith(".safetensors") and f.source == "base" and path not in tuned
        }

    def with_verification(self, verification: Verification | None) -> BuildRecord:
        return replace(self, verification=verification)

    def with_file(self, path: str, entry: FileEntry) -> BuildRecord:
        return replace(self, files={**self.files, path: entry})

    # ---- layout
    def to_json(self) -> dict[str, Any]:
        return {
            "hubsync_version": self.hubsync_version,
            "manifest_file": self.manifest_file,
            "manifest": dict(self.manifest),
            "base": asdict(self.base),
            "finetune": {"path": self.finetune_path, "format": self.finetune_format},
            "files": {p: asdict(f) for p, f in sorted(self.files.items())},
            "tuned_tensors": {
                n: {"from": t.finetune_name, "dtype": t.dtype, "shard": t.shard}
                for n, t in self.tuned_tensors.items()
            },
            "prefixes": [dict(p) for p in self.prefixes],
            "notes": list(self.notes),
            "card_inputs": dict(self.card_inputs),
            "verification": None if self.verification is None else self.verification.to_json(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BuildRecord:
        """Raises KeyError/TypeError/ValueError on a damaged layout (`load` turns them into one line)."""
        base = data["base"]
        finetune = data["finetune"]
        verification = data.get("verification")
        return cls(
            hubsync_version=str(data["hubsync_version"]),
            manifest=dict(data["manifest"]),
            manifest_file=str(data["manifest_file"]),
            base=BaseRef(base.get("repo"), base.get("revision"), base.get("sha"), base.get("path")),
            finetune_path=str(finetune["path"]),
            finetune_format=str(finetune["format"]),
            files={
                str(p): FileEntry(str(f["sha256"]), int(f["size"]), str(f["source"]))
                for p, f in dict(data["files"]).items()
            },
            tuned_tensors={
                str(n): TunedTensor(str(t.get("from", n)), str(t["dtype"]), str(t["shard"]))
                for n, t in dict(data["tuned_tensors"]).items()
            },
            prefixes=tuple(dict(p) for p in data.get("prefixes") or ()),
            notes=tuple(str(n) for n in data.get("notes") or ()),
            card_inputs=dict(data.get("card_inputs") or {}),
            verification=None if verification is None else Verification.from_json(verification),
        )


def record_bytes(record: BuildRecord) -> bytes:
    return fsio.json_bytes(record.to_json())


def load(folder: Path) -> BuildRecord:
    """The record of a build folder; one line (RecordError) when there is none or it is damaged."""
    path = folder / RECORD_FILE
    data = fsio.read_json_object(path, error=RecordError, fix=_FIX)
    if data is None:
        raise RecordError(f"{folder} has no {RECORD_FILE}: it was not built by hubsync; run `hubsync build`")
    try:
        return BuildRecord.from_json(data)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise RecordError(f"{path} is damaged ({type(err).__name__}: {err}): {_FIX}") from None


def save(folder: Path, record: BuildRecord) -> str:
    """Write hubsync.json atomically; returns its sha256."""
    return fsio.replace_atomically(folder / RECORD_FILE, record_bytes(record), error=RecordError)


def is_build_folder(folder: Path) -> bool:
    """True when `folder` holds a record hubsync recognises (the only folders a build may replace)."""
    try:
        load(folder)
    except RecordError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ hashes


def hash_files(folder: Path) -> dict[str, str]:
    """sha256 of every file of a build folder but the record itself."""
    from hubsync.tensors import sha256_file

    files = [rel for rel in fsio.list_files(folder) if rel != RECORD_FILE]
    sizes = {rel: (folder / rel).stat().st_size for rel in files}
    hashes = {}
    with progress.stage("hash", sum(sizes.values())) as shown:
        for rel in files:
            hashes[rel] = sha256_file(folder / rel)
            shown.advance(sizes[rel])
    return hashes


# The check that proves the model was loaded (and then run) in the verification worker.
MODEL_LOADS = "model loads"


def verification_gate(folder: Path) -> tuple[BuildRecord, dict[str, str]]:
    """What `hubsync push` demands: a passed verification that covers the files exactly as they are now.
    Returns the record and the files' current sha256 (hashed now, never taken from the record)."""
    record = load(folder)
    verification = record.verification
    if verification is None:
        raise VerifyError(
            f"{folder} was never verified: run `hubsync verify {folder}` (or push with --skip-verify-check)"
        )
    failed = verification.first_failure
    if not verification.passed or failed is not None:
        what = f" ({failed.name}: {failed.detail})" if failed else ""
        raise VerifyError(
            f"the verification of {folder} failed{what}: fix the build and run `hubsync verify` again"
        )
    if not any(c.name == MODEL_LOADS and c.ok for c in verification.checks):
        raise VerifyError(
            f"the verification of {folder} never loaded the model (its files and weights were checked, nothing "
            f"was run): run `hubsync verify {folder}` (or push with --skip-verify-check)"
        )
    current = hash_files(folder)
    covered = verification.files_sha256
    for rel in sorted(set(current) | set(covered)):
        if current.get(rel) != covered.get(rel):
            raise VerifyError(
                f"{rel} changed after verification: run `hubsync verify {folder}` again before pushing"
            )
    return record, current


# ------------------------------------------------------------------------------------------------ local


@dataclass(frozen=True)
class LocalRecord:
    """What stays on this machine: absolute paths, the runtime verification used, timings and memory."""

    content_id: str  # ties the sidecar to the build it describes
    manifest_path: str | None = None
    finetune_folder: str | None = None
    base_folder: str | None = None
    runtime: Mapping[str, Any] | None = None  # kind, python, requirements
    timings_s: Mapping[str, float] = field(default_factory=dict)
    peak_memory_bytes: Mapping[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(self).items()}


def local_path(folder: Path) -> Path:
    folder = folder.absolute()
    return folder.parent / f".{folder.name}.hubsync-local.json"


def load_local(folder: Path, record: BuildRecord) -> LocalRecord | None:
    """The sidecar of this build, or None (a copied folder, another build's leftover, a damaged file)."""
    try:
        data = fsio.read_json_object(local_path(folder), error=RecordError, fix=_FIX)
    except RecordError:
        return None
    if data is None or data.get("content_id") != record.content_id:
        return None
    try:
        return LocalRecord(**data)
    except TypeError:
        return None


def save_local(folder: Path, local: LocalRecord) -> None:
    """Best effort: the sidecar only saves typing later, so failing to write it must not fail a build."""
    try:
        fsio.replace_atomically(local_path(folder), fsio.json_bytes(local.to_json()), error=RecordError)
    except RecordError:
        pass


# ------------------------------------------------------------------------------------------------ last build


@dataclass(frozen=True)
class LastBuild:
    manifest: Path
    output: Path


def remember_last_build(manifest_path: Path, output: Path, *, cwd: Path | None = None) -> str | None:
    """So that a bare `hubsync push` in this directory (or `cwd`) knows what to push. Returns a warning, or
    None."""
    pointer = LAST_BUILD if cwd is None else cwd / LAST_BUILD
    try:
        pointer.parent.mkdir(exist_ok=True)
        content = {"manifest": str(manifest_path.resolve()), "output": str(output.resolve())}
        fsio.replace_atomically(pointer, fsio.json_bytes(content), error=RecordError)
    except (OSError, RecordError) as err:  # a read-only working directory must not fail a finished build
        return f"could not record the last build in {pointer} ({err})"
    return None


def last_build() -> LastBuild | None:
    data = fsio.read_json_object(LAST_BUILD, error=RecordError, fix="run `hubsync build MANIFEST` again")
    if data is None:
        return None
    try:
        return LastBuild(Path(data["manifest"]), Path(data["output"]))
    except (KeyError, TypeError):
        raise RecordError(f"{LAST_BUILD} is damaged: run `hubsync build MANIFEST` again") from None
