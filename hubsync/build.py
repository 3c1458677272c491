"""`hubsync build`: manifest -> resolve -> read -> compare -> plan -> write (+ card, record) -> verify -> swap.

This module only strings the stages together; each stage lives in its own module. `prepare` stops after the
plan (that is `hubsync plan`); `build` goes on, writes into a staging folder, verifies it there, and swaps it
into `output.dir` only when verification passed (or was skipped with `verify=False`), all under the output's
lock: a build that fails verification leaves the previous output in place.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubsync import __version__
from hubsync.card import CardInputs, render_card
from hubsync.compare import TensorDiff, compare
from hubsync.errors import BuildError, VerifyError
from hubsync.finetune import FinetuneInventory, is_weight_file, read_finetune
from hubsync.manifest import Manifest, load_manifest
from hubsync.plan import Plan, make_plan, output_dtype_for
from hubsync.record import (
    BaseRef,
    BuildRecord,
    FileEntry,
    LocalRecord,
    TunedTensor,
    remember_last_build,
    save,
    save_local,
)
from hubsync.resolve import BaseInventory, read_json_files, resolve_base
from hubsync.write import (
    OutputLock,
    WrittenFile,
    new_staging,
    remove_stale_staging,
    swap_into_place,
    write_files,
)

if TYPE_CHECKING:
    from hubsync.verify import Report

log = logging.getLogger("hubsync")
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
    record: BuildRecord
    report: Report | None  # None when built with verify=False
    failed_output: Path | None = None  # where a build that failed verification was left for inspection


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


def card_inputs(prep: Prepared) -> CardInputs:
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
        manifest=manifest.to_data(prep.manifest_path.resolve().parent),
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
        hub_url=_hub_url(),
    )


def _hub_url() -> str:
    """The Hub the card links to: the endpoint huggingface_hub uses (HF_ENDPOINT, read once at its import)."""
    from huggingface_hub import constants

    return str(constants.ENDPOINT).rstrip("/")


def make_record(prep: Prepared, written: list[WrittenFile], card: CardInputs) -> BuildRecord:
    """hubsync.json for this build. Deterministic, and free of local paths: the same inputs give the same bytes
    on any machine."""
    root = prep.manifest_path.resolve().parent
    data = prep.manifest.to_data(root)
    base = prep.base
    return BuildRecord(
        hubsync_version=__version__,
        manifest=data,
        manifest_file=prep.manifest_path.name,
        base=BaseRef(base.repo_id, base.revision, base.sha, data["base"].get("path")),
        finetune_path=str(data["finetune"]["path"]),
        finetune_format="peft"
        if prep.finetune.derived_tuned is not None
        else prep.finetune.checkpoint.format,
        files={w.path: FileEntry(w.sha256, w.size, w.source) for w in sorted(written, key=lambda w: w.path)},
        tuned_tensors={
            t.name: TunedTensor(t.finetune_name or t.name, t.dtype, t.shard) for t in prep.plan.tuned_tensors
        },
        prefixes=tuple(asdict(p) for p in prep.plan.prefixes),
        notes=tuple(prep.plan.notes),
        card_inputs=card.to_record(),
    )


def build(
    manifest_path: Path,
    *,
    verify: bool = False,
    allow_untuned_changes: bool = False,
    record_last_build: bool = True,
) -> BuildResult:
    """Write the output folder; with `verify`, verify it before it replaces the previous output."""
    prep = prepare(manifest_path, allow_untuned_changes=allow_untuned_changes)
    prep.plan.raise_for_problems()
    output = prep.manifest.output.dir
    if output.exists() and not output.is_dir():
        raise BuildError(f"output.dir {output} exists and is not a folder: choose another output.dir")
    with OutputLock(output):
        remove_stale_staging(output)
        staging = new_staging(output)
        try:
            result = _write_and_verify(prep, staging, verify=verify)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    _finish(prep, result, record_last_build=record_last_build)
    return result


def _write_and_verify(prep: Prepared, staging: Path, *, verify: bool) -> BuildResult:
    output = prep.manifest.output.dir
    card = card_inputs(prep)
    written = write_files(
        staging,
        prep.plan,
        prep.base,
        prep.finetune,
        link=prep.manifest.output.link,
        card_text=render_card(card),
    )
    record = make_record(prep, written, card)
    save(staging, record)
    report = None
    if verify:
        record, report = _verify_staging(prep, staging, record)
        if not report.passed:
            failed = _keep_failed(staging, output)
            return BuildResult(output, prep.plan, tuple(written), record, report, failed_output=failed)
    swap_into_place(staging, output)
    return BuildResult(output, prep.plan, tuple(written), record, report)


def _verify_staging(prep: Prepared, staging: Path, record: BuildRecord) -> tuple[BuildRecord, Report]:
    from hubsync.verify import record_verification, run_checks, subject_for_build

    subject = subject_for_build(
        staging,
        record,
        prep.manifest,
        prep.manifest_path,
        base_folder=prep.base.folder,
        finetune_folder=prep.finetune.folder,
    )
    report, current = run_checks(subject)
    report.folder = prep.manifest.output.dir
    return record_verification(staging, record, report, current), report


def _keep_failed(staging: Path, output: Path) -> Path:
    """A build that failed verification never replaces the output; it is kept beside it for inspection."""
    failed = output.with_name(f"{output.name}.failed")
    shutil.rmtree(failed, ignore_errors=True)
    staging.rename(failed)
    return failed


def _finish(prep: Prepared, result: BuildResult, *, record_last_build: bool) -> None:
    if result.failed_output is not None:
        return
    report = result.report
    save_local(
        result.output,
        LocalRecord(
            content_id=result.record.content_id,
            manifest_path=str(prep.manifest_path.resolve()),
            finetune_folder=str(prep.finetune.folder),
            base_folder=str(prep.base.folder),
            timings_s={k: round(v, 3) for k, v in report.timings.items()} if report else {},
            peak_memory_bytes=dict(report.memory) if report else {},
        ),
    )
    if record_last_build:
        warning = remember_last_build(prep.manifest_path, result.output)
        if warning:
            log.warning("%s", warning)
    log.info(
        "built %s: %d file(s), %d tensor(s) from the fine-tune",
        result.output,
        len(result.files),
        len(result.plan.tuned_tensors),
    )


def failed_verification(result: BuildResult) -> VerifyError:
    """The error a build that failed verification ends with."""
    from hubsync.verify import summary_line

    assert result.report is not None
    kept = f"; the failed build is in {result.failed_output}" if result.failed_output else ""
    return VerifyError(
        f"the build failed verification ({summary_line(result.report)}): {result.output} was left as it was"
        f"{kept}; fix the fine-tune or the manifest and build again"
    )
