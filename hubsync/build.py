"""`hubsync build`: manifest -> resolve -> read -> compare -> plan -> write (+ card, record) -> verify -> swap.

This module only strings the stages together; each stage lives in its own module. `prepare` stops after the
plan (that is `hubsync plan`); `build` goes on, writes into a staging folder, verifies it there, and swaps it
into `output.dir` only when verification passed (or was skipped with `verify=False`), all under the output's
lock: a build that fails verification leaves the previous output in place.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubsync import __version__, fsio, progress
from hubsync.card import CardInputs, render_card
from hubsync.compare import TensorDiff, iter_diffs
from hubsync.errors import FinetuneError, VerifyError
from hubsync.finetune import FinetuneInventory, is_weight_file, locate, read_finetune
from hubsync.manifest import Manifest, load_manifest
from hubsync.plan import Plan, certain_copies, make_plan, output_dtype_for
from hubsync.prefill import Place
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
from hubsync.resolve import BaseInventory, Weights, read_json_files, resolve_base
from hubsync.safety import check_output, check_replace, failed_folder
from hubsync.sample import sample_diffs, unchecked_diffs
from hubsync.tuned import first_match
from hubsync.write import (
    HeadStart,
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
        a, b = base.folder / path, finetune.folder / path
        if is_weight_file(path) or not a.is_file():  # not downloaded (a plan from the base's headers)
            continue
        if a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes():
            same.add(path)
    return frozenset(same)


def prepare(
    manifest_path: Path, *, allow_untuned_changes: bool = False, weights: Weights = "all"
) -> Prepared:
    """Everything up to and including the plan; writes nothing, and refuses an output.dir that breaks the
    output-safety rule before anything is downloaded. `weights="headers"` downloads none of the base's weights
    (unless cached): the plan is made from their headers, see hubsync.sample."""
    manifest = load_manifest(manifest_path)
    check_output(manifest, manifest_path)
    return prepare_manifest(
        manifest, manifest_path, allow_untuned_changes=allow_untuned_changes, weights=weights
    )


def check_local_inputs(manifest: Manifest) -> None:
    """The inputs on this machine, checked before anything is fetched: a wrong path fails in a second, not
    after a download of the base."""
    folder = locate(manifest.finetune)
    for path in manifest.finetune.keep_files:
        if not (folder / path).is_file():
            raise FinetuneError(
                f"finetune.keep_files names {path}, which {folder} does not have: check `finetune.keep_files`"
            )


def prepare_manifest(
    manifest: Manifest,
    manifest_path: Path,
    *,
    allow_untuned_changes: bool = False,
    weights: Weights = "all",
    head: HeadStart | None = None,
) -> Prepared:
    """`prepare` for a loaded manifest. With `head` (a build's staging folder), the comparison already writes
    there: the tuned tensors it produces, and the base shards the plan will copy whatever it finds."""
    check_local_inputs(manifest)
    base = resolve_base(manifest.base, weights=weights)
    finetune = read_finetune(
        manifest.finetune,
        base.checkpoint.tensors,
        base.config,
        base_repo=base.repo_id,
        base_revision=base.sha,
    )
    diffs = (
        _compare(manifest, base, finetune, head)
        if base.remote is None
        else _diffs_from_headers(manifest, base, finetune)
    )
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


def _compare(
    manifest: Manifest, base: BaseInventory, finetune: FinetuneInventory, head: HeadStart | None
) -> dict[str, TensorDiff]:
    """compare.iter_diffs, with its progress shown (bytes of the fine-tune's tensors). With `head`, the shards
    the plan will copy anyway are copied meanwhile, and the tuned tensors (only those are ever taken from the
    fine-tune) are put in place for the write."""
    compared = [*finetune.base_names, *finetune.tied]  # a tied copy is compared too (with its tensor)
    sizes = {ft: finetune.checkpoint.tensors[ft].nbytes for ft in compared}
    log.debug("comparing %d fine-tune tensor(s) with the base", len(sizes))
    tuned = manifest.finetune.tuned if manifest.finetune.tuned is not None else finetune.derived_tuned
    pick = output_dtype_for(manifest)
    kept = None
    if head is not None and tuned is not None:
        head.copy_early(base, certain_copies(base, pick, tuned))
        kept = head.kept
        kept.places.update(_places(base, pick, tuned, head.staging))
    diffs = {}
    with progress.stage("compare", sum(sizes.values())) as shown:
        for diff in iter_diffs(base, finetune, pick, keep=kept if kept is not None and kept.places else None):
            diffs[diff.name] = diff
            shown.advance(sizes.get(diff.source, 0))
    if kept is not None:
        log.debug("compare put %d bytes of tuned tensors in place", kept.kept_bytes)
    return diffs


def _places(
    base: BaseInventory, pick: Callable[[str], str], tuned: tuple[str, ...], folder: Path
) -> dict[str, Place]:
    """Where each tuned tensor's bytes will be in the output, for the shards whose layout is the base's (no
    tensor changes dtype): the same offset in the shard of the same name."""
    places = {}
    for path, header in base.checkpoint.headers.items():
        if any(pick(t.dtype) != t.dtype for t in header.tensors.values()):
            continue  # the shard gets a new header and new offsets: the writer lays it out
        shard = base.rel(path)
        for name, t in header.tensors.items():
            if first_match(name, tuned) is not None:
                places[name] = Place(folder / shard, t.absolute_range[0], t.nbytes, header.file_size)
    return places


def _diffs_from_headers(
    manifest: Manifest, base: BaseInventory, finetune: FinetuneInventory
) -> dict[str, TensorDiff]:
    """Without the base's bytes: the declared tuned tensors are taken unchecked, every other fine-tune tensor
    is compared on a sample (a frozen part that changed shows there); with nothing declared, all are sampled."""
    tuned = manifest.finetune.tuned if manifest.finetune.tuned is not None else finetune.derived_tuned
    mapped = set(finetune.base_names.values())
    names = [n for n in base.checkpoint.tensors if n in mapped]
    inside = [n for n in names if tuned is not None and first_match(n, tuned) is not None]
    pick = output_dtype_for(manifest)
    diffs = {
        **unchecked_diffs(base, finetune, pick, inside),
        **sample_diffs(base, finetune, pick, [n for n in names if n not in set(inside)]),
    }
    return {n: diffs[n] for n in names if n in diffs}


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
    runtime: Mapping[str, Any] | None = None,
) -> BuildResult:
    """Write the output folder; with `verify`, verify it before it replaces the previous output. Everything
    from the comparison on happens under the output's lock, in a staging folder: compare already writes the
    tuned tensors there. `runtime`
    ({"python": path} or {"requirements": [...]}) overrides the manifest's verification runtime."""
    manifest = load_manifest(manifest_path)
    check_output(manifest, manifest_path)  # before anything is downloaded or written
    output = manifest.output.dir
    with OutputLock(output):
        remove_stale_staging(output)
        staging = new_staging(output)
        try:
            with HeadStart(staging, manifest.output.link) as head:
                prep = prepare_manifest(
                    manifest, manifest_path, allow_untuned_changes=allow_untuned_changes, head=head
                )
                prep.plan.raise_for_problems()
                result = _write_and_verify(prep, staging, verify=verify, head=head, runtime=runtime)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    _finish(prep, result, record_last_build=record_last_build)
    return result


def _write_and_verify(
    prep: Prepared,
    staging: Path,
    *,
    verify: bool,
    head: HeadStart | None = None,
    runtime: Mapping[str, Any] | None = None,
) -> BuildResult:
    output = prep.manifest.output.dir
    card = card_inputs(prep)
    with progress.stage("write", _planned_bytes(prep)) as shown:
        written = write_files(
            staging,
            prep.plan,
            prep.base,
            prep.finetune,
            link=prep.manifest.output.link,
            card_text=render_card(card),
            on_file=lambda w: shown.advance(w.size),
            head=head,
        )
    if head is not None:
        head.close()  # everything is written and on disk; its files are the output's now
    record = make_record(prep, written, card)
    save(staging, record)
    report = None
    if verify:
        record, report = _verify_staging(prep, staging, record, runtime)
        if not report.passed:
            failed = _keep_failed(staging, output)
            return BuildResult(output, prep.plan, tuple(written), record, report, failed_output=failed)
    check_replace(output, what="output.dir")  # again, now: the folder may have changed since the plan
    swap_into_place(staging, output)
    return BuildResult(output, prep.plan, tuple(written), record, report)


def _planned_bytes(prep: Prepared) -> int:
    """About what the write will put on disk: each file at its source's size (a progress total, not a promise)."""
    total = 0
    for item in prep.plan.files:
        folder = prep.finetune.folder if item.source == "finetune" else prep.base.folder
        source = folder / item.path
        total += source.stat().st_size if item.source != "generated" and source.is_file() else 0
    return total


def _verify_staging(
    prep: Prepared, staging: Path, record: BuildRecord, runtime: Mapping[str, Any] | None
) -> tuple[BuildRecord, Report]:
    from hubsync.verify import record_verification, run_checks, subject_for_build

    subject = subject_for_build(
        staging,
        record,
        prep.manifest,
        prep.manifest_path,
        base_folder=prep.base.folder,
        finetune_folder=prep.finetune.folder,
        runtime=runtime,
    )
    report, current = run_checks(subject)
    report.folder = prep.manifest.output.dir
    return record_verification(staging, record, report, current), report


def _keep_failed(staging: Path, output: Path) -> Path:
    """A build that failed verification never replaces the output; it is kept beside it for inspection."""
    failed = failed_folder(output)
    check_replace(failed, what="the folder for a failed build")
    shutil.rmtree(failed, ignore_errors=True)
    fsio.rename(staging, failed)
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
            runtime=report.local_runtime if report else None,
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
    first = result.report.failures[0] if result.report.failures else None
    if first is not None and first.figures.get("blame") == "base":
        # the runtime cannot run the base either: the fix is the runtime, not the fine-tune
        return VerifyError(f"{first.detail} ({result.output} was left as it was{kept})")
    return VerifyError(
        f"the build failed verification ({summary_line(result.report)}): {result.output} was left as it was"
        f"{kept}; fix the fine-tune or the manifest and build again"
    )
