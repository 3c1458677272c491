"""Checks on the build's files, before any of its code may run: every file is what the record says, the
remote code is the pinned base's byte for byte, everything a loader needs is there, and `auto_map` and the
config pairs are sound. Nothing here imports a model library.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hubsync import fsio
from hubsync.finetune import is_weight_file
from hubsync.formats import weight_copy_kind
from hubsync.plan import CONFIG_PAIRS, auto_map_refs, dotted_get
from hubsync.record import RECORD_FILE, hash_files
from hubsync.resolve import read_json_files
from hubsync.tensors import sha256_file
from hubsync.verify.report import Report
from hubsync.verify.subject import Subject

NOT_LOADER_FILES = ("README.md", ".gitattributes")


def check_hashes(subject: Subject, report: Report) -> dict[str, str]:
    """Every file's sha256 against hubsync.json; returns the current hashes."""
    recorded = {path: entry.sha256 for path, entry in subject.record.files.items()}
    current = hash_files(subject.folder)
    changed = sorted(k for k in recorded if current.get(k) != recorded[k])
    extra = sorted(set(current) - set(recorded))
    problems = [f"{k} changed since the build" if k in current else f"{k} is missing" for k in changed]
    problems += [f"{k} was added after the build" for k in extra]
    report.add(
        "files match hubsync.json",
        not problems,
        problems[0] if problems else f"sha256 of all {len(current)} file(s) match the build record",
        problems,
    )
    return current


def check_code_is_the_base(subject: Subject, report: Report, current: Mapping[str, str]) -> None:
    """Only code that comes byte for byte from the pinned base revision may ever be executed."""
    code = sorted(p for p in current if p.endswith(".py"))
    if not code:
        return
    foreign = []
    for path in code:
        base_file = subject.base_folder / path
        if not base_file.is_file():
            foreign.append(f"{path} is not a file of the base revision")
        elif sha256_file(base_file) != current[path]:
            foreign.append(f"{path} differs from the base revision's")
    report.add(
        "code is the base's",
        not foreign,
        foreign[0] + ": only the pinned base's code may run; rebuild the folder"
        if foreign
        else f"all {len(code)} .py file(s) are byte-identical to the pinned base revision's",
        foreign,
    )


def check_files(subject: Subject, report: Report) -> None:
    out_files = set(fsio.list_files(subject.folder))
    jsons = _json_files(subject.folder)
    _check_present(subject, report, out_files)
    _check_auto_map(report, jsons, out_files)
    _check_config_pairs(report, jsons)


def _json_files(folder: Path) -> dict[str, dict[str, Any]]:
    names = [p.name for p in folder.glob("*.json") if p.name != RECORD_FILE]
    return read_json_files(folder, names)


def _check_present(subject: Subject, report: Report, out_files: set[str]) -> None:
    needed = [
        f
        for f in fsio.list_files(subject.base_folder)
        if not is_weight_file(f) and f not in NOT_LOADER_FILES and weight_copy_kind(f) is None
    ]
    missing = [f for f in needed if f not in out_files]
    report.add(
        "files present",
        not missing,
        f"{len(missing)} file(s) of the base revision are missing: {', '.join(missing)}"
        if missing
        else f"all {len(needed)} non-weight file(s) of the base revision are present",
        missing,
    )


def _check_auto_map(report: Report, jsons: dict[str, dict[str, Any]], out_files: set[str]) -> None:
    bad: list[str] = []
    for name, data in jsons.items():
        for ref in auto_map_refs(data):
            if "--" in ref:
                bad.append(
                    f"{name}: '{ref}' runs code from another repo (the 'repo--' form), not the local files"
                )
                continue
            module = ref.rsplit(".", 1)[0]
            if f"{module.replace('.', '/')}.py" not in out_files:
                bad.append(f"{name}: '{ref}' needs {module}.py, which is not in the folder")
    report.add(
        "auto_map is local",
        not bad,
        bad[0] if bad else "every auto_map entry points at a local .py file",
        bad,
    )


def _check_config_pairs(report: Report, jsons: dict[str, dict[str, Any]]) -> None:
    config = jsons.get("config.json", {})
    pairs = CONFIG_PAIRS.get(str(config.get("model_type")), ())
    if not pairs:
        return
    disagree = []
    for cfg_key, proc_file, proc_key in pairs:
        a, b = dotted_get(config, cfg_key), dotted_get(jsons.get(proc_file, {}), proc_key)
        if a is not None and b is not None and a != b:
            disagree.append(f"config.json {cfg_key}={a!r} but {proc_file} {proc_key}={b!r}")
    report.add(
        "config and processor config agree",
        not disagree,
        disagree[0] if disagree else "the architecture's paired keys agree",
        disagree,
    )
