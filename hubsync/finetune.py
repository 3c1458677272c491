"""Read the trainer's output folder from headers only, and map its tensor names onto the base's names.

Trainers wrap names (`module.` from DDP, `_orig_mod.` from torch.compile, `base_model.model.` from PEFT) and
transformers renames keys between versions; a tuned vision tower whose names do not match the base is silently
ignored at load time, which is the worst outcome. So every fine-tune tensor must map to exactly one base tensor
of the same shape, or the build stops with the list of offenders.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Mapping

from hubsync.errors import FinetuneError
from hubsync.manifest import FinetuneSpec, RenameRule
from hubsync.resolve import list_files, read_json
from hubsync.tensors import Checkpoint, TensorRef, list_checkpoint

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")

# What trainers leave beside the weights; none of it belongs in a published model repo.
LEFTOVER_PATTERNS = (
    "training_args.bin",
    "trainer_state.json",
    "optimizer.pt",
    "optimizer.bin",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "latest",
    "zero_to_fp32.py",
    "checkpoint-*/*",
    "global_step*/*",
    "runs/*",
    "all_results.json",
    "train_results.json",
    "eval_results.json",
    "trainer_log*.jsonl",
    "adapter_config.json",
    "adapter_model.*",
)
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json")


def is_weight_file(path: str) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in WEIGHT_PATTERNS) and "/" not in path


def is_leftover(path: str) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in LEFTOVER_PATTERNS)


@dataclass(frozen=True)
class Unmapped:
    """A fine-tune tensor that does not land on exactly one base tensor of the same shape."""

    name: str
    reason: str


@dataclass(frozen=True)
class FinetuneInventory:
    """The fine-tune folder as read from headers: tensors, their base names, and its other files."""

    folder: Path
    checkpoint: Checkpoint
    base_names: dict[str, str]  # fine-tune tensor name -> base tensor name
    unmapped: tuple[Unmapped, ...]
    files: tuple[str, ...]  # every file in the folder, repo-relative
    config: dict[str, Any]
    renamed: int = 0  # how many names needed more than the identity to match
    notes: tuple[str, ...] = field(default_factory=tuple)
    derived_tuned: tuple[str, ...] | None = None  # tuned prefixes implied by the source (a PEFT adapter)
    problems: tuple[str, ...] = field(default_factory=tuple)  # source-specific findings that stop the build


def locate(spec: FinetuneSpec) -> Path:
    """The folder that holds the weights: the fine-tune folder itself, or one of its `checkpoint-N`."""
    folder = spec.path
    if not folder.is_dir():
        raise FinetuneError(f"Fine-tune folder {folder} does not exist: check `finetune.path`.")
    if spec.checkpoint is not None:
        chosen = folder / spec.checkpoint
        if not chosen.is_dir():
            raise FinetuneError(f"{chosen} does not exist: check `finetune.checkpoint`.")
        return chosen
    has_weights = any(is_weight_file(p.name) for p in folder.iterdir() if p.is_file())
    if has_weights:
        return folder
    checkpoints = sorted(
        (p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)),
        key=lambda p: int(p.name.split("-")[1]),
    )
    if checkpoints:
        return checkpoints[-1]
    raise FinetuneError(
        f"{folder} holds no weights (*.safetensors or pytorch_model*.bin) and no checkpoint-N folder: "
        "point `finetune.path` at the trainer's output folder."
    )


def strip_wrappers(name: str) -> str:
    """Remove trainer wrapper prefixes, however they are stacked (`module._orig_mod.x` -> `x`)."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
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


def candidate_names(name: str, rules: tuple[RenameRule, ...], arch: tuple[Renaming, ...], depth: int = 3) -> list[str]:
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


def read_finetune(
    spec: FinetuneSpec, base_tensors: Mapping[str, TensorRef], base_config: dict[str, Any]
) -> FinetuneInventory:
    """Read the fine-tune's tensor headers (or adapter) and map every name onto the base."""
    folder = locate(spec)
    notes: list[str] = []
    problems: tuple[str, ...] = ()
    derived: tuple[str, ...] | None = None
    if spec.format == "peft" or (spec.format == "auto" and (folder / "adapter_config.json").is_file()):
        from hubsync.adapters import read_adapter  # a PEFT adapter becomes computed, merged tensors

        adapter = read_adapter(folder, base_tensors, base_config, spec)
        checkpoint, derived, problems = adapter.checkpoint, adapter.tuned_prefixes, adapter.problems
        notes.extend(adapter.notes)
    else:
        checkpoint = list_checkpoint(folder)
    if not checkpoint.tensors:
        raise FinetuneError(f"{folder} holds no tensors: point `finetune.path` at the trainer's output.")
    shapes = {name: tuple(info.shape) for name, info in checkpoint.tensors.items()}
    base_shapes = {name: tuple(info.shape) for name, info in base_tensors.items()}
    mapping, unmapped, renamed = map_names(shapes, base_shapes, spec.rename, architecture_renames(base_config))
    return FinetuneInventory(
        folder=folder,
        checkpoint=checkpoint,
        base_names=mapping,
        unmapped=unmapped,
        files=list_files(folder),
        config=read_json(folder / "config.json"),
        renamed=renamed,
        notes=tuple(notes),
        derived_tuned=derived,
        problems=problems,
    )


def raise_for_unmapped(inventory: FinetuneInventory, limit: int = 20) -> None:
    if not inventory.unmapped:
        return
    shown = "; ".join(f"{u.name}: {u.reason}" for u in inventory.unmapped[:limit])
    more = f" (and {len(inventory.unmapped) - limit} more)" if len(inventory.unmapped) > limit else ""
    raise FinetuneError(
        f"{len(inventory.unmapped)} fine-tune tensor(s) do not map onto the base: {shown}{more}. "
        "Check that `base` is the model that was fine-tuned, or add `finetune.rename` rules."
    )
