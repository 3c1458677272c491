"""`hubsync build`: manifest -> resolve -> read -> compare -> plan -> write (+ card, provenance) -> verify.

This module only strings the stages together; each stage lives in its own module. `prepare` stops after the
plan (that is `hubsync plan`); `build` goes on and writes.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hubsync import __version__
from hubsync.card import CardInputs, render_card
from hubsync.compare import TensorDiff, compare
from hubsync.errors import BuildError
from hubsync.finetune import FinetuneInventory, is_weight_file, read_finetune
from hubsync.manifest import Manifest, load_manifest
from hubsync.plan import Plan, make_plan, output_dtype_for
from hubsync.resolve import BaseInventory, read_json_files, resolve_base
from hubsync.write import (
    OutputLock,
    WrittenFile,
    new_staging,
    remove_stale_staging,
    swap_into_place,
    write_files,
    write_json_atomic,
)

log = logging.getLogger("hubsync")
PROVENANCE = "hubsync.json"
LAST_BUILD = Path(".hubsync") / "last-build.json"
MAX_JSON_BYTES = 5_000_000


@dataclass(frozen=True)
class Prepared:
    manifest: Manifest
    manifest_path: Path
    base: BaseInventory
    finetune: FinetuneInventory
    diffs: dict[str, TensorDiff]
    plan: Plan


@dataclass(frozen=True)
class BuildResult:
    output: Path
    plan: Plan
    files: tuple[WrittenFile, ...]
    record: dict[str, Any]


def _read_base_json(base: BaseInventory) -> dict[str, dict[str, Any]]:
    index = [base.index_name] if base.index_name else []
    return read_json_files(base.folder, base.files, max_bytes=MAX_JSON_BYTES, always=index)


def _same_files(base: BaseInventory, finetune: FinetuneInventory) -> frozenset[str]:
    same = set()
    for path in set(base.files) & set(finetune.files):
        if is_weight_file(path):
            continue
        a, b = base.folder / path, finetune.folder / path
        if a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes():
            same.add(path)
    return frozenset(same)


def prepare(manifest_path: Path, *, allow_untuned_changes: bool = False) -> Prepared:
    """Everything up to and including the plan; writes nothing."""
    return prepare_manifest(
        load_manifest(manifest_path), manifest_path, allow_untuned_changes=allow_untuned_changes
    )


def prepare_manifest(
    manifest: Manifest, manifest_path: Path, *, allow_untuned_changes: bool = False
) -> Prepared:
    base = resolve_base(manifest.base)
    finetune = read_finetune(
        manifest.finetune,
        base.checkpoint.tensors,
        base.config,
        base_repo=base.repo_id,
        base_revision=base.sha,
    )
    log.debug("comparing %d fine-tune tensor(s) with the base", len(finetune.base_names))
    diffs = compare(base, finetune, output_dtype_for(manifest))
    plan = make_plan(
        manifest,
        base,
        finetune,
        diffs,
        base_json=_read_base_json(base),
        finetune_same_files=_same_files(base, finetune),
        allow_untuned_changes=allow_untuned_changes,
    )
    return Prepared(manifest, manifest_path, base, finetune, diffs, plan)


def card_inputs(prep: Prepared, verification: dict[str, Any] | None) -> CardInputs:
    manifest = prep.manifest
    base_card = (
        (prep.base.folder / "README.md").read_text(encoding="utf-8")
        if "README.md" in prep.base.files
        else None
    )
    return CardInputs(
        repo_id=manifest.push.repo if manifest.push else None,
        base_repo=prep.base.repo_id,
        base_sha=prep.base.sha,
        base_card=base_card,
        manifest_text=prep.manifest_path.read_text(encoding="utf-8"),
        license=manifest.card.license,
        tags=manifest.card.tags,
        datasets=manifest.card.datasets,
        language=manifest.card.language,
        description=manifest.card.description,
        prefixes=tuple(asdict(p) for p in prep.plan.prefixes),
        tuned_dtypes=tuple(sorted({t.dtype for t in prep.plan.tuned_tensors})),
        has_processor=any(
            f in prep.base.files for f in ("preprocessor_config.json", "processor_config.json")
        ),
        remote_code=any(f.endswith(".py") for f in prep.base.files),
        verification=verification,
    )


def provenance(
    prep: Prepared, written: list[WrittenFile] | tuple[WrittenFile, ...], card: CardInputs
) -> dict[str, Any]:
    """hubsync.json: how this folder was built. Deterministic: the same inputs give the same bytes."""
    plan = prep.plan
    return {
        "hubsync_version": __version__,
        "manifest_path": str(prep.manifest_path.resolve()),
        "manifest": prep.manifest.to_record(),
        "base": {
            "repo": prep.base.repo_id,
            "revision": prep.base.revision,
            "sha": prep.base.sha,
            "path": None if prep.base.repo_id else str(prep.base.folder),
        },
        "finetune": {
            "folder": str(prep.finetune.folder),
            "format": "peft" if prep.finetune.derived_tuned is not None else prep.finetune.checkpoint.format,
        },
        "files": {
            w.path: {"sha256": w.sha256, "size": w.size, "source": w.source}
            for w in sorted(written, key=lambda w: w.path)
        },
        "tuned_tensors": {
            t.name: {"from": t.finetune_name, "dtype": t.dtype, "shard": t.shard} for t in plan.tuned_tensors
        },
        "prefixes": [asdict(p) for p in plan.prefixes],
        "notes": list(plan.notes),
        "card_inputs": asdict(card),
        "verification": None,
    }


def build(
    manifest_path: Path,
    *,
    allow_untuned_changes: bool = False,
    record_last_build: bool = True,
) -> BuildResult:
    """Write the output folder (without verification; the CLI runs verify afterwards)."""
    prep = prepare(manifest_path, allow_untuned_changes=allow_untuned_changes)
    prep.plan.raise_for_problems()
    output = prep.manifest.output.dir
    if output.exists() and not output.is_dir():
        raise BuildError(f"output.dir {output} exists and is not a folder: choose another output.dir")
    with OutputLock(output):
        remove_stale_staging(output)
        staging = new_staging(output)
        try:
            card = card_inputs(prep, verification=None)
            written = write_files(
                staging,
                prep.plan,
                prep.base,
                prep.finetune,
                link=prep.manifest.output.link,
                card_text=render_card(card),
            )
            record = provenance(prep, written, card)
            write_json_atomic(staging / PROVENANCE, record)
            swap_into_place(staging, output)
        except BaseException:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
            raise
    if record_last_build:
        _record_last_build(manifest_path, output)
    log.info(
        "built %s: %d file(s), %d tensor(s) from the fine-tune",
        output,
        len(written),
        len(prep.plan.tuned_tensors),
    )
    return BuildResult(output, prep.plan, tuple(written), record)


def _record_last_build(manifest_path: Path, output: Path) -> None:
    """So that a bare `hubsync push` in this directory knows what to push."""
    try:
        LAST_BUILD.parent.mkdir(exist_ok=True)
        tmp = LAST_BUILD.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({"manifest": str(manifest_path.resolve()), "output": str(output)}, indent=2) + "\n"
        )
        os.replace(tmp, LAST_BUILD)
    except OSError as err:  # a read-only working directory must not fail a finished build
        log.warning("could not record the last build in %s (%s)", LAST_BUILD, err)


def load_record(folder: Path) -> dict[str, Any]:
    path = folder / PROVENANCE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BuildError(
            f"{folder} has no {PROVENANCE}: it was not built by hubsync; run `hubsync build` first"
        ) from None
    except (OSError, ValueError) as err:
        raise BuildError(f"{path} cannot be read ({err}): rebuild with `hubsync build`") from None
    return data if isinstance(data, dict) else {}
