"""`hubsync verify`: prove that a build loads and runs before anyone sees it.

The stages, cheapest first, each in its own module: `files` (every file is what the record says, the code is the
pinned base's, everything a loader needs is there), `weights` (from headers and bytes, without loading a model),
then `run` (the base and the build loaded and run). Model code runs only after the file checks pass. The
verification (results, never timings) and the sha256 of every file it covered go into hubsync.json, and the card
is re-rendered with the results; both are swapped in together, so a kill leaves the old pair or the new.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

from hubsync import __version__, progress
from hubsync.errors import VerifyError
from hubsync.record import MODEL_LOADS, BuildRecord, FileEntry, LocalRecord, load_local, save, save_local
from hubsync.safety import check_replace
from hubsync.verify.files import check_code_is_the_base, check_files, check_hashes
from hubsync.verify.report import Report, render_report, summary_line
from hubsync.verify.subject import Subject, load_subject, subject_for_build
from hubsync.verify.weights import check_weights

__all__ = [
    "Report",
    "Subject",
    "load_subject",
    "record_verification",
    "render_report",
    "run_checks",
    "subject_for_build",
    "summary_line",
    "verify",
]

# A failure of any of these means the folder is not what was built, or cannot be: no model code may run.
_GATES = ("files match hubsync.json", "code is the base's", "weights readable", "tensor layout")


def run_checks(subject: Subject, *, run_models: bool = True) -> tuple[Report, dict[str, str]]:
    """Every check on `subject`; returns the report and the sha256 of every file it covered."""
    report = Report(folder=subject.folder)
    report.versions = {"hubsync": __version__, "python": platform.python_version()}
    with progress.stage("verify", unit="step"):  # each step shows under it (Report.timed)
        with report.timed("files"):
            current = check_hashes(subject, report)
            check_code_is_the_base(subject, report, current)
            check_files(subject, report)
        with report.timed("weights"):
            check_weights(subject, report)
        if run_models:
            _run_models(subject, report)
    return report, current


def _run_models(subject: Subject, report: Report) -> None:
    blocked = [c.name for c in report.failures if c.name in _GATES]
    if blocked:
        report.add(MODEL_LOADS, None, f"not attempted: {blocked[0]} failed (see above)")
        return
    from hubsync.verify.run import run_models

    report.local_runtime = run_models(subject, report).to_record()


def record_verification(
    folder: Path, record: BuildRecord, report: Report, current: dict[str, str]
) -> BuildRecord:
    """Re-render the card with the results and write it and hubsync.json into `folder` (a staging folder:
    the caller swaps it in). Returns the record as written."""
    from hubsync.card import CardInputs, render_card
    from hubsync.fsio import write_bytes

    covered = dict(current)
    if record.card_inputs:
        draft = report.verification(covered).to_json()
        card = render_card(CardInputs.from_record(record.card_inputs, verification=draft)).encode("utf-8")
        (folder / "README.md").unlink(missing_ok=True)  # may be a hardlink to the previous build's card
        sha = write_bytes(folder / "README.md", card)
        covered["README.md"] = sha
        record = record.with_file("README.md", FileEntry(sha, len(card), "generated"))
    record = record.with_verification(report.verification(covered))
    save(folder, record)
    return record


def verify(
    target: Path,
    *,
    trust_remote_code: bool | None = None,
    python: Path | None = None,
    run_models: bool = True,
    update_record: bool = True,
) -> Report:
    """Verify a build folder (or a manifest's output) and record the result in it."""
    from hubsync.write import OutputLock, remove_stale_staging

    subject = load_subject(target, trust_remote_code=trust_remote_code, python=python)
    if not update_record:  # reads only: no lock, nothing written beside the folder
        return run_checks(subject, run_models=run_models)[0]
    # before the lock: its file beside the folder is already a write (a cache must see none)
    check_replace(subject.folder, what="the verified folder", error=VerifyError)
    with OutputLock(subject.folder):  # no build may swap the folder while it is verified and recorded
        remove_stale_staging(subject.folder)
        report, current = run_checks(subject, run_models=run_models)
        record = _record_in_place(subject, report, current)
        _save_local(subject, record, report)
    return report


def _record_in_place(subject: Subject, report: Report, current: dict[str, str]) -> BuildRecord:
    """Card and hubsync.json written into a relinked copy of the folder, swapped in at once: a kill leaves
    the old pair or the new one, never one of each."""
    from hubsync.write import relink_into_staging, swap_into_place

    staging = relink_into_staging(subject.folder)
    try:
        record = record_verification(staging, subject.record, report, current)
        swap_into_place(staging, subject.folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def _save_local(subject: Subject, record: BuildRecord, report: Report) -> None:
    previous = load_local(subject.folder, subject.record)
    save_local(
        subject.folder,
        LocalRecord(
            content_id=record.content_id,
            manifest_path=str(subject.manifest_path) if subject.manifest_path else None,
            finetune_folder=str(subject.finetune_folder) if subject.finetune_folder else None,
            base_folder=str(subject.base_folder),
            runtime=report.local_runtime or (previous.runtime if previous else None),
            timings_s={k: round(v, 3) for k, v in report.timings.items()},
            peak_memory_bytes=dict(report.memory),
        ),
    )
