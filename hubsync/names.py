"""Name mapping: which base tensor each fine-tune tensor name stands for.

Trainers wrap names (`module.` from DDP, `_orig_mod.` from torch.compile, `base_model.model.` from PEFT) and
transformers renames keys between versions; a tuned vision tower whose names do not match the base is silently
ignored at load time, which is the worst outcome. So every fine-tune tensor must map to exactly one base tensor
of the same shape, or the build stops with the list of offenders.

In order: wrapper prefixes are stripped, the manifest's `finetune.rename` rules applied, transformers' rename
table for the architecture tried both ways; what is still unmapped is a tied copy of the embedding, or is
explained by prefix renames inferred from the two checkpoints' names and shapes (`infer_renames`), which the
plan shows. Everything here is pure except `architecture_renames`, which reads transformers' own table (kept
in hubsync's cache).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubsync.errors import HubsyncError
from hubsync.fsio import cache_dir, replace_atomically
from hubsync.manifest import RenameRule

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
# Wrappers around a sub-module leave their attribute name inside the key: FSDP (`_fsdp_wrapped_module.`),
# activation checkpointing (`_checkpoint_wrapped_module.`), torch.compile of one sub-module (`_orig_mod.`).
WRAPPER_SEGMENTS = re.compile(r"(^|\.)(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")
NOT_IN_BASE = "no tensor of that name in the base"


@dataclass(frozen=True)
class Unmapped:
    """A fine-tune tensor that does not land on exactly one base tensor of the same shape."""

    name: str
    reason: str


def strip_wrappers(name: str) -> str:
    """Remove trainer wrapper prefixes, however they are stacked (`module._orig_mod.x` -> `x`), and the
    wrapper segments that FSDP or activation checkpointing leave inside a key."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    while WRAPPER_SEGMENTS.search(name):
        name = WRAPPER_SEGMENTS.sub(r"\1", name)
    return name


@dataclass(frozen=True)
class Renaming:
    """A prefix rename known to transformers for one architecture, usable in both directions."""

    pattern: str
    replacement: str


def architecture_renames(config: dict[str, Any]) -> tuple[Renaming, ...]:
    """transformers' own checkpoint key renames for the base's architecture (old names -> new names).

    Reading the table means importing transformers' loading machinery (seconds: torch.distributed, sympy...),
    for a table that only changes with transformers itself. So the rules are kept in hubsync's cache, per
    transformers version and architecture, and a later build of the same architecture imports nothing."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return ()
    architectures = [a for a in config.get("architectures", []) if isinstance(a, str)]
    version = _transformers_version()
    if version is None:
        return ()
    key = json.dumps([model_type, architectures])
    cached = _cached_renames(version, key)
    if cached is not None:
        return cached
    found = _renames_from_transformers(model_type, architectures)
    if found is not None:
        _cache_renames(version, key, found)
    return found or ()


def _transformers_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return None


def _renames_from_transformers(model_type: str, architectures: list[str]) -> tuple[Renaming, ...] | None:
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # an older transformers without the table: only the manifest's rules apply
        return None
    # The head class loads its inner model too (LlavaForConditionalGeneration -> LlavaModel), whose
    # renames are registered under the inner class's name.
    inner = [re.sub(r"For[A-Za-z]+$", "Model", a) for a in architectures]
    found: list[Renaming] = []
    for key in dict.fromkeys([model_type, *architectures, *inner]):
        for entry in get_checkpoint_conversion_mapping(key) or []:
            if isinstance(entry, WeightRenaming):
                for source in entry.source_patterns:
                    rule = Renaming(source, entry.target_patterns[0])
                    if rule not in found:
                        found.append(rule)
    return tuple(found)


def _renames_file(version: str) -> Path:
    return cache_dir() / "renames" / f"transformers-{re.sub(r'[^A-Za-z0-9.+-]', '_', version)}.json"


def _cached_renames(version: str, key: str) -> tuple[Renaming, ...] | None:
    try:
        rules = json.loads(_renames_file(version).read_text(encoding="utf-8")).get(key)
        return tuple(Renaming(str(p), str(r)) for p, r in rules) if isinstance(rules, list) else None
    except (OSError, ValueError, TypeError, AttributeError):  # no cache yet, or a damaged one: read the table
        return None


def _cache_renames(version: str, key: str, rules: tuple[Renaming, ...]) -> None:
    path = _renames_file(version)
    try:
        known = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if not isinstance(known, dict):
            known = {}
        known[key] = [[r.pattern, r.replacement] for r in rules]
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, json.dumps(known, indent=1, sort_keys=True).encode("utf-8"))
    except (OSError, ValueError, HubsyncError):  # a cache that cannot be written costs time, nothing else
        pass


# The literal start of a rule's pattern: plain characters and escaped dots, up to the first group, class or
# quantifier (`^model(?!\.(language_model|visual))` -> `model`, `^model\.(?:(?!language_model\.))(.+)` -> `model.`).
_LITERAL_START = re.compile(r"\^((?:[\w-]|\\\.|\.(?![*+?{]))*)")
_REPLACEMENT = re.compile(r"((?:[\w.-])*)(\\1)?")


def _backwards(rule: Renaming, name: str) -> str | None:
    """The old name that `rule` turns into `name` (new -> old, for a fine-tune saved with newer names than the
    base), or None. Rules with lookaheads and groups (Qwen2-VL's `^model(?!\\.(language_model|visual))` ->
    `model.language_model`) are reversed by their literal parts, and a candidate is kept only when the rule,
    run forwards, gives `name` back: the lookahead is checked by the rule itself."""
    start = _LITERAL_START.match(rule.pattern)
    replacement = _REPLACEMENT.fullmatch(rule.replacement)
    if start is None or replacement is None:
        return None
    new_prefix = replacement.group(1)
    if not name.startswith(new_prefix):
        return None
    old = start.group(1).replace("\\.", ".") + name[len(new_prefix) :]
    try:
        forwards = re.sub(rule.pattern, rule.replacement, old, count=1)
    except re.error:
        return None
    return old if forwards == name and old != name else None


def normalise(name: str, rules: tuple[RenameRule, ...]) -> str:
    """A fine-tune name without trainer wrappers, with the manifest's `finetune.rename` rules applied."""
    stripped = strip_wrappers(name)
    for rule in rules:
        stripped = re.sub(rule.pattern, rule.replacement, stripped)
    return stripped


def candidate_names(
    name: str, rules: tuple[RenameRule, ...], arch: tuple[Renaming, ...], depth: int = 3
) -> list[str]:
    """Base names this fine-tune name may stand for, most likely first. transformers chains renames (an
    outer class's rule, then the inner model's), so rules are applied repeatedly, in both directions."""
    stripped = normalise(name, rules)
    candidates = [stripped]
    frontier = [stripped]
    for _ in range(depth):
        next_frontier = []
        for current in frontier:
            renamed = [re.sub(r.pattern, r.replacement, current, count=1) for r in arch]
            renamed += [b for b in (_backwards(r, current) for r in arch) if b is not None]
            for candidate in renamed:
                if candidate not in candidates:
                    candidates.append(candidate)
                    next_frontier.append(candidate)
        frontier = next_frontier
    return candidates


def map_names(
    names: dict[str, tuple[int, ...]],
    base_shapes: dict[str, tuple[int, ...]],
    rules: tuple[RenameRule, ...],
    arch: tuple[Renaming, ...],
) -> tuple[dict[str, str], tuple[Unmapped, ...], int]:
    """Map fine-tune names (with shapes) onto base names. Pure; returns (mapping, offenders, renamed count)."""
    mapping: dict[str, str] = {}
    offenders: list[Unmapped] = []
    claimed: dict[str, str] = {}
    renamed = 0
    for name, shape in names.items():
        hits = [c for c in candidate_names(name, rules, arch) if c in base_shapes]
        if not hits:
            offenders.append(Unmapped(name, NOT_IN_BASE))
            continue
        target = hits[0]
        if tuple(base_shapes[target]) != tuple(shape):
            offenders.append(
                Unmapped(name, f"shape {list(shape)} but the base's {target} is {list(base_shapes[target])}")
            )
            continue
        if target in claimed:
            offenders.append(Unmapped(name, f"maps to {target}, which {claimed[target]} already maps to"))
            continue
        claimed[target] = name
        mapping[name] = target
        renamed += target != name
    return mapping, tuple(offenders), renamed


# --------------------------------------------------------------------------------------------------------------
# Renames inferred from the checkpoints themselves, for what no wrapper, manifest rule or table explains

Shape = tuple[int, ...]
MAX_INFERRED_RENAMES = 6  # more distinct renames than this means another model, not another naming
MIN_SUFFIX = 2  # segments: a shared leaf name (`weight`) alone is no evidence


@dataclass(frozen=True)
class InferredRename:
    """A prefix rewrite (fine-tune names after wrappers and manifest rules -> base names) that explains whole
    modules of the fine-tune."""

    source: str
    target: str
    tensors: int

    @property
    def note(self) -> str:
        return (
            f"inferred rename: {self.source} -> {self.target or '(prefix removed)'} ({self.tensors} tensors)"
        )


@dataclass(frozen=True)
class Inference:
    renames: tuple[InferredRename, ...]
    mapping: dict[str, str]  # fine-tune name -> base name, for the names the renames explain
    problems: tuple[str, ...]  # refusals: ambiguity, a rename that does not fit its whole module, too many
    refused: frozenset[str]  # the fine-tune names those problems are about


def rename_rule(source: str, target: str) -> str:
    """The manifest `finetune.rename` entry that states a prefix rename, as YAML."""
    return "{from: '^" + re.escape(source).replace("'", "''") + "', to: '" + target.replace("'", "''") + "'}"


def _suffix_index(base_shapes: Mapping[str, Shape]) -> dict[tuple[str, ...], list[str]]:
    index: dict[tuple[str, ...], list[str]] = {}
    for name in base_shapes:
        parts = tuple(name.split("."))
        for k in range(MIN_SUFFIX, len(parts) + 1):
            index.setdefault(parts[-k:], []).append(name)
    return index


def _prefixes(name: str, base: str, k: int) -> tuple[str, str]:
    """(fine-tune prefix, base prefix) around a common suffix of k segments."""
    parts, base_parts = name.split("."), base.split(".")
    return _joined(parts[:-k]), _joined(base_parts[:-k])


def _joined(parts: list[str]) -> str:
    return "".join(p + "." for p in parts)


def _align(
    names: Mapping[str, str], shapes: Mapping[str, Shape], base_shapes: Mapping[str, Shape]
) -> tuple[dict[str, tuple[str, int]], dict[str, tuple[list[str], int]]]:
    """Each fine-tune name's base tensor of the same shape with the longest common name ending: unique
    (aligned: name -> (base, k)) or tied (name -> (candidates, k))."""
    index = _suffix_index(base_shapes)
    aligned: dict[str, tuple[str, int]] = {}
    ties: dict[str, tuple[list[str], int]] = {}
    for name, normal in names.items():
        parts = tuple(normal.split("."))
        for k in range(len(parts), MIN_SUFFIX - 1, -1):
            found = [b for b in index.get(parts[-k:], []) if tuple(base_shapes[b]) == tuple(shapes[name])]
            if len(found) == 1:
                aligned[name] = (found[0], k)
            elif found:
                ties[name] = (sorted(found), k)
            if found:
                break
    return aligned, ties


def _extend(source: str, target: str, pairs: list[tuple[str, str]], names: set[str]) -> tuple[str, str]:
    """Grow a rename by the module names all its tensors share on both sides, while its source still covers
    names it does not explain: `model.` -> `` for `model.visual.*` alone (beside `model.language_model.*`)
    becomes `model.visual.` -> `visual.`, which reads as the module it moves and claims nothing else."""
    own = {n for n, _ in pairs}
    while source == "" or any(n.startswith(source) and n not in own for n in names):
        rests = [(n[len(source) :].split("."), b[len(target) :].split(".")) for n, b in pairs]
        heads = {(r[0], q[0]) for r, q in rests}
        if len(heads) != 1 or any(len(r) < 2 or len(q) < 2 for r, q in rests):
            break
        head, base_head = heads.pop()
        if head != base_head:
            break
        source, target = source + head + ".", target + head + "."
    return source, target


def _candidate_renames(
    names: Mapping[str, str], aligned: Mapping[str, tuple[str, int]], mapped: Iterable[str]
) -> dict[str, dict[str, int]]:
    """source prefix -> {target prefix: evidence count}, from the aligned names (`mapped`: the normalised
    names of the fine-tune tensors already mapped, which a rename must not seem to cover)."""
    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for name, (base, k) in aligned.items():
        groups.setdefault(_prefixes(names[name], base, k), []).append((names[name], base))
    found: dict[str, dict[str, int]] = {}
    every = set(names.values()) | set(mapped)
    for (source, target), pairs in groups.items():
        source, target = _extend(source, target, pairs, every)
        if source:  # an empty source would rename every name: too broad to infer
            found.setdefault(source, {}).setdefault(target, 0)
            found[source][target] += len(pairs)
    return found


def infer_renames(
    names: Mapping[str, str],
    shapes: Mapping[str, Shape],
    base_shapes: Mapping[str, Shape],
    mapped: Iterable[str] = (),
) -> Inference:
    """Renames that explain the fine-tune names no table explained. `names`: fine-tune name -> normalised name
    (`normalise`), for the unmapped names only; `base_shapes`: the base tensors nothing claimed yet; `mapped`:
    the normalised names of the fine-tune tensors mapped already. Pure.

    Each unmapped name is aligned with the base tensor of the same shape whose name shares its longest ending
    (at least two segments); the prefixes in front of the shared ending are the rename. A rename is accepted
    only when it maps every name under its source prefix onto a distinct base tensor of the same shape, and
    only if there are few of them; otherwise, or when a name matches several base tensors equally well, the
    names are refused with the candidates and the manifest rule that settles it."""
    aligned, ties = _align(names, shapes, base_shapes)
    candidates = _candidate_renames(names, aligned, mapped)
    problems: list[str] = []
    refused: set[str] = set()
    renames: dict[str, str] = {}
    for source, targets in sorted(candidates.items()):
        under = sorted(n for n in names if names[n].startswith(source))
        if len(targets) == 1:
            renames[source] = next(iter(targets))
            continue
        problems.append(_conflict(source, targets, len(under)))
        refused.update(under)
    mapping, misfits = _apply(names, shapes, base_shapes, renames, refused)
    for source, misfit in sorted(misfits.items()):
        problems.append(misfit)
        refused.update(n for n in names if _rule_for(names[n], renames) == source)
        renames.pop(source)
    if len(renames) > MAX_INFERRED_RENAMES:
        problems.append(_too_many(renames))
        refused.update(n for n in names if _rule_for(names[n], renames) is not None)
        renames = {}
    mapping = {n: b for n, b in mapping.items() if n not in refused}
    problems.extend(_ambiguities(names, ties, set(mapping) | refused))
    refused.update(n for n in ties if n not in mapping)
    counts = {s: sum(1 for n in mapping if _rule_for(names[n], renames) == s) for s in renames}
    found = tuple(InferredRename(s, t, counts[s]) for s, t in sorted(renames.items()) if counts[s])
    return Inference(found, mapping, tuple(problems), frozenset(refused))


def _rule_for(normal: str, renames: Mapping[str, str]) -> str | None:
    """The rename that applies to a name: the longest source prefix it starts with."""
    return max((s for s in renames if normal.startswith(s)), key=len, default=None)


def _apply(
    names: Mapping[str, str],
    shapes: Mapping[str, Shape],
    base_shapes: Mapping[str, Shape],
    renames: Mapping[str, str],
    refused: set[str],
) -> tuple[dict[str, str], dict[str, str]]:
    """Run the renames over every name they cover: (mapping, source -> why it does not fit its module)."""
    mapping: dict[str, str] = {}
    claimed: dict[str, str] = {}
    misfits: dict[str, str] = {}
    for name in sorted(names, key=lambda n: names[n]):
        source = _rule_for(names[name], renames)
        if source is None or name in refused or source in misfits:
            continue
        target = renames[source] + names[name][len(source) :]
        why = None
        if target not in base_shapes:
            why = f"{names[name]} would be {target}, which the base does not have"
        elif tuple(base_shapes[target]) != tuple(shapes[name]):
            why = f"{names[name]} would be {target}, of another shape {list(base_shapes[target])}"
        elif target in claimed:
            why = f"{names[name]} and {claimed[target]} would both be {target}"
        if why is not None:
            misfits[source] = (
                f"inferred rename {source} -> {renames[source]} does not fit its whole module ({why}): "
                f"map these names with `finetune.rename` rules"
            )
            continue
        claimed[target] = names[name]
        mapping[name] = target
    return mapping, misfits


def _conflict(source: str, targets: Mapping[str, int], count: int) -> str:
    options = sorted(targets, key=lambda t: (-targets[t], t))
    return (
        f"fine-tune tensors under {source} ({count}) match base tensors under {' and '.join(options)} (by shape "
        f"and name ending): say which with a `finetune.rename` rule, e.g. {rename_rule(source, options[0])}"
    )


def _too_many(renames: Mapping[str, str]) -> str:
    shown = ", ".join(f"{s} -> {t}" for s, t in sorted(renames.items())[:4])
    return (
        f"the fine-tune's names differ from the base's in {len(renames)} ways ({shown}, ...): too many to infer "
        "safely (is it a fine-tune of this base?); map them with `finetune.rename` rules"
    )


def _ambiguities(
    names: Mapping[str, str], ties: Mapping[str, tuple[list[str], int]], settled: set[str]
) -> list[str]:
    """One problem per fine-tune prefix whose tensors match several base tensors equally well."""
    by_source: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for name, (found, k) in sorted(ties.items()):
        if name in settled:
            continue
        for base in found:
            source, target = _prefixes(names[name], base, k)
            by_source.setdefault(source, set()).add(target)
        source = _prefixes(names[name], found[0], k)[0]
        counts[source] = counts.get(source, 0) + 1
    return [
        f"fine-tune tensors under {source or '(the top level)'} ({counts.get(source, 0)}) match base tensors "
        f"under {' and '.join(sorted(targets))} equally well (same shapes, same name endings): say which with a "
        f"`finetune.rename` rule, e.g. {rename_rule(source, min(targets))}"
        for source, targets in sorted(by_source.items())
    ]


# --------------------------------------------------------------------------------------------------------------
# Tied copies: an output head saved under its own name although the base stores it once


def tied_copies(
    unmapped: Mapping[str, str], shapes: Mapping[str, Shape], base_shapes: Mapping[str, Shape]
) -> dict[str, str]:
    """Fine-tune `lm_head.weight` copies of the input embedding (fine-tune name -> the base's embedding name).

    A base with tied embeddings stores the matrix once, as the embedding; `torch.save(model.state_dict())`, FSDP
    and DeepSpeed write it under both names. It is recognised from names and shapes: the base has no output
    head at all (it could not load without one unless it is tied) and exactly one input embedding of the head's
    shape. Pure; `unmapped` maps fine-tune names to their normalised names."""
    if any(b == "lm_head.weight" or b.endswith(".lm_head.weight") for b in base_shapes):
        return {}
    found: dict[str, str] = {}
    for name, normal in unmapped.items():
        if normal != "lm_head.weight" and not normal.endswith(".lm_head.weight"):
            continue
        embeddings = [
            b
            for b, shape in base_shapes.items()
            if b.endswith("embed_tokens.weight") and tuple(shape) == tuple(shapes[name])
        ]
        if len(embeddings) == 1:
            found[name] = embeddings[0]
    return found if len(found) == 1 else {}


# --------------------------------------------------------------------------------------------------------------
# Everything together


@dataclass(frozen=True)
class NameMapping:
    """Where every fine-tune tensor goes, and what the plan must say about it."""

    mapping: dict[str, str]  # fine-tune name -> base name
    unmapped: tuple[Unmapped, ...]
    renamed: int  # names that needed more than the identity
    tied: dict[str, str]  # fine-tune name of a tied copy -> the base tensor it duplicates
    inferred: tuple[InferredRename, ...]
    problems: tuple[str, ...]

    @property
    def notes(self) -> tuple[str, ...]:
        tied = [
            f"{name} is a copy of the tied {base} (the base stores it once): compared, not written"
            for name, base in sorted(self.tied.items())
        ]
        return tuple(r.note for r in self.inferred) + tuple(tied)


def resolve_names(
    shapes: Mapping[str, Shape],
    base_shapes: Mapping[str, Shape],
    rules: tuple[RenameRule, ...],
    arch: Callable[[], tuple[Renaming, ...]],
) -> NameMapping:
    """Map every fine-tune tensor onto the base: wrappers and manifest rules, then transformers' tables (only
    read when needed), then tied copies and renames inferred from the checkpoints. Pure but for `arch`."""
    shape_map, base_map = dict(shapes), dict(base_shapes)
    mapping, unmapped, renamed = map_names(shape_map, base_map, rules, ())
    if unmapped:
        mapping, unmapped, renamed = map_names(shape_map, base_map, rules, arch())
    missing = {u.name: normalise(u.name, rules) for u in unmapped if u.reason == NOT_IN_BASE}
    if not missing:
        return NameMapping(mapping, unmapped, renamed, {}, (), ())
    tied = tied_copies(missing, shapes, base_shapes)
    claimed = set(mapping.values())
    unclaimed = {b: s for b, s in base_shapes.items() if b not in claimed}
    inference = infer_renames(
        {n: m for n, m in missing.items() if n not in tied},
        shapes,
        unclaimed,
        mapped=[normalise(n, rules) for n in mapping],
    )
    settled = set(tied) | set(inference.mapping) | inference.refused
    return NameMapping(
        mapping={**mapping, **inference.mapping},
        unmapped=tuple(u for u in unmapped if u.name not in settled),
        renamed=renamed + len(inference.mapping),
        tied=tied,
        inferred=inference.renames,
        problems=inference.problems,
    )
