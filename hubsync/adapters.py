"""A PEFT LoRA adapter as a fine-tune: each targeted base weight becomes a merge computed on demand.

A LoRA folder holds `adapter_config.json` and `adapter_model.safetensors` (or `.bin`): per targeted module a
`lora_A` / `lora_B` pair (fp32, names under PEFT's `base_model.model.` prefix, no adapter name), plus whole
copies of `modules_to_save` and of trained biases. `read_adapter` turns that into a `Checkpoint` the rest of
the pipeline reads like any other fine-tune:

* every targeted weight is a `ComputedTensor` that, when loaded, reads the base tensor and the two factors and
  returns W + scale·(B @ A) in float32. The writer casts it to the output dtype, so the merge is rounded once,
  the way PEFT's own `merge_and_unload()` does it (it adds the fp32 delta into the bf16 weight in place). The
  computed tensor says F32 on purpose: `compare` can then tell a delta that vanished below bf16 resolution
  ("vanished") from no delta at all ("same"), and the plan names the part where it happened.
* whole copies are the adapter file's own tensors, taken like a full fine-tune's.

Memory: one merge holds the base tensor (in fp32), A, B and their product, never more than one module.

The scaling is not stored in the adapter; it follows PEFT 0.21's rules: `lora_alpha / r`, or
`lora_alpha / sqrt(r)` with `use_rslora`, where `rank_pattern` / `alpha_pattern` override `r` / `lora_alpha`
for the modules whose names end with a pattern (the first pattern in the file's order that matches wins).
Adapter kinds whose merge is not a plain W + s·B·A (DoRA, AdaLoRA, IA3, LoHa, LoKr, prompt tuning, ...) are
refused by name, as are LoRA variants whose factors only make sense against a modified base (PiSSA, OLoRA,
CorDA, LoftQ, LoRA-GA before conversion).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubsync import tensors as T
from hubsync.errors import FinetuneError
from hubsync.names import architecture_renames, candidate_names
from hubsync.tensors import Checkpoint, ComputedTensor, TensorRef

if TYPE_CHECKING:
    import torch

    from hubsync.manifest import FinetuneSpec

__all__ = [
    "ADAPTER_CONFIG",
    "Adapter",
    "LoraSettings",
    "is_adapter_folder",
    "read_adapter",
    "read_adapter_settings",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# PEFT types that add virtual tokens instead of changing weights: there is nothing to merge.
_PROMPT_TYPES = {
    "PROMPT_TUNING": "prompt tuning",
    "MULTITASK_PROMPT_TUNING": "multitask prompt tuning",
    "P_TUNING": "P-tuning",
    "PREFIX_TUNING": "prefix tuning",
    "ADAPTION_PROMPT": "adaption prompt (LLaMA-Adapter)",
    "CPT": "context-aware prompt tuning",
}
# Weight-changing PEFT types whose merge is not W + s·B·A.
_OTHER_TYPES = {
    "ADALORA": "AdaLoRA",
    "IA3": "IA3",
    "LOHA": "LoHa",
    "LOKR": "LoKr",
    "OFT": "OFT",
    "BOFT": "BOFT",
    "VERA": "VeRA",
    "FOURIERFT": "FourierFT",
    "XLORA": "X-LoRA",
    "POLY": "Poly",
    "LN_TUNING": "LayerNorm tuning",
    "HRA": "HRA",
    "BONE": "Bone",
    "MISS": "MiSS",
    "RANDLORA": "RandLoRA",
    "SHIRA": "SHiRA",
    "C3A": "C3A",
    "ROAD": "RoAd",
    "VBLORA": "VB-LoRA",
    "TRAINABLE_TOKENS": "trainable tokens",
}
# LoRA config fields that turn on a variant whose merge hubsync does not do, with the variant's name.
_REFUSED_VARIANTS = {
    "use_dora": "DoRA (use_dora: true)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora: true)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "layer replication (layer_replication)",
}
# init_lora_weights values after which the saved factors belong to a residual base that is not stored.
_RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_LINEAR_SHORTHAND = "all-linear"

_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$"
)
_EMBEDDING_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)(?:\.(?P<adapter>[^.]+))?$"
)
_OTHER_ADAPTER_KEY = re.compile(r"\.(lora_magnitude_vector|lora_E|hada_|lokr_|ia3_l|oft_r|boft_)")
_SAVED_COPY = re.compile(r"\.modules_to_save\.[^.]+\.")


def is_adapter_folder(folder: Path) -> bool:
    """Whether `folder` holds a PEFT adapter (its config file is what transformers and PEFT look for)."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class LoraSettings:
    """What `adapter_config.json` says about the merge, validated."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    target_modules: str | tuple[str, ...] | None = None
    exclude_modules: str | tuple[str, ...] | None = None
    modules_to_save: tuple[str, ...] = ()
    base_model_name_or_path: str | None = None
    revision: str | None = None

    def rank(self, module: str) -> int:
        key = _pattern_key(self.rank_pattern, module)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha(self, module: str) -> float:
        key = _pattern_key(self.alpha_pattern, module)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling(self, module: str) -> float:
        """PEFT's `scaling[adapter]` for this module (a Python float, as PEFT keeps it)."""
        rank, alpha = self.rank(module), self.alpha(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def targets(self, module: str, is_linear: bool) -> bool:
        """Whether `target_modules` / `exclude_modules` select this module (PEFT's matching, layer filters aside):
        a string is a regular expression that must match the whole module name, a list names suffixes."""
        if self.exclude_modules is not None:
            if isinstance(self.exclude_modules, str):
                if re.fullmatch(self.exclude_modules, module):
                    return False
            elif module in self.exclude_modules or any(
                module.endswith(f".{e}") for e in self.exclude_modules
            ):
                return False
        if self.target_modules is None:
            return True  # PEFT fills in defaults per architecture; nothing to hold the weights against
        if isinstance(self.target_modules, str):
            if self.target_modules == _LINEAR_SHORTHAND:
                return is_linear
            return re.fullmatch(self.target_modules, module) is not None
        return module in self.target_modules or any(module.endswith(f".{t}") for t in self.target_modules)


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    # peft.utils.other.get_pattern_key: the first key (in the file's order) that ends the module name at a dot.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _config_error(folder: Path, what: str) -> FinetuneError:
    return FinetuneError(f"{folder / ADAPTER_CONFIG} {what}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _names(value: object, key: str, folder: Path) -> str | tuple[str, ...] | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise _config_error(folder, f"has an invalid {key} {value!r}: expected a regex string or a list of names")


def read_adapter_settings(folder: Path) -> LoraSettings:
    """Read and check `adapter_config.json`; refuse, by name, every adapter hubsync cannot merge exactly."""
    doc = _config_document(Path(folder))
    _refuse_unmergeable(doc, folder)
    r, alpha = doc.get("r"), doc.get("lora_alpha")
    if not (isinstance(r, int) and not isinstance(r, bool) and r > 0):
        raise _config_error(folder, f"has an invalid r {r!r}: expected a positive integer")
    if not _is_number(alpha):
        raise _config_error(folder, f"has an invalid lora_alpha {alpha!r}: expected a number")
    rank_pattern, alpha_pattern = (
        _pattern(doc, "rank_pattern", folder),
        _pattern(doc, "alpha_pattern", folder),
    )
    if any(not float(v).is_integer() or v <= 0 for v in rank_pattern.values()):
        raise _config_error(
            folder, f"has an invalid rank_pattern {rank_pattern!r}: ranks are positive integers"
        )
    modules_to_save = doc.get("modules_to_save") or ()
    if not isinstance(modules_to_save, (list, tuple)) or not all(isinstance(m, str) for m in modules_to_save):
        raise _config_error(
            folder, f"has an invalid modules_to_save {modules_to_save!r}: expected a list of names"
        )
    for key in ("use_rslora", "fan_in_fan_out", "lora_bias"):
        if not isinstance(doc.get(key, False), bool):
            raise _config_error(folder, f"has an invalid {key} {doc.get(key)!r}: expected true or false")
    base_name, revision = doc.get("base_model_name_or_path"), doc.get("revision")
    return LoraSettings(
        r=r,
        lora_alpha=float(alpha) if isinstance(alpha, float) else alpha,
        use_rslora=bool(doc.get("use_rslora", False)),
        rank_pattern={k: int(v) for k, v in rank_pattern.items()},
        alpha_pattern=dict(alpha_pattern),
        fan_in_fan_out=bool(doc.get("fan_in_fan_out", False)),
        lora_bias=bool(doc.get("lora_bias", False)),
        target_modules=_target_modules(doc, folder),
        exclude_modules=_names(doc.get("exclude_modules"), "exclude_modules", folder),
        modules_to_save=tuple(modules_to_save),
        base_model_name_or_path=base_name if isinstance(base_name, str) and base_name else None,
        revision=revision if isinstance(revision, str) and revision else None,
    )


def _config_document(folder: Path) -> dict[str, Any]:
    from hubsync.fsio import read_json_object

    doc = read_json_object(
        folder / ADAPTER_CONFIG, error=FinetuneError, fix="re-save the adapter with save_pretrained()"
    )
    if doc is None:
        raise FinetuneError(
            f"{folder} has no {ADAPTER_CONFIG}: it is not a PEFT adapter; set `finetune.format`"
        )
    return doc


def _refuse_unmergeable(doc: dict[str, Any], folder: Path) -> None:
    """Adapter types and LoRA variants whose merge is not a plain W + s·B·A, refused by name."""
    peft_type = doc.get("peft_type")
    if not isinstance(peft_type, str):
        raise _config_error(folder, "has no peft_type: re-save the adapter with PEFT's save_pretrained()")
    kind = peft_type.upper()
    if kind in _PROMPT_TYPES:
        raise FinetuneError(
            f"{folder} is a {_PROMPT_TYPES[kind]} adapter (peft_type {peft_type}): it adds virtual tokens and has "
            "no weights to merge; serve it with PEFT on top of the base instead"
        )
    if kind != "LORA":
        name = _OTHER_TYPES.get(kind, peft_type)
        raise FinetuneError(
            f"{folder} is a {name} adapter (peft_type {peft_type}): hubsync merges only LoRA; merge it with "
            "PEFT's merge_and_unload(), save that, and point `finetune.path` at the merged folder"
        )
    for key, name in _REFUSED_VARIANTS.items():
        if doc.get(key):
            raise FinetuneError(
                f"{folder} is a {name} adapter: hubsync merges plain LoRA only; merge it with PEFT's "
                "merge_and_unload(), save that, and point `finetune.path` at the merged folder"
            )
    init = doc.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_RESIDUAL_INITS):
        raise FinetuneError(
            f"{folder} is a LoRA initialised with {init!r}: its factors apply to a modified base that is not "
            "stored; re-save it with save_pretrained(path_initial_model_for_weight_conversion=...) to get a "
            "plain LoRA against the original base"
        )


def _pattern(doc: dict[str, Any], key: str, folder: Path) -> dict[str, Any]:
    """rank_pattern / alpha_pattern: module-name regex -> number."""
    value = doc.get(key) or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and _is_number(v) for k, v in value.items()):
        raise _config_error(folder, f"has an invalid {key} {value!r}: expected module name -> number")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as err:
            raise _config_error(
                folder, f"{key} key {pattern!r} is not a valid regular expression ({err})"
            ) from None
    return value


def _target_modules(doc: dict[str, Any], folder: Path) -> str | tuple[str, ...] | None:
    target = _names(doc.get("target_modules"), "target_modules", folder)
    if isinstance(target, str) and target != _LINEAR_SHORTHAND:
        try:
            re.compile(target)
        except re.error as err:
            raise _config_error(
                folder, f"target_modules {target!r} is not a valid regular expression ({err})"
            ) from None
    return target


# ------------------------------------------------------------------------------------------------ weights


def _adapter_tensors(folder: Path) -> tuple[Path, dict[str, TensorRef]]:
    """The adapter file and its tensors (headers only for safetensors; a memory-mapped listing for .bin)."""
    st, binary = folder / ADAPTER_SAFETENSORS, folder / ADAPTER_BIN
    if st.is_file():  # PEFT prefers safetensors when both exist
        return st, dict(T.read_safetensors_header(st).tensors)
    if binary.is_file():
        return binary, dict(T.list_bin(binary, FinetuneError))
    raise FinetuneError(
        f"{folder} has {ADAPTER_CONFIG} but neither {ADAPTER_SAFETENSORS} nor {ADAPTER_BIN}: copy the adapter "
        "weights next to it, or point `finetune.path` at the folder that has them"
    )


@dataclass
class _Module:
    """The LoRA tensors the file holds for one module (module names as PEFT saw them at training time)."""

    name: str
    embedding: bool = False
    a: TensorRef | None = None
    b: TensorRef | None = None
    b_bias: TensorRef | None = None


@dataclass(frozen=True)
class Adapter:
    """A LoRA adapter read as a fine-tune. `checkpoint.tensors` maps fine-tune names (PEFT's, prefix included)
    to merges (`ComputedTensor`) and whole copies; `tuned_prefixes` are in base naming."""

    folder: Path
    weights_file: Path
    settings: LoraSettings
    checkpoint: Checkpoint
    tuned_prefixes: tuple[str, ...]
    problems: tuple[str, ...]
    notes: tuple[str, ...]
    merged: tuple[str, ...]  # base names of the merged weights (and biases, with lora_bias)
    copied: tuple[str, ...]  # base names of the whole copies


def _delta(
    a: torch.Tensor, b: torch.Tensor, *, kind: str, fan_in_fan_out: bool, scaling: float
) -> torch.Tensor:
    """scale · B @ A in float32, with the same operations in the same order as PEFT's `get_delta_weight`, so
    that the result is PEFT's to the bit."""
    import torch

    # The scaling is applied in place: the same multiplication, value for value, without a second tensor of
    # the weight's size (a merge allocates its weight's size three times, not four).
    if kind == "embedding":
        return (b @ a).mul_(scaling).T
    if kind == "conv2d":
        if a.shape[2:4] == (1, 1):
            return (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).mul_(scaling).unsqueeze(2).unsqueeze(3)
        return torch.nn.functional.conv2d(a.transpose(0, 1), b).mul_(scaling).transpose(0, 1)
    product = (b @ a).mul_(scaling)
    return product.T if fan_in_fan_out else product


def _merge(
    base: TensorRef,
    base_dtype: str,
    a: TensorRef,
    b: TensorRef,
    *,
    kind: str,
    fan_in_fan_out: bool,
    scaling: float,
) -> Callable[[], torch.Tensor]:
    def compute() -> torch.Tensor:
        import torch

        # The model PEFT merges into holds the weight in the base dtype (a whole copy saved in the adapter
        # is loaded into it first), so the fp32 sum starts from that value.
        weight = T.load_tensor(base).to(T.torch_dtype(base_dtype)).to(torch.float32)
        delta = _delta(
            T.load_tensor(a).to(torch.float32),
            T.load_tensor(b).to(torch.float32),
            kind=kind,
            fan_in_fan_out=fan_in_fan_out,
            scaling=scaling,
        )
        weight += delta
        return weight

    return compute


def _merge_bias(
    base: TensorRef, base_dtype: str, lora_bias: TensorRef, scaling: float
) -> Callable[[], torch.Tensor]:
    def compute() -> torch.Tensor:
        import torch

        bias = T.load_tensor(base).to(T.torch_dtype(base_dtype)).to(torch.float32)
        bias = bias + T.load_tensor(lora_bias).to(torch.float32) * scaling
        return bias

    return compute


def _base_name(
    name: str, base_tensors: Mapping[str, TensorRef], spec: FinetuneSpec | None, config: dict[str, Any]
) -> str | None:
    """The base tensor a fine-tune tensor name stands for, by the same rules the pipeline maps names with."""
    rules = spec.rename if spec is not None else ()
    return next((c for c in candidate_names(name, rules, _arch(config)) if c in base_tensors), None)


_ARCH_CACHE: dict[str, Any] = {}


def _arch(config: dict[str, Any]) -> Any:
    key = json.dumps([config.get("model_type"), config.get("architectures")], sort_keys=True, default=str)
    if key not in _ARCH_CACHE:
        _ARCH_CACHE[key] = architecture_renames(config)
    return _ARCH_CACHE[key]


def part_prefix(base_name: str) -> str:
    """The model part a tensor belongs to, as a dotted prefix: its first component, or the first two when the
    first only wraps the whole model (`model.`, `transformer.`): `language_model.`, `vpm.`, `model.layers.`."""
    parts = base_name.split(".")
    depth = 1
    while depth < len(parts) - 1 and parts[depth - 1] in ("model", "transformer", "base_model"):
        depth += 1
    return ".".join(parts[:depth]) + "."


def _cache_identity(base_tensors: Mapping[str, TensorRef]) -> tuple[str | None, str | None]:
    """(repo id, commit sha) when the base files live in a Hugging Face cache snapshot folder."""
    for info in base_tensors.values():
        match = re.search(r"models--([^/]+?)--([^/]+)/snapshots/([0-9a-f]{40})/", info.file.as_posix())
        if match:
            return f"{match.group(1)}/{match.group(2)}", match.group(3)
        break
    return None, None


def _lineage_notes(
    settings: LoraSettings,
    base_tensors: Mapping[str, TensorRef],
    base_repo: str | None,
    base_revision: str | None,
) -> list[str]:
    """Where the adapter says it was trained, against the manifest's base: a note, never a stop (local paths
    and renamed mirrors are common), but one a reader of the plan must see."""
    notes: list[str] = []
    cached_repo, cached_sha = _cache_identity(base_tensors)
    repo = base_repo or cached_repo
    revision = base_revision or cached_sha
    named = settings.base_model_name_or_path
    if named is not None:
        if repo is not None:
            if named != repo and not Path(named).is_dir():
                notes.append(
                    f"the adapter was trained on '{named}' (adapter_config.json base_model_name_or_path), "
                    f"but the manifest's base is '{repo}': check that this is the model the adapter belongs to"
                )
        else:
            folder = next(iter(base_tensors.values())).file.parent if base_tensors else None
            same_folder = (
                folder is not None and Path(named).is_dir() and Path(named).resolve() == folder.resolve()
            )
            if not same_folder and (folder is None or Path(named).name != folder.name):
                notes.append(
                    f"the adapter was trained on '{named}' (adapter_config.json base_model_name_or_path), "
                    f"but the manifest's base is the local folder {folder}: check that it is the same model"
                )
    if settings.revision is not None and revision is not None and settings.revision != revision:
        notes.append(
            f"the adapter was trained on revision '{settings.revision}' (adapter_config.json revision), but the "
            f"manifest's base is at '{revision}': check that the weights are the same"
        )
    return notes


@dataclass
class _Reading:
    """What reading an adapter collects as it goes, module by module."""

    settings: LoraSettings
    weights_file: Path
    base_tensors: Mapping[str, TensorRef]
    base_config: dict[str, Any]
    spec: FinetuneSpec | None
    copies: dict[str, TensorRef] = field(default_factory=dict)
    tensors: dict[str, TensorRef] = field(default_factory=dict)
    merged: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    tuned: set[str] = field(default_factory=set)
    unselected: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def base_name(self, key: str) -> str | None:
        return _base_name(key, self.base_tensors, self.spec, self.base_config)


def read_adapter(
    folder: Path,
    base_tensors: Mapping[str, TensorRef],
    base_config: dict[str, Any],
    spec: FinetuneSpec | None = None,
    *,
    base_repo: str | None = None,
    base_revision: str | None = None,
) -> Adapter:
    """Read a LoRA adapter folder against the base's tensors: merges for targeted weights, whole copies for
    `modules_to_save` and trained biases, every inconsistency as a one-line problem.

    Raises FinetuneError for what makes the adapter unusable as a whole (no or corrupt config, a refused
    adapter type or variant, missing weights, nothing that lands on the base)."""
    folder = Path(folder)
    settings = read_adapter_settings(folder)
    weights_file, stored = _adapter_tensors(folder)
    reading = _Reading(settings, weights_file, base_tensors, base_config, spec)
    reading.notes.extend(_lineage_notes(settings, base_tensors, base_repo, base_revision))
    modules = _sort_stored(stored, reading)
    for module in sorted(modules.values(), key=lambda m: m.name):
        _merge_module(module, reading)
    _note_selection(modules, reading)
    _take_copies(reading)
    if not reading.tensors or (modules and not reading.merged):
        # Nothing of the adapter fits: one message, not a problem per module.
        problems = reading.problems
        first = f": {problems[0]}" if problems else ""
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise FinetuneError(
            f"none of the {len(modules)} LoRA module(s) in {folder} lands on the base: check that `base` is the "
            f"model the adapter was trained on{first}{more}"
        )
    reading.notes.insert(0, _summary_note(reading))
    checkpoint = Checkpoint(
        folder=folder,
        format="bin" if weights_file.suffix == ".bin" else "safetensors",
        files=(weights_file,),
        tensors=reading.tensors,
    )
    return Adapter(
        folder=folder,
        weights_file=weights_file,
        settings=settings,
        checkpoint=checkpoint,
        tuned_prefixes=_outermost(reading.tuned),
        problems=tuple(reading.problems),
        notes=tuple(reading.notes),
        merged=tuple(reading.merged),
        copied=tuple(reading.copied),
    )


def _sort_stored(stored: Mapping[str, TensorRef], reading: _Reading) -> dict[str, _Module]:
    """The adapter file's tensors: LoRA factors per module, and whole copies (into `reading.copies`)."""
    modules: dict[str, _Module] = {}
    for key, info in stored.items():
        name = key.removeprefix(PEFT_PREFIX)
        lora = _LORA_KEY.match(name)
        emb = _EMBEDDING_KEY.match(name) if lora is None else None
        if lora is not None:
            module = modules.setdefault(lora["module"], _Module(lora["module"]))
            if lora["part"] == "lora_A" and lora["param"] == "weight":
                module.a = info
            elif lora["part"] == "lora_B" and lora["param"] == "weight":
                module.b = info
            elif lora["part"] == "lora_B":
                module.b_bias = info
            else:
                reading.problems.append(
                    f"{reading.weights_file.name} holds {key}: lora_A has no bias in PEFT; re-save the adapter"
                )
        elif emb is not None:
            module = modules.setdefault(emb["module"], _Module(emb["module"], embedding=True))
            module.embedding = True
            if emb["part"] == "lora_embedding_A":
                module.a = info
            else:
                module.b = info
        elif _OTHER_ADAPTER_KEY.search("." + name):
            raise FinetuneError(
                f"{reading.weights_file.name} holds {key}, which is not plain LoRA (DoRA, AdaLoRA or another "
                f"method) although {ADAPTER_CONFIG} says LORA: re-save the adapter, or merge it with PEFT's "
                "merge_and_unload()"
            )
        elif (
            ".original_module." not in name
        ):  # the frozen original beside a modules_to_save copy: the base has it
            reading.copies[_SAVED_COPY.sub(".", name)] = info
    return modules


def _layer_kind(module: _Module, shape: tuple[int, ...]) -> str:
    return "embedding" if module.embedding else {2: "linear", 4: "conv2d"}.get(len(shape), "other")


def _delta_shape(kind: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], fan_in_fan_out: bool) -> Any:
    """The shape of B @ A as PEFT merges it for this kind of layer, or None when the factors do not multiply."""
    if kind == "linear":
        shape = (b_shape[0], a_shape[1]) if len(a_shape) == len(b_shape) == 2 else None
        return (shape[1], shape[0]) if shape is not None and fan_in_fan_out else shape
    if kind == "embedding":
        return (a_shape[1], b_shape[0]) if len(a_shape) == len(b_shape) == 2 else None
    ok = len(a_shape) == 4 and b_shape[2:] == (1, 1) and len(b_shape) == 4
    return (b_shape[0], a_shape[1], *a_shape[2:]) if ok else None


def _factor_problem(
    module: _Module, kind: str, base_weight: str, shape: tuple[int, ...], reading: _Reading
) -> str | None:
    """Why the module's factors cannot merge into the base weight, or None."""
    assert module.a is not None and module.b is not None
    where = f"{reading.weights_file.name}: {module.name}"
    settings = reading.settings
    if kind == "other":
        return (
            f"{where}: the base weight {base_weight} has {len(shape)} dimensions; hubsync merges LoRA on "
            "linear, embedding and 2-D convolution layers only"
        )
    rank = settings.rank(module.name)
    a_shape, b_shape = tuple(module.a.shape), tuple(module.b.shape)
    a_rank, b_rank = a_shape[0], b_shape[1] if len(b_shape) > 1 else -1
    if a_rank != rank or b_rank != rank:
        return (
            f"{where}: lora_A/lora_B have rank {a_rank}/{b_rank}, but {ADAPTER_CONFIG} gives r={rank} for this "
            "module (r, rank_pattern): the config does not belong to these weights"
        )
    delta_shape = _delta_shape(kind, a_shape, b_shape, settings.fan_in_fan_out)
    if delta_shape == shape:
        return None
    flipped = kind == "linear" and delta_shape and delta_shape[::-1] == shape
    return (
        f"{where}: lora_B @ lora_A is {list(delta_shape) if delta_shape else 'not a matrix product'}, but the "
        f"base's {base_weight} is {list(shape)}: the adapter was made for another model"
        + (" (or fan_in_fan_out is wrong)" if flipped else "")
    )


def _merge_module(module: _Module, reading: _Reading) -> None:
    """One LoRA module: its weight (and bias) merge, or the problem that prevents it."""
    where = f"{reading.weights_file.name}: {module.name}"
    if module.a is None or module.b is None:
        present = "lora_A" if module.b is None else "lora_B"
        reading.problems.append(f"{where} has only {present}: the adapter file is incomplete; re-save it")
        return
    weight_key = f"{PEFT_PREFIX}{module.name}.weight"
    base_weight = reading.base_name(weight_key)
    if base_weight is None:
        reading.problems.append(
            f"{where} has LoRA weights, but the base has no {module.name}.weight: the adapter targets a "
            "module this base does not have (made for another model?)"
        )
        return
    base_info = reading.base_tensors[base_weight]
    shape = tuple(base_info.shape)
    kind = _layer_kind(module, shape)
    if kind != "other" and not reading.settings.targets(module.name, kind == "linear"):
        reading.unselected.append(module.name)
    problem = _factor_problem(module, kind, base_weight, shape, reading)
    if problem is not None:
        reading.problems.append(problem)
        return
    settings = reading.settings
    # A whole copy of the module's own weight in the adapter (embedding layers PEFT saved alongside, a
    # trained bias) is what PEFT loads into the base layer before it merges: start from that.
    copies = reading.copies
    start = copies.pop(f"{module.name}.base_layer.weight", None) or copies.pop(f"{module.name}.weight", None)
    reading.tensors[weight_key] = ComputedTensor(
        name=weight_key,
        dtype="F32",
        shape=shape,
        compute=_merge(
            start or base_info,
            base_info.dtype,
            module.a,
            module.b,
            kind=kind,
            fan_in_fan_out=settings.fan_in_fan_out and kind == "linear",
            scaling=settings.scaling(module.name),
        ),
    )
    reading.merged.append(base_weight)
    reading.tuned.add(part_prefix(base_weight))
    _merge_module_bias(module, reading)


def _merge_module_bias(module: _Module, reading: _Reading) -> None:
    where = f"{reading.weights_file.name}: {module.name}"
    settings = reading.settings
    if module.b_bias is None:
        if settings.lora_bias:
            reading.problems.append(
                f"{where}: {ADAPTER_CONFIG} says lora_bias: true, but the file has no lora_B.bias; re-save the adapter"
            )
        return
    if not settings.lora_bias:
        reading.problems.append(
            f"{where} has lora_B.bias, but {ADAPTER_CONFIG} says lora_bias: false; re-save the adapter"
        )
        return
    bias_key = f"{PEFT_PREFIX}{module.name}.bias"
    base_bias = reading.base_name(bias_key)
    if base_bias is None:
        reading.problems.append(
            f"{where} has a LoRA bias, but the base layer has no bias: PEFT cannot merge it either"
        )
        return
    bias_info = reading.base_tensors[base_bias]
    if tuple(module.b_bias.shape) != tuple(bias_info.shape):
        reading.problems.append(
            f"{where}: lora_B.bias is {list(module.b_bias.shape)}, the base's {base_bias} is {list(bias_info.shape)}"
        )
        return
    copies = reading.copies
    start = copies.pop(f"{module.name}.base_layer.bias", None) or copies.pop(f"{module.name}.bias", None)
    reading.tensors[bias_key] = ComputedTensor(
        name=bias_key,
        dtype="F32",
        shape=tuple(bias_info.shape),
        compute=_merge_bias(
            start or bias_info, bias_info.dtype, module.b_bias, settings.scaling(module.name)
        ),
    )
    reading.merged.append(base_bias)


def _note_selection(modules: dict[str, _Module], reading: _Reading) -> None:
    """LoRA weights that target_modules does not select (PEFT would ignore them), and targets with no weights."""
    settings, unselected = reading.settings, reading.unselected
    if unselected:
        shown = ", ".join(unselected[:3]) + (
            f" and {len(unselected) - 3} more" if len(unselected) > 3 else ""
        )
        reading.problems.append(
            f"{reading.weights_file.name} has LoRA weights for {shown}, which target_modules "
            f"{settings.target_modules!r} does not select: PEFT would ignore them; fix target_modules in "
            "adapter_config.json or re-save the adapter"
        )
    if isinstance(settings.target_modules, tuple):
        unused = [
            t for t in settings.target_modules if not any(m == t or m.endswith(f".{t}") for m in modules)
        ]
        if unused:
            reading.notes.append(
                f"target_modules {', '.join(unused)} matched no LoRA weights in {reading.weights_file.name}"
            )


def _take_copies(reading: _Reading) -> None:
    """Whole copies (modules_to_save, trained biases) become fine-tune tensors as they are."""
    for name, info in reading.copies.items():
        key = f"{PEFT_PREFIX}{name}"
        reading.tensors[key] = info
        base = reading.base_name(key)
        if base is not None:  # an unmatched copy is reported by the pipeline's name mapping
            reading.copied.append(base)
            reading.tuned.add(part_prefix(base))
    for wanted in reading.settings.modules_to_save:
        if not any(re.search(rf"(^|\.){re.escape(wanted)}\.", name) for name in reading.copies):
            reading.notes.append(
                f"modules_to_save lists '{wanted}', but the adapter holds no weights for it: taken from the base"
            )


def _summary_note(reading: _Reading) -> str:
    settings = reading.settings
    scale_rule = "alpha/sqrt(r)" if settings.use_rslora else "alpha/r"
    patterns = " with rank_pattern/alpha_pattern" if settings.rank_pattern or settings.alpha_pattern else ""
    return (
        f"PEFT LoRA adapter (r={settings.r}, lora_alpha={settings.lora_alpha:g}, scale {scale_rule}{patterns}"
        + (", fan_in_fan_out" if settings.fan_in_fan_out else "")
        + f"): {len(reading.merged)} base tensor(s) merged as W + scale·B·A in float32 and rounded once to the "
        f"output dtype; {len(reading.copied)} tensor(s) taken whole from the adapter (modules_to_save, trained "
        "biases)"
    )


def _outermost(prefixes: set[str]) -> tuple[str, ...]:
    return tuple(sorted(p for p in prefixes if not any(p != q and p.startswith(q) for q in prefixes)))
