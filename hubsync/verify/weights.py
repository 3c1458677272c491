"""Checks on the weights from headers and bytes, without loading a model: the layout is the base's, tuned
tensors are the fine-tune's (cast), everything else is byte-identical to the base, no NaN or Inf."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hubsync import fsio
from hubsync import tensors as T
from hubsync.errors import HubsyncError, VerifyError
from hubsync.plan import output_dtype
from hubsync.tuned import first_match
from hubsync.verify.report import Report
from hubsync.verify.subject import Subject


def check_weights(subject: Subject, report: Report) -> None:
    try:
        out = T.list_checkpoint(subject.folder, error=VerifyError)
    except HubsyncError as err:
        report.add("weights readable", False, err.one_line())
        return
    base = T.list_checkpoint(subject.base_folder, error=VerifyError)
    report.add(
        "weights readable", True, f"{len(out.files)} shard(s); the index covers exactly the tensors in them"
    )
    if not _check_layout(subject, report, base, out):
        return
    found = _compare_with_sources(subject, base, out)
    _report_sources(subject, report, found, len(out.tensors))


def _check_layout(subject: Subject, report: Report, base: T.Checkpoint, out: T.Checkpoint) -> bool:
    requested = subject.record.output_dtype
    layout = []
    for name in sorted(set(base.tensors) | set(out.tensors)):
        b, o = base.tensors.get(name), out.tensors.get(name)
        if b is None or o is None:
            layout.append(f"{name}: {'missing from the build' if o is None else 'not in the base'}")
            continue
        expected = output_dtype(b.dtype, requested)
        if tuple(b.shape) != tuple(o.shape) or o.dtype != expected:
            layout.append(f"{name}: {o.dtype} {list(o.shape)}, expected {expected} {list(b.shape)}")
    report.add(
        "tensor layout",
        not layout,
        layout[0] if layout else f"{len(out.tensors)} tensors with the base's names, shapes and dtypes",
        layout[:20],
    )
    return not layout


@dataclass
class _Findings:
    untuned_changed: list[str] = field(default_factory=list)
    tuned_wrong: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    deltas: dict[str, dict[str, float]] = field(default_factory=dict)
    identical_shards: int = 0
    compared_with_finetune: bool = False


def _finetune_checkpoint(subject: Subject, base: T.Checkpoint) -> T.Checkpoint | None:
    folder = subject.finetune_folder
    if not subject.record.tuned_tensors or folder is None:
        return None
    if (folder / "adapter_config.json").is_file():
        from hubsync.adapters import read_adapter  # the merged tensors are recomputed from the adapter
        from hubsync.resolve import read_json

        return read_adapter(folder, base.tensors, read_json(subject.base_folder / "config.json")).checkpoint
    return T.list_checkpoint(folder, error=VerifyError)


def _identical_shards(subject: Subject, out: T.Checkpoint, base: T.Checkpoint) -> set[str]:
    """Shards the record says are byte-identical to a base shard (the HF cache names blobs by sha256)."""
    base_sha = {p.name: fsio.cached_sha256(p) for p in base.files}
    files = subject.record.files
    return {
        p.name
        for p in out.files
        if base_sha.get(p.name) and p.name in files and files[p.name].sha256 == base_sha[p.name]
    }


def _compare_with_sources(subject: Subject, base: T.Checkpoint, out: T.Checkpoint) -> _Findings:
    found = _Findings()
    tuned = subject.record.tuned_tensors
    ft = _finetune_checkpoint(subject, base)
    found.compared_with_finetune = ft is not None
    identical = _identical_shards(subject, out, base)
    found.identical_shards = len(identical)
    for name, o in out.tensors.items():
        b = base.tensors[name]
        if name not in tuned:
            if not (o.file.name in identical and o.dtype == b.dtype) and _bytes_differ(b, o):
                found.untuned_changed.append(name)
            continue
        _compare_tuned(subject, name, b, o, ft, found)
    return found


def _bytes_differ(b: T.TensorRef, o: T.TensorRef) -> bool:
    if o.dtype != b.dtype:  # a whole-model cast (output.dtype): the layout check covers it
        return False
    same = isinstance(b, T.TensorInfo) and isinstance(o, T.TensorInfo) and T.tensor_bytes_equal(b, o)
    return not same


def _compare_tuned(
    subject: Subject,
    name: str,
    b: T.TensorRef,
    o: T.TensorRef,
    ft: T.Checkpoint | None,
    found: _Findings,
) -> None:
    out_t = T.load_tensor(o)
    if out_t.is_floating_point() and T.has_nan_or_inf(out_t):
        found.nonfinite.append(name)
        return
    base_t = T.load_tensor(b)
    if base_t.to(out_t.dtype).equal(out_t):
        found.tuned_wrong.append(f"{name} equals the base (the fine-tune's change is not in the build)")
    elif ft is not None:
        src = subject.record.tuned_tensors[name].finetune_name
        if src in ft.tensors and not T.load_tensor(ft.tensors[src]).to(out_t.dtype).equal(out_t):
            found.tuned_wrong.append(f"{name} differs from the fine-tune's {src} cast to {o.dtype}")
    prefix = first_match(name, subject.tuned_prefixes) or "(other)"
    max_abs, rel = T.delta_stats(base_t, out_t)
    d = found.deltas.setdefault(prefix, {"tensors": 0, "max_abs": 0.0, "rel": 0.0})
    d["tensors"] += 1
    d["max_abs"] = max(d["max_abs"], max_abs)
    if math.isfinite(rel):  # a zero base tensor has no relative change
        d["rel"] = max(d["rel"], rel)


def _report_sources(subject: Subject, report: Report, found: _Findings, total: int) -> None:
    tuned = len(subject.record.tuned_tensors)
    nonfinite, wrong, changed = found.nonfinite, found.tuned_wrong, found.untuned_changed
    report.add(
        "no NaN or Inf",
        not nonfinite,
        f"NaN or Inf in {len(nonfinite)} tuned tensor(s): {', '.join(nonfinite[:5])}"
        if nonfinite
        else "no NaN or Inf in the tuned tensors",
        nonfinite[:20],
    )
    where = (
        ""
        if found.compared_with_finetune or not tuned
        else (" (fine-tune folder not available: compared with the base only)")
    )
    report.add(
        "tuned tensors are the fine-tune's",
        not wrong,
        wrong[0] if wrong else f"{tuned} tuned tensor(s) equal the fine-tune after the cast{where}",
        wrong[:20],
        deltas=found.deltas,
    )
    report.add(
        "other tensors are the base's",
        not changed,
        f"{len(changed)} tensor(s) outside the tuned parts differ from the base: {', '.join(changed[:5])}"
        if changed
        else f"{total - tuned} tensor(s) byte-identical to the base "
        f"({found.identical_shards} shard(s) identical as files)",
        changed[:20],
    )


def weights_folder_ok(report: Report) -> bool:
    """False when the weights are too broken for a model to be worth loading."""
    return not any(c.name in ("weights readable", "tensor layout") for c in report.failures)
