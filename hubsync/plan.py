"""The plan: a pure function from the manifest, the base, the fine-tune and the tensor comparison to a
description of every output file and tensor, with the rules applied and every problem named.

Nothing here reads a file or a tensor; `write` follows the plan and nothing else, and `hubsync plan` prints it.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from hubsync.compare import TensorDiff, rounding_notes
from hubsync.errors import PlanError
from hubsync.finetune import FinetuneInventory, is_leftover, is_weight_file
from hubsync.formats import stale_weight_copies
from hubsync.manifest import Manifest
from hubsync.resolve import BaseInventory
from hubsync.tuned import boundary_problems, first_match, matches, propose_modules

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
NAMED_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
DTYPE_NAMES = {v: k for k, v in NAMED_DTYPES.items()} | {"F64": "float64"}
GENERATED = ("README.md", "hubsync.json")
# Config keys that say nothing about the model; trainers and transformers versions rewrite them freely.
VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "_commit_hash", "use_cache"}
DTYPE_KEYS = {"torch_dtype", "dtype"}
# Pairs that must agree between config.json and the processor config, per architecture (field notes:
# MiniCPM-V 2.6's chat() asserts them).
CONFIG_PAIRS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "minicpmv": (
        ("query_num", "preprocessor_config.json", "image_feature_size"),
        ("patch_size", "preprocessor_config.json", "patch_size"),
        ("slice_config.max_slice_nums", "preprocessor_config.json", "max_slice_nums"),
    ),
}
LOADER_FILE_KINDS = (
    (
        "processor",
        ("preprocessor_config.json", "processor_config.json", "processing_*.py", "image_processing_*.py"),
    ),
    ("remote code", ("*.py",)),
    (
        "tokenizer",
        (
            "tokenizer.json",
            "tokenizer_config.json",
            "tokenizer.model",
            "vocab.json",
            "merges.txt",
            "special_tokens_map.json",
            "added_tokens.json",
            "vocab.txt",
            "spiece.model",
        ),
    ),
    ("chat template", ("chat_template.jinja", "chat_template.json", "additional_chat_templates/*")),
    ("generation config", ("generation_config.json",)),
    ("license", ("LICENSE*", "LICENCE*", "*license*", "*LICENSE*")),
)


@dataclass(frozen=True)
class FilePlan:
    """One output file: where it comes from and how it is made."""

    path: str
    source: Literal["base", "finetune", "generated"]
    action: Literal["copy", "rewrite-shard", "write-json", "write-index", "card", "provenance"]
    reason: str = ""
    content: dict[str, Any] | None = None  # for write-json / write-index


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shard: str
    source: Literal["base", "finetune"]
    finetune_name: str | None
    dtype: str  # output dtype
    base_dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class PrefixSummary:
    prefix: str
    tensors: int  # tensors under the prefix in the base
    changed: int
    vanished: int
    params_changed: int
    max_abs: float
    rel: float  # largest relative change of any tensor under the prefix
    unchecked: int = 0  # tensors not compared (a plan from the base's headers): taken from the fine-tune


@dataclass(frozen=True)
class ConfigDifference:
    key: str
    base: Any
    finetune: Any
    decision: str


@dataclass(frozen=True)
class Plan:
    base_label: str
    base_repo: str | None
    base_sha: str | None
    base_revision: str | None
    finetune_folder: str
    output_dir: str
    files: tuple[FilePlan, ...]
    tensors: tuple[TensorPlan, ...]
    prefixes: tuple[PrefixSummary, ...]
    casts: tuple[tuple[str, str, int], ...]  # (from, to, count) for tensors taken from the fine-tune
    restored: tuple[tuple[str, str], ...]  # (file, kind): base files the fine-tune folder lacks
    dropped: tuple[str, ...]  # fine-tune files that never reach the output (leftovers, strays, unkept)
    config_diff: tuple[ConfigDifference, ...]
    notes: tuple[str, ...]
    problems: tuple[str, ...]
    suggested_tuned: tuple[str, ...] = field(default_factory=tuple)
    dropped_base: tuple[tuple[str, str], ...] = ()  # (file, why): base files that never reach the output
    unchecked: tuple[str, ...] = ()  # rules this plan could not check without the base's bytes (build does)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_for_problems(self) -> None:
        if self.problems:
            more = (
                f" (and {len(self.problems) - 1} more problem(s): see `hubsync plan`)"
                if len(self.problems) > 1
                else ""
            )
            raise PlanError(self.problems[0] + more)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def tuned_tensors(self) -> tuple[TensorPlan, ...]:
        return tuple(t for t in self.tensors if t.source == "finetune")


def output_dtype(base_dtype: str, requested: str) -> str:
    """The output dtype of a tensor: the base's, or the manifest's `output.dtype` for floating-point tensors."""
    named = NAMED_DTYPES.get(requested)
    return named if named is not None and base_dtype in FLOAT_DTYPES else base_dtype


def output_dtype_for(manifest: Manifest) -> Callable[[str], str]:
    """`output_dtype` with the manifest's `output.dtype` filled in."""
    return lambda base_dtype: output_dtype(base_dtype, manifest.output.dtype)


def _under(name: str, prefixes: tuple[str, ...]) -> str | None:
    return first_match(name, prefixes)


def suggest_prefixes(changed: set[str], unchanged: set[str]) -> tuple[str, ...]:
    """The shortest dotted prefixes that cover the changed tensors and none of the unchanged ones."""
    found: set[str] = set()
    for name in sorted(changed):
        parts = name.split(".")
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth]) + "."
            if not any(u.startswith(prefix) for u in unchanged):
                found.add(prefix)
                break
        else:
            found.add(name)
    return tuple(sorted(p for p in found if not any(p != q and p.startswith(q) for q in found)))


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def dotted_get(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _renamed_heads(base_names: dict[str, str]) -> list[str]:
    """The leading name parts that renaming removed or replaced (e.g. `module.`), for the plan's note."""
    heads = set()
    for ft_name, base_name in base_names.items():
        head = ft_name.split(".", 1)[0] + "."
        if ft_name != base_name and not base_name.startswith(head):
            heads.add(head)
    return sorted(heads)


def _copy_json(data: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(data))


def auto_map_refs(data: dict[str, Any]) -> list[str]:
    auto_map = data.get("auto_map")
    if not isinstance(auto_map, dict):
        return []
    refs: list[str] = []
    for value in auto_map.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                refs.append(item)
    return refs


def _localise_auto_map(data: dict[str, Any], files: set[str]) -> tuple[dict[str, Any] | None, list[str]]:
    """Strip `repo--` from auto_map refs whose module ships locally. Returns (new content or None, problems)."""
    problems: list[str] = []
    auto_map = data.get("auto_map")
    if not isinstance(auto_map, dict):
        return None, problems
    changed = False
    new_map: dict[str, Any] = {}
    for key, value in auto_map.items():
        items = value if isinstance(value, list) else [value]
        fixed = []
        for item in items:
            if isinstance(item, str) and "--" in item:
                local = item.split("--", 1)[1]
                changed = True
                fixed.append(local)
            else:
                fixed.append(item)
        new_map[key] = fixed if isinstance(value, list) else fixed[0]
    for item in auto_map_refs({"auto_map": new_map}):
        module = item.rsplit(".", 1)[0]
        if f"{module.replace('.', '/')}.py" not in files:
            problems.append(f"auto_map entry '{item}' needs {module}.py, which the base does not ship")
    if not changed:
        return None, problems
    content = _copy_json(data)
    content["auto_map"] = new_map
    return content, problems


def _kind_of(path: str) -> str:
    for kind, patterns in LOADER_FILE_KINDS:
        if any(fnmatch.fnmatch(path, p) for p in patterns):
            return kind
    return "file"


@dataclass
class _Findings:
    """What the planning steps report as they go: notes for the reader, problems that stop the build."""

    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def make_plan(
    manifest: Manifest,
    base: BaseInventory,
    finetune: FinetuneInventory,
    diffs: dict[str, TensorDiff],
    *,
    base_json: dict[str, dict[str, Any]],
    finetune_same_files: frozenset[str],
    allow_untuned_changes: bool = False,
) -> Plan:
    """Decide every output file and tensor. `base_json` holds the base's parsed JSON files by path;
    `finetune_same_files` lists the fine-tune files that are byte-identical to the base's."""
    found = _Findings()
    # The manifest's `tuned` wins (it may narrow an adapter's); else what the source itself implies.
    tuned = manifest.finetune.tuned if manifest.finetune.tuned is not None else finetune.derived_tuned
    _note_revision(base, found)
    found.problems.extend(finetune.problems)
    found.notes.extend(finetune.notes)
    found.notes.extend(rounding_notes(diffs))
    _check_names(finetune, found)
    different = {n for n, d in diffs.items() if d.state in ("changed", "vanished")}
    unchanged = set(base.checkpoint.tensors) - different
    sizes = {n: info.numel for n, info in base.checkpoint.tensors.items()}
    suggested = propose_modules(different, sizes) if different else ()
    take = _tensors_from_finetune(
        tuned, base, diffs, different, unchanged, suggested, allow_untuned_changes, found
    )
    prefixes = _prefix_summaries(tuned, suggested, base, diffs, manifest, found)
    tensor_plans = _tensor_plans(base, diffs, take, output_dtype_for(manifest))
    casts = _note_casts(tensor_plans, diffs, manifest, found)
    files = _weight_files(base, base_json, tensor_plans)
    json_out, config_diff = _config_files(manifest, base, finetune, base_json, found)
    other_files, restored = _other_files(manifest, base, finetune, json_out, finetune_same_files)
    stale = stale_weight_copies(
        base.files, [*base.shard_names, *([base.index_name] if base.index_name else [])]
    )
    other_files = [f for f in other_files if not (f.source == "base" and f.path in stale)]
    restored = [r for r in restored if r[0] not in stale]
    _note_restored(restored, found)
    dropped = _dropped_files(manifest, base, finetune, found)
    return Plan(
        base_label=base.label,
        base_repo=base.repo_id,
        base_sha=base.sha,
        base_revision=base.revision,
        finetune_folder=str(finetune.folder),
        output_dir=str(manifest.output.dir),
        files=tuple(files + other_files),
        tensors=tuple(tensor_plans),
        prefixes=tuple(prefixes),
        casts=tuple((a, b, n) for (a, b), n in sorted(casts.items())),
        restored=tuple(restored),
        dropped=tuple(sorted(dropped)),
        config_diff=tuple(config_diff),
        notes=tuple(found.notes),
        problems=tuple(found.problems),
        suggested_tuned=suggested,
        dropped_base=tuple(stale.items()),
        unchecked=unchecked_rules(diffs),
    )


def certain_copies(
    base: BaseInventory, pick_dtype: Callable[[str], str], tuned: tuple[str, ...] | None
) -> list[str]:
    """The base shards that `make_plan` copies as they are, whatever the comparison finds: only tensors under
    `tuned` are ever taken from the fine-tune, so a shard with none of them, and none that changes dtype, is
    copied (a build may start copying it while it compares). None when nothing is declared."""
    if tuned is None:
        return []
    weight_map = base.weight_map
    rewritten = {
        weight_map[name]
        for name, info in base.checkpoint.tensors.items()
        if pick_dtype(info.dtype) != info.dtype or _under(name, tuned) is not None
    }
    return [shard for shard in base.shard_names if shard not in rewritten]


def unchecked_rules(diffs: dict[str, TensorDiff]) -> tuple[str, ...]:
    """What a plan made without the base's bytes could not check (hubsync.sample); `build` checks all of it."""
    rules = []
    if any(d.state == "unchecked" for d in diffs.values()):
        rules += [
            "that each tuned tensor differs from the base, and by how much (max |Δ|, rel Δ)",
            "that no tuned prefix is identical to the base (the wrong checkpoint, or a change lost in the cast)",
            "NaN or Inf in the tuned tensors",
        ]
    if any(d.sampled for d in diffs.values()):
        rules.append(
            "tensors outside the tuned parts were compared on a sample of their values: one whose sample "
            "equals the base may still differ elsewhere"
        )
    return tuple(rules)


def _note_revision(base: BaseInventory, found: _Findings) -> None:
    if base.repo_id and base.revision and base.sha and base.revision != base.sha:
        found.notes.append(
            f"base revision '{base.revision}' resolved to commit {base.sha}; the build uses and records the sha"
        )


def _check_names(finetune: FinetuneInventory, found: _Findings) -> None:
    for u in finetune.unmapped:
        found.problems.append(f"fine-tune tensor {u.name} does not map onto the base: {u.reason}")
    if finetune.renamed:
        wrappers = _renamed_heads(finetune.base_names)
        found.notes.append(
            f"{finetune.renamed} fine-tune tensor name(s) normalised onto the base's names"
            + (f" (stripped or renamed: {', '.join(wrappers)})" if wrappers else "")
        )


def _tensors_from_finetune(
    tuned: tuple[str, ...] | None,
    base: BaseInventory,
    diffs: dict[str, TensorDiff],
    different: set[str],
    unchanged: set[str],
    suggested: tuple[str, ...],
    allow_untuned_changes: bool,
    found: _Findings,
) -> set[str]:
    """The base tensors whose value comes from the fine-tune; the rules on what may differ, applied."""
    if tuned is None:
        found.problems.append(
            "`finetune.tuned` is not declared; these prefixes changed: "
            + ", ".join(suggested)
            + f". Declare them: `tuned: [{', '.join(repr(p) for p in suggested)}]`"
            if different
            else _nothing_differs(diffs)
        )
        return set()
    found.problems.extend(boundary_problems(tuned, base.checkpoint.tensors))
    for prefix in tuned:
        if not any(matches(prefix, n) for n in base.checkpoint.tensors):
            found.problems.append(
                f"tuned prefix '{prefix}' matches no tensor of the base: check `finetune.tuned`"
            )
    _untuned_changes(tuned, different, unchanged, allow_untuned_changes, found)
    take: set[str] = set()
    # `unchecked`: a plan from the base's headers takes what the manifest declares; build checks it
    for name in sorted(n for n, d in diffs.items() if d.state in ("changed", "unchecked")):
        if _under(name, tuned) is None:
            continue
        if diffs[name].nonfinite:
            found.problems.append(
                f"tuned tensor {name} contains NaN or Inf: the training diverged; use an earlier checkpoint"
            )
        else:
            take.add(name)
    return take


def _nothing_differs(diffs: dict[str, TensorDiff]) -> str:
    if any(d.sampled or d.state == "unchecked" for d in diffs.values()):
        return (
            "`finetune.tuned` is not declared, and no tensor differs from the base in a sample of its values: "
            "declare the tuned prefixes, or download the base so that every byte is compared"
        )
    return "the fine-tune is identical to the base: wrong checkpoint, or the change vanished in the cast"


def _untuned_changes(
    tuned: tuple[str, ...], different: set[str], unchanged: set[str], allow: bool, found: _Findings
) -> None:
    untuned_changes = sorted(n for n in different if _under(n, tuned) is None)
    if not untuned_changes:
        return
    shown = ", ".join(untuned_changes[:8]) + (
        f" and {len(untuned_changes) - 8} more" if len(untuned_changes) > 8 else ""
    )
    where = suggest_prefixes(set(untuned_changes), unchanged)
    if allow:
        found.notes.append(
            f"{len(untuned_changes)} tensor(s) outside `tuned` differ from the base ({shown}); "
            "taken from the base (--allow-untuned-changes)"
        )
    else:
        found.problems.append(
            f"{len(untuned_changes)} tensor(s) outside `finetune.tuned` differ from the base "
            f"(under {', '.join(where)}: {shown}): that part was not frozen. Add the prefix to `tuned`, "
            "or pass --allow-untuned-changes to take those tensors from the base"
        )


def _prefix_summaries(
    tuned: tuple[str, ...] | None,
    suggested: tuple[str, ...],
    base: BaseInventory,
    diffs: dict[str, TensorDiff],
    manifest: Manifest,
    found: _Findings,
) -> list[PrefixSummary]:
    summaries = []
    for prefix in tuned or suggested:
        names = [n for n in base.checkpoint.tensors if matches(prefix, n)]
        summary = _summarise(prefix, names, diffs)
        summaries.append(summary)
        if tuned is not None:
            _check_prefix_changed(summary, names, base, manifest, found)
            absent = [n for n in names if n not in diffs]
            if absent and len(absent) < len(names):
                found.notes.append(
                    f"{len(absent)} tensor(s) under '{prefix}' are not in the fine-tune; taken from the base"
                )
    return summaries


def _summarise(prefix: str, names: list[str], diffs: dict[str, TensorDiff]) -> PrefixSummary:
    changed = [diffs[n] for n in names if n in diffs and diffs[n].state == "changed"]
    finite = [d for d in changed if not d.nonfinite]
    return PrefixSummary(
        prefix=prefix,
        tensors=len(names),
        changed=len(changed),
        vanished=sum(1 for n in names if n in diffs and diffs[n].state == "vanished"),
        params_changed=sum(d.numel for d in changed),
        max_abs=max((d.max_abs for d in finite), default=0.0),
        # a zero base tensor (a fresh bias) has no relative change: leave it out of the max
        rel=max((d.rel for d in finite if math.isfinite(d.rel)), default=0.0),
        unchecked=sum(1 for n in names if n in diffs and diffs[n].state == "unchecked"),
    )


def _check_prefix_changed(
    summary: PrefixSummary, names: list[str], base: BaseInventory, manifest: Manifest, found: _Findings
) -> None:
    if not names or summary.changed or summary.unchecked:
        return
    pick_dtype = output_dtype_for(manifest)
    dtype = DTYPE_NAMES.get(pick_dtype(base.checkpoint.tensors[names[0]].dtype), "the output dtype")
    why = (
        f"{summary.vanished} tensor(s) changed only below {dtype} resolution"
        if summary.vanished
        else "no tensor differs"
    )
    found.problems.append(
        f"tuned prefix '{summary.prefix}' is identical to the base ({why}): wrong checkpoint, "
        f"or the change vanished in {dtype}"
    )


def _tensor_plans(
    base: BaseInventory, diffs: dict[str, TensorDiff], take: set[str], pick_dtype: Callable[[str], str]
) -> list[TensorPlan]:
    weight_map = base.weight_map
    return [
        TensorPlan(
            name=name,
            shard=weight_map[name],
            source="finetune" if name in take else "base",
            finetune_name=diffs[name].source if name in take else None,
            dtype=pick_dtype(info.dtype),
            base_dtype=info.dtype,
            shape=tuple(info.shape),
        )
        for name, info in base.checkpoint.tensors.items()
    ]


def _note_casts(
    tensor_plans: list[TensorPlan], diffs: dict[str, TensorDiff], manifest: Manifest, found: _Findings
) -> Counter[tuple[str, str]]:
    casts = Counter(
        (diffs[t.name].finetune_dtype, t.dtype)
        for t in tensor_plans
        if t.source == "finetune" and diffs[t.name].finetune_dtype != t.dtype
    )
    why = "(the base's dtype)" if manifest.output.dtype == "base" else "(output.dtype)"
    for (src, dst), count in sorted(casts.items()):
        found.notes.append(f"{count} tuned tensor(s) saved as {src}, cast to {dst} {why}")
    whole_cast = Counter((t.base_dtype, t.dtype) for t in tensor_plans if t.base_dtype != t.dtype)
    for (src, dst), count in sorted(whole_cast.items()):
        found.notes.append(
            f"{count} tensor(s) cast from {src} to {dst} (output.dtype: {manifest.output.dtype})"
        )
    return casts


def _weight_files(
    base: BaseInventory, base_json: dict[str, dict[str, Any]], tensor_plans: list[TensorPlan]
) -> list[FilePlan]:
    files: list[FilePlan] = []
    rewritten = {t.shard for t in tensor_plans if t.source == "finetune" or t.dtype != t.base_dtype}
    for shard in base.shard_names:
        if shard in rewritten:
            n = sum(1 for t in tensor_plans if t.shard == shard and t.source == "finetune")
            files.append(FilePlan(shard, "base", "rewrite-shard", f"{n} tuned tensor(s) from the fine-tune"))
        else:
            files.append(FilePlan(shard, "base", "copy", "no tuned tensor: byte-identical to the base"))
    index_path = base.index_name
    if index_path is None:
        return files
    if any(t.base_dtype != t.dtype for t in tensor_plans):
        index = _copy_json(base_json.get(index_path, {}))
        index.setdefault("metadata", {})["total_size"] = sum(_nbytes(t) for t in tensor_plans)
        files.append(FilePlan(index_path, "generated", "write-index", "total_size for the new dtype", index))
    else:
        files.append(FilePlan(index_path, "base", "copy", "the base's index"))
    return files


def _config_files(
    manifest: Manifest,
    base: BaseInventory,
    finetune: FinetuneInventory,
    base_json: dict[str, dict[str, Any]],
    found: _Findings,
) -> tuple[dict[str, dict[str, Any]], list[ConfigDifference]]:
    """The JSON files the output gets instead of the base's copies, and the config keys that differ."""
    keep_files = set(manifest.finetune.keep_files)
    for path in sorted(keep_files):
        if path not in finetune.files:
            found.problems.append(
                f"finetune.keep_files names {path}, which the fine-tune folder does not have"
            )
    config_diff = _config_differences(manifest, base, finetune, found)
    json_out = _kept_config_keys(manifest, base, finetune, base_json, found)
    _localise_auto_maps(base, base_json, json_out, found)
    if "config.json" in keep_files and finetune.config:
        # A kept fine-tune config still must not point at another repo's code.
        localised, _ = _localise_auto_map(finetune.config, set(base.files))
        if localised is not None:
            json_out["config.json"] = localised
            found.notes.append("config.json (kept from the fine-tune): auto_map 'repo--' prefixes removed")
    _check_config_pairs(manifest, base, finetune, base_json, json_out, found)
    return json_out, config_diff


def _config_differences(
    manifest: Manifest, base: BaseInventory, finetune: FinetuneInventory, found: _Findings
) -> list[ConfigDifference]:
    """config.json keys that differ between the base and the fine-tune, and what the build does with each."""
    if not (finetune.config and base.config):
        return []
    keep_config = set(manifest.finetune.keep_config)
    base_flat, ft_flat = _flatten(base.config), _flatten(finetune.config)
    differences = []
    for key in sorted(set(base_flat) | set(ft_flat)):
        if key in VOLATILE_CONFIG_KEYS or key.startswith("auto_map"):
            continue
        b, f = base_flat.get(key), ft_flat.get(key)
        if b == f:
            continue
        if key in DTYPE_KEYS or key.endswith(tuple("." + k for k in DTYPE_KEYS)):
            decision = "base value kept (the training run's dtype)"
        elif any(key == k or key.startswith(k + ".") for k in keep_config):
            decision = "fine-tune value kept (finetune.keep_config)"
        else:
            decision = "base value kept (add to finetune.keep_config to keep the fine-tune's)"
        differences.append(ConfigDifference(key, b, f, decision))
    if any("--" in ref for ref in auto_map_refs(finetune.config)):
        found.notes.append(
            "the fine-tune's config.json auto_map points at another repo's code ('repo--' prefix, whatever is on "
            "that repo today): the output uses the pinned base's own code files"
        )
    return differences


def _kept_config_keys(
    manifest: Manifest,
    base: BaseInventory,
    finetune: FinetuneInventory,
    base_json: dict[str, dict[str, Any]],
    found: _Findings,
) -> dict[str, dict[str, Any]]:
    """config.json: the base's, plus the keys the manifest keeps from the fine-tune (and their pairs)."""
    json_out: dict[str, dict[str, Any]] = {}
    for key in sorted(manifest.finetune.keep_config):
        value = dotted_get(finetune.config, key)
        if value is None:
            found.problems.append(
                f"finetune.keep_config names '{key}', which the fine-tune's config.json does not have"
            )
            continue
        _set(json_out.setdefault("config.json", _copy_json(base.config)), key, value)
        for cfg_key, proc_file, proc_key in CONFIG_PAIRS.get(str(base.config.get("model_type")), ()):
            if (
                cfg_key == key
                and proc_file in base_json
                and dotted_get(base_json[proc_file], proc_key) is not None
            ):
                _set(json_out.setdefault(proc_file, _copy_json(base_json[proc_file])), proc_key, value)
                found.notes.append(f"{proc_file} {proc_key} set to {value!r} to agree with config.json {key}")
    return json_out


def _localise_auto_maps(
    base: BaseInventory,
    base_json: dict[str, dict[str, Any]],
    json_out: dict[str, dict[str, Any]],
    found: _Findings,
) -> None:
    """Every JSON with an auto_map must point at code that ships in the output."""
    for path in sorted(base_json):
        localised, auto_problems = _localise_auto_map(json_out.get(path, base_json[path]), set(base.files))
        found.problems.extend(f"{path}: {p}" for p in auto_problems)
        if localised is not None:
            json_out[path] = localised
            found.notes.append(
                f"{path}: auto_map 'repo--' prefixes removed; it now points at the local code files"
            )


def _check_config_pairs(
    manifest: Manifest,
    base: BaseInventory,
    finetune: FinetuneInventory,
    base_json: dict[str, dict[str, Any]],
    json_out: dict[str, dict[str, Any]],
    found: _Findings,
) -> None:
    """Known pairs must agree in the output."""
    kept = "config.json" in manifest.finetune.keep_files
    out_config = json_out.get("config.json", finetune.config if kept else base.config)
    for cfg_key, proc_file, proc_key in CONFIG_PAIRS.get(str(base.config.get("model_type")), ()):
        proc = json_out.get(proc_file, base_json.get(proc_file))
        if proc is None:
            continue
        a, b = dotted_get(out_config, cfg_key), dotted_get(proc, proc_key)
        if a is not None and b is not None and a != b:
            found.problems.append(
                f"config.json {cfg_key}={a!r} but {proc_file} {proc_key}={b!r}: they must agree; "
                f"keep both from the same source (finetune.keep_config / finetune.keep_files)"
            )


def _other_files(
    manifest: Manifest,
    base: BaseInventory,
    finetune: FinetuneInventory,
    json_out: dict[str, dict[str, Any]],
    finetune_same_files: frozenset[str],
) -> tuple[list[FilePlan], list[tuple[str, str]]]:
    """Every non-weight file: the base's, a kept fine-tune file, or an adjusted JSON; plus card and record."""
    keep_files = set(manifest.finetune.keep_files)
    base_files = set(base.files)
    weights = set(base.shard_names) | ({base.index_name} if base.index_name else set())
    files: list[FilePlan] = []
    restored: list[tuple[str, str]] = []
    for path in sorted(base_files - weights - set(GENERATED)):
        if path in keep_files and path in json_out and path == "config.json":
            files.append(
                FilePlan(
                    path, "finetune", "write-json", "finetune.keep_files, auto_map made local", json_out[path]
                )
            )
        elif path in keep_files:
            files.append(FilePlan(path, "finetune", "copy", "finetune.keep_files"))
        elif path in json_out:
            files.append(
                FilePlan(
                    path, "generated", "write-json", "the base's file, adjusted (see notes)", json_out[path]
                )
            )
        else:
            if path not in finetune.files:
                restored.append((path, _kind_of(path)))
            files.append(
                FilePlan(path, "base", "copy", _base_copy_reason(path, finetune, finetune_same_files))
            )
    for path in sorted(keep_files - base_files):
        if path in finetune.files:
            files.append(FilePlan(path, "finetune", "copy", "finetune.keep_files (not in the base)"))
    files.append(FilePlan("README.md", "generated", "card", "model card rendered by hubsync"))
    files.append(FilePlan("hubsync.json", "generated", "provenance", "how this folder was built"))
    return files, restored


def _base_copy_reason(path: str, finetune: FinetuneInventory, same: frozenset[str]) -> str:
    if path not in finetune.files:
        return "missing from the fine-tune: restored from the pinned base"
    if path not in same and path != ".gitattributes":
        return "the fine-tune's copy differs: the pinned base's is used (finetune.keep_files keeps it)"
    return "from the pinned base"


def _note_restored(restored: list[tuple[str, str]], found: _Findings) -> None:
    by_kind = Counter(kind for _, kind in restored)
    for kind, _count in sorted(by_kind.items()):
        if kind != "file":
            names = ", ".join(p for p, k in restored if k == kind)
            found.notes.append(f"{kind} file(s) missing from the fine-tune, restored from the base: {names}")


def _dropped_files(
    manifest: Manifest, base: BaseInventory, finetune: FinetuneInventory, found: _Findings
) -> list[str]:
    """Fine-tune files that never reach the output: leftovers, stray shards, files the base does not have."""
    keep_files = set(manifest.finetune.keep_files)
    stray = {p.relative_to(finetune.folder).as_posix() for p in finetune.checkpoint.stray_files}
    dropped = []
    for path in finetune.files:
        if path in keep_files:
            continue
        if path in stray:
            dropped.append(path)
            found.notes.append(f"{path} is not listed in the fine-tune's index: ignored (stray shard)")
        elif is_leftover(path) or not (is_weight_file(path) or path in set(base.files)):
            dropped.append(path)
    leftovers = [p for p in dropped if is_leftover(p)]
    if leftovers:
        found.notes.append(
            f"trainer leftovers left out: {', '.join(sorted(leftovers)[:6])}"
            + (" ..." if len(leftovers) > 6 else "")
        )
    return dropped


DTYPE_SIZES = {
    "F64": 8,
    "F32": 4,
    "I64": 8,
    "I32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def _nbytes(t: TensorPlan) -> int:
    n = 1
    for d in t.shape:
        n *= d
    return n * DTYPE_SIZES.get(t.dtype, 1)


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


def render(plan: Plan) -> str:
    """The plan as a readable table."""
    lines = [
        f"base      {plan.base_label}",
        f"finetune  {plan.finetune_folder}",
        f"output    {plan.output_dir}",
        "",
    ]
    lines.append("files")
    width = max((len(f.path) for f in plan.files), default=10)
    for f in plan.files:
        lines.append(f"  {f.path:<{width}}  {f.source:<9}  {f.action:<13}  {f.reason}")
    if plan.prefixes:
        lines += ["", "tuned parts"]
        lines.append(f"  {'prefix':<28} {'changed':>13} {'params':>9} {'max |Δ|':>10} {'rel Δ':>9}")
        for p in plan.prefixes:
            lines.append(_prefix_row(p))
    tuned = plan.tuned_tensors
    lines += [
        "",
        f"tensors   {len(plan.tensors)} in the output, {len(tuned)} from the fine-tune, "
        f"{len(plan.tensors) - len(tuned)} byte-identical from the base",
    ]
    for t in tuned[:12]:
        lines.append(f"  {t.name}  <- {t.finetune_name}  [{t.shard}]")
    if len(tuned) > 12:
        lines.append(f"  ... and {len(tuned) - 12} more (--json lists all)")
    if plan.config_diff:
        lines += ["", "config keys that differ (base -> fine-tune)"]
        for c in plan.config_diff:
            lines.append(f"  {c.key}: {c.base!r} -> {c.finetune!r}  {c.decision}")
    if plan.dropped:
        lines += ["", "left out of the output: " + ", ".join(plan.dropped)]
    if plan.dropped_base:
        lines += ["", "base files left out"] + [f"  {path}: {why}" for path, why in plan.dropped_base]
    if plan.notes:
        lines += ["", "notes"] + [f"  - {n}" for n in plan.notes]
    if plan.unchecked:
        lines += ["", "not checked without the base's weights (`hubsync build` checks them)"]
        lines += [f"  ? {rule}" for rule in plan.unchecked]
    if plan.problems:
        lines += ["", "problems (the build stops)"] + [f"  ! {p}" for p in plan.problems]
    else:
        lines += ["", "ok: the plan breaks no rule"]
    return "\n".join(lines)


def _prefix_row(p: PrefixSummary) -> str:
    if p.unchecked:
        return f"  {p.prefix:<28} {f'?/{p.tensors}':>13}  not compared: {p.unchecked} tensor(s) from the fine-tune"
    return (
        f"  {p.prefix:<28} {f'{p.changed}/{p.tensors}':>13} {_human(p.params_changed):>9} "
        f"{p.max_abs:>10.3g} {p.rel:>9.3g}" + (f"  ({p.vanished} vanished in the cast)" if p.vanished else "")
    )
