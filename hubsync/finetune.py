"""Read the trainer's output folder from headers only: find the weights (a checkpoint-N, a ZeRO checkpoint, a
PEFT adapter), list its tensors and files, and map every tensor name onto the base through `names`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubsync.errors import FinetuneError
from hubsync.fsio import list_files
from hubsync.manifest import FinetuneSpec
from hubsync.names import Unmapped, architecture_renames, resolve_names
from hubsync.resolve import read_json
from hubsync.safety import check_inputs_stay_inside
from hubsync.tensors import Checkpoint, TensorRef, list_checkpoint

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
WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
)


def is_weight_file(path: str) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in WEIGHT_PATTERNS) and "/" not in path


def is_leftover(path: str) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in LEFTOVER_PATTERNS)


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
    tied: dict[str, str] = field(default_factory=dict)  # fine-tune copy of a tied tensor -> the base tensor


def locate(spec: FinetuneSpec) -> Path:
    """The folder that holds the weights: the fine-tune folder itself, the `checkpoint-N` named by
    `finetune.checkpoint` (default: the newest), or the consolidated copy of a DeepSpeed ZeRO checkpoint.

    A folder that holds both full weights and a PEFT adapter is refused until `finetune.format` says which.
    A ZeRO checkpoint without consolidated weights (`global_stepN/` shards, a `latest` file) is converted with
    deepspeed's own `zero_to_fp32` when deepspeed is installed, into hubsync's cache (never into the fine-tune
    folder, which is read-only to hubsync); without deepspeed the error gives the command that converts it.
    """
    folder = spec.path
    if not folder.is_dir():
        raise FinetuneError(f"fine-tune folder {folder} does not exist: check `finetune.path`")
    if spec.checkpoint is not None:
        chosen = folder / spec.checkpoint
        if not chosen.is_dir():
            raise FinetuneError(f"{chosen} does not exist: check `finetune.checkpoint`")
        return _weights_folder(chosen, spec)
    if _has_weights(folder) or (folder / "adapter_config.json").is_file() or _zero_tag(folder) is not None:
        return _weights_folder(folder, spec)
    checkpoints = sorted(
        (p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)),
        key=lambda p: int(p.name.split("-")[1]),
    )
    return _weights_folder(checkpoints[-1] if checkpoints else folder, spec)


def _has_weights(path: Path) -> bool:
    return any(
        is_weight_file(p.name) and not p.name.startswith("adapter_model")
        for p in path.iterdir()
        if p.is_file()
    )


def _zero_tag(path: Path) -> str | None:
    """The tag (`global_stepN`) of a DeepSpeed ZeRO checkpoint in `path`, or None."""
    latest = path / "latest"
    tags = sorted(p.name for p in path.glob("global_step*") if p.is_dir())
    tag = latest.read_text().strip() if latest.is_file() else (tags[-1] if tags else None)
    if tag is None or not (path / tag).is_dir():
        return None
    shards = [p.name for p in (path / tag).iterdir()]
    return tag if any(n.endswith("_model_states.pt") or "zero_pp_rank_" in n for n in shards) else None


def _weights_folder(path: Path, spec: FinetuneSpec) -> Path:
    has_adapter = (path / "adapter_config.json").is_file()
    has_weights = _has_weights(path)
    if spec.format == "peft":
        if not has_adapter:
            raise FinetuneError(
                f"`finetune.format` is peft, but {path} has no adapter_config.json: check `finetune.path`"
            )
        return path
    if has_weights and has_adapter and spec.format == "auto":
        raise FinetuneError(
            f"{path} holds both full model weights and a PEFT adapter (adapter_config.json): say which one to "
            "build from with `finetune.format: full` or `finetune.format: peft`"
        )
    if has_weights or (has_adapter and spec.format == "auto"):
        return path
    tag = _zero_tag(path)
    if tag is not None:
        return _consolidate_zero(path, tag)
    refuse_fsdp_sharded(path)
    raise FinetuneError(
        f"{path} holds no weights (*.safetensors, pytorch_model*.bin or a PEFT adapter) and no checkpoint-N "
        "folder: point `finetune.path` at the trainer's output folder"
    )


def _consolidate_zero(path: Path, tag: str) -> Path:
    """deepspeed's zero_to_fp32 into hubsync's cache, keyed by the checkpoint's path, tag and shard times."""
    import hashlib
    import inspect
    import shutil

    from hubsync.fsio import cache_dir

    stamp = sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in (path / tag).iterdir())
    key = hashlib.sha256(repr((str(path.resolve()), tag, stamp)).encode()).hexdigest()[:16]
    out = cache_dir() / "zero-to-fp32" / key
    if (out / ".complete").is_file():
        return out  # converted by an earlier build
    script = path / "zero_to_fp32.py"
    target = (
        path.parent / f"{path.name}-fp32"
    )  # for the user's own command: beside, never inside, the checkpoint
    command = (
        f"python {script} {path} {target} --safe_serialization"
        if script.is_file()
        else f"python -m deepspeed.utils.zero_to_fp32 {path} {target} --safe_serialization"
    )
    try:
        from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict
    except ImportError:
        raise FinetuneError(
            f"{path} holds a DeepSpeed ZeRO checkpoint ({tag}/) without consolidated weights, and deepspeed is "
            f"not installed to convert it: run `{command}` where deepspeed is installed, copy the config and "
            f"tokenizer files into {target}, and set `finetune.path` to it"
        ) from None
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        if "output_dir" in inspect.signature(convert_zero_checkpoint_to_fp32_state_dict).parameters:
            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(out), tag=tag, safe_serialization=True)
        else:  # deepspeed before 0.14 writes one pickled file
            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(out / "pytorch_model.bin"), tag=tag)
    except Exception as err:  # deepspeed raises assorted types for a damaged or partial checkpoint
        shutil.rmtree(out, ignore_errors=True)
        raise FinetuneError(
            f"deepspeed could not convert the ZeRO checkpoint {path / tag} ({err}): run `{command}` by hand"
        ) from err
    for item in path.iterdir():  # config and tokenizer travel with the weights; leftovers stay behind
        if item.is_file() and not is_weight_file(item.name) and not is_leftover(item.name):
            shutil.copyfile(item, out / item.name)
    (out / ".complete").touch()
    return out


def refuse_fsdp_sharded(path: Path) -> None:
    """An FSDP SHARDED_STATE_DICT save (`pytorch_model_fsdp_0/` of torch.distributed.checkpoint files) holds
    no state dict hubsync can read tensor by tensor: say how to merge it."""
    for sharded in sorted(path.glob("pytorch_model_fsdp_*")):
        if sharded.is_dir() and (any(sharded.glob("*.distcp")) or (sharded / ".metadata").is_file()):
            merged = path / "merged"
            raise FinetuneError(
                f"{sharded} is an FSDP sharded checkpoint (torch.distributed.checkpoint), which hubsync cannot read: "
                f"merge it with `accelerate merge-weights {sharded} {merged}`, then set `finetune.path` to {merged}"
            )


def read_finetune(
    spec: FinetuneSpec,
    base_tensors: Mapping[str, TensorRef],
    base_config: dict[str, Any],
    *,
    base_repo: str | None = None,
    base_revision: str | None = None,
) -> FinetuneInventory:
    """Read the fine-tune's tensor headers (or adapter) and map every name onto the base."""
    folder = locate(spec)
    files = list_files(folder)
    # Read only what is inside the fine-tune: a weight, config or kept file linked in from elsewhere is refused.
    check_inputs_stay_inside(
        spec.path, folder, [f for f in files if not is_leftover(f)], what="the fine-tune folder"
    )
    notes: list[str] = []
    problems: tuple[str, ...] = ()
    derived: tuple[str, ...] | None = None
    if spec.format == "peft" or (spec.format == "auto" and (folder / "adapter_config.json").is_file()):
        from hubsync.adapters import read_adapter  # a PEFT adapter becomes computed, merged tensors

        adapter = read_adapter(
            folder, base_tensors, base_config, spec, base_repo=base_repo, base_revision=base_revision
        )
        checkpoint, derived, problems = adapter.checkpoint, adapter.tuned_prefixes, adapter.problems
        notes.extend(adapter.notes)
    else:
        checkpoint = list_checkpoint(folder)
    if not checkpoint.tensors:
        raise FinetuneError(f"{folder} holds no tensors: point `finetune.path` at the trainer's output")
    shapes = {name: tuple(info.shape) for name, info in checkpoint.tensors.items()}
    base_shapes = {name: tuple(info.shape) for name, info in base_tensors.items()}
    # transformers' rename table is only read when the names need it (its import takes seconds)
    names = resolve_names(shapes, base_shapes, spec.rename, lambda: architecture_renames(base_config))
    return FinetuneInventory(
        folder=folder,
        checkpoint=checkpoint,
        base_names=names.mapping,
        unmapped=names.unmapped,
        files=files,
        config=read_json(folder / "config.json"),
        renamed=names.renamed,
        notes=(*notes, *names.notes),
        derived_tuned=derived,
        problems=(*problems, *names.problems),
        tied=names.tied,
    )
