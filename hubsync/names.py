"""Name mapping: which base tensor each fine-tune tensor name stands for.

Trainers wrap names (`module.` from DDP, `_orig_mod.` from torch.compile, `base_model.model.` from PEFT) and
transformers renames keys between versions; a tuned vision tower whose names do not match the base is silently
ignored at load time, which is the worst outcome. So every fine-tune tensor must map to exactly one base tensor
of the same shape, or the build stops with the list of offenders. Everything here is pure except
`architecture_renames`, which reads transformers' own rename table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from hubsync.manifest import RenameRule

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")


@dataclass(frozen=True)
class Unmapped:
    """A fine-tune tensor that does not land on exactly one base tensor of the same shape."""

    name: str
    reason: str


def strip_wrappers(name: str) -> str:
    """Remove trainer wrapper prefixes, however they are stacked (`module._orig_mod.x` -> `x`)."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    return name


@dataclass(frozen=True)
class Renaming:
    """A prefix rename known to transformers for one architecture, usable in both directions."""

    pattern: str
    replacement: str


def architecture_renames(config: dict[str, Any]) -> tuple[Renaming, ...]:
    """transformers' own checkpoint key renames for the base's architecture (old names -> new names)."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return ()
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # an older transformers without the table: only the manifest's rules apply
        return ()
    architectures = [a for a in config.get("architectures", []) if isinstance(a, str)]
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


def _reverse(rule: Renaming) -> Renaming | None:
    """new -> old, for a fine-tune saved with newer names than the base (only for plain prefix rules)."""
    literal = rule.pattern.lstrip("^").replace("\\.", ".")
    if not rule.pattern.startswith("^") or re.search(r"[\\()\[\]*+?|{}$]", literal):
        return None
    return Renaming("^" + re.escape(rule.replacement), literal)


def candidate_names(
    name: str, rules: tuple[RenameRule, ...], arch: tuple[Renaming, ...], depth: int = 3
) -> list[str]:
    """Base names this fine-tune name may stand for, most likely first. transformers chains renames (an
    outer class's rule, then the inner model's), so rules are applied repeatedly, in both directions."""
    stripped = strip_wrappers(name)
    for rule in rules:
        stripped = re.sub(rule.pattern, rule.replacement, stripped)
    both_ways = list(arch) + [r for r in (_reverse(a) for a in arch) if r is not None]
    candidates = [stripped]
    frontier = [stripped]
    for _ in range(depth):
        next_frontier = []
        for current in frontier:
            for renaming in both_ways:
                renamed = re.sub(renaming.pattern, renaming.replacement, current, count=1)
                if renamed not in candidates:
                    candidates.append(renamed)
                    next_frontier.append(renamed)
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
            offenders.append(Unmapped(name, "no tensor of that name in the base"))
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
