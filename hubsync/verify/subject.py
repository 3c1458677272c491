"""What is verified: a build folder, its record, the base and fine-tune it came from, and the settings.

Settings that decide whether code runs (`trust_remote_code`) come from the manifest or the command line,
never from the folder being verified: a folder is data until it has been checked against its record and the
pinned base.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubsync.errors import VerifyError
from hubsync.manifest import Manifest, load_manifest
from hubsync.record import BuildRecord, LocalRecord, load, load_local

DEFAULT_PROMPT = "Describe the image."


@dataclass(frozen=True)
class Subject:
    folder: Path
    record: BuildRecord
    base_folder: Path
    finetune_folder: Path | None
    trust_remote_code: bool
    device: str
    prompt: str
    image: Path | None
    manifest_path: Path | None = None
    # where models run: {"python": path} | {"requirements": [...]} | {} (hubsync's own interpreter)
    runtime: Mapping[str, Any] = field(default_factory=dict)
    timeout: float = 3600.0
    max_memory: Mapping[str, str] | None = (
        None  # an accelerate budget that forces offload (tests, small GPUs)
    )

    @property
    def tuned_prefixes(self) -> tuple[str, ...]:
        return self.record.tuned_prefixes


def subject_for_build(
    folder: Path,
    record: BuildRecord,
    manifest: Manifest,
    manifest_path: Path,
    *,
    base_folder: Path,
    finetune_folder: Path,
    runtime: Mapping[str, Any] | None = None,
) -> Subject:
    """The subject of a build that was just written (everything is known; nothing is read back). `runtime`
    overrides the manifest's (the command line's --verify-python / --verify-requirement)."""
    return Subject(
        folder=folder,
        record=record,
        base_folder=base_folder,
        finetune_folder=finetune_folder,
        trust_remote_code=manifest.verify.trust_remote_code,
        device=manifest.verify.device,
        prompt=manifest.verify.prompt or DEFAULT_PROMPT,
        image=manifest.verify.image,
        manifest_path=manifest_path,
        runtime=dict(runtime) if runtime else runtime_of(manifest),
        timeout=float(manifest.verify.timeout),
    )


def runtime_of(manifest: Manifest) -> dict[str, Any]:
    if manifest.verify.python is not None:
        return {"python": str(manifest.verify.python)}
    if manifest.verify.requirements is not None:
        return {"requirements": list(manifest.verify.requirements)}
    return {}


def load_subject(
    target: Path, *, trust_remote_code: bool | None = None, python: Path | None = None
) -> Subject:
    """A build folder, or a manifest (its output.dir). The manifest, found through the folder's local record
    when only the folder is given, supplies the settings; `trust_remote_code` and `python` from the command
    line win. Without a manifest, the runtime the folder was last verified with (local record) is reused."""
    manifest_path: Path | None = None
    if target.is_file():
        manifest_path, target = target, load_manifest(target).output.dir
    if not target.is_dir():
        raise VerifyError(f"{target} is neither a build folder nor a manifest: run `hubsync build` first")
    target = target.resolve()  # one name for the folder, so that a build and a verify share its lock
    record = load(target)
    local = load_local(target, record)
    manifest_path = manifest_path or _manifest_of(local)
    manifest = _manifest_for(manifest_path, target)
    trust = trust_remote_code
    if trust is None:
        trust = manifest.verify.trust_remote_code if manifest is not None else False
    return Subject(
        folder=target,
        record=record,
        base_folder=_base_folder(record, local, target),
        finetune_folder=_existing(local.finetune_folder if local else None),
        trust_remote_code=trust,
        device=manifest.verify.device if manifest else "auto",
        prompt=(manifest.verify.prompt if manifest else None) or DEFAULT_PROMPT,
        image=manifest.verify.image if manifest else None,
        manifest_path=manifest_path if manifest is not None else None,
        runtime=_runtime(python, manifest, local),
        timeout=float(manifest.verify.timeout) if manifest else 3600.0,
    )


def _runtime(python: Path | None, manifest: Manifest | None, local: LocalRecord | None) -> dict[str, Any]:
    if python is not None:
        return {"python": str(python)}
    if manifest is not None:
        return runtime_of(manifest)
    used = dict(local.runtime or {}) if local else {}
    if used.get("kind") == "python" and used.get("python"):
        return {"python": used["python"]}
    if used.get("kind") == "requirements" and used.get("requirements"):
        return {"requirements": list(used["requirements"])}
    return {}


def _manifest_of(local: LocalRecord | None) -> Path | None:
    return Path(local.manifest_path) if local and local.manifest_path else None


def _manifest_for(path: Path | None, folder: Path) -> Manifest | None:
    """The manifest that built `folder`, if it still exists and still builds into it."""
    if path is None or not path.is_file():
        return None
    manifest = load_manifest(path)
    return manifest if manifest.output.dir.resolve() == folder.resolve() else None


def _existing(path: str | None) -> Path | None:
    return Path(path) if path and Path(path).is_dir() else None


def _base_folder(record: BuildRecord, local: LocalRecord | None, folder: Path) -> Path:
    if record.base.repo and record.base.sha:
        from hubsync.resolve import download_base

        return download_base(record.base.repo, record.base.sha)[1]
    found = _existing(local.base_folder if local else None)
    if found is None:
        raise VerifyError(
            f"the local base folder that {folder} was built from is unknown or gone: "
            "verify through the manifest (`hubsync verify MANIFEST`) with the base folder in place"
        )
    return found
