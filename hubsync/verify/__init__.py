"""`hubsync verify`: prove that a build loads and runs before anyone sees it.

Three groups of checks, cheapest first: files (what a loader needs, auto_map, tokenizer, processor, chat
template, config pairs), weights from headers and bytes without loading a model, then load-and-run with
transformers: the base and the build are loaded one after the other (never both at once on the device), and
only small outputs are kept between them. Every check has a one-line verdict and its evidence; the record goes
into hubsync.json together with the sha256 of every file it covered, which is what `hubsync push` checks.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hubsync import tensors as T
from hubsync.errors import HubsyncError, VerifyError
from hubsync.tuned import matches

log = logging.getLogger("hubsync")
PROVENANCE = "hubsync.json"
SAMPLE_TEXT = "Describe the image. There is a white cat sitting on a brown table."
DEFAULT_PROMPT = "Describe the image."
VISION_HINTS = (
    "vpm",
    "vision",
    "visual",
    "resampler",
    "multi_modal_projector",
    "mm_projector",
    "connector",  # Idefics3 / SmolVLM's projector
    "image",
    "img",
)
# Same weights, same inputs, same kernels give the same logits on a CPU; GPU kernels may reorder sums.
TOLERANCE = {"cpu": 0.0, "cuda": 1e-2}


@dataclass
class Check:
    name: str
    ok: bool | None  # None: not applicable / skipped, with the reason in detail
    detail: str
    evidence: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    folder: Path
    device: str = "cpu"
    checks: list[Check] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    device_map: str | None = None

    @property
    def passed(self) -> bool:
        return all(c.ok is not False for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    def add(
        self, name: str, ok: bool | None, detail: str, evidence: list[str] | None = None, **figures: Any
    ) -> Check:
        check = Check(name, ok, detail, evidence or [], figures)
        self.checks.append(check)
        log.debug("%s %s: %s", {True: "pass", False: "FAIL", None: "skip"}[ok], name, detail)
        return check

    def to_record(self, files: dict[str, str]) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "device": self.device,
            "device_map": self.device_map,
            "versions": self.versions,
            "checks": [asdict(c) for c in self.checks],
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "peak_memory_bytes": self.memory,
            "files_sha256": files,
        }


# --------------------------------------------------------------------------------------------- the inputs


@dataclass(frozen=True)
class Subject:
    """What is verified: the build folder and, from its hubsync.json, the base and the fine-tune."""

    folder: Path
    record: dict[str, Any]
    base_folder: Path
    finetune_folder: Path | None
    trust_remote_code: bool
    device: str
    prompt: str
    image: Path | None

    @property
    def tuned_prefixes(self) -> tuple[str, ...]:
        declared = self.record.get("manifest", {}).get("finetune", {}).get("tuned")
        # an adapter implies its tuned parts; the plan recorded them per prefix
        return tuple(declared or (p["prefix"] for p in self.record.get("prefixes", [])))


def load_subject(target: Path) -> Subject:
    """A build folder (its hubsync.json says where the base and the fine-tune are) or a manifest."""
    if target.is_file():
        from hubsync.manifest import load_manifest

        target = load_manifest(target).output.dir
    if not target.is_dir():
        raise VerifyError(f"{target} is neither a build folder nor a manifest: run `hubsync build` first.")
    path = target / PROVENANCE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VerifyError(
            f"{target} has no {PROVENANCE}: it was not built by hubsync; run `hubsync build`."
        ) from None
    except ValueError as err:
        raise VerifyError(f"{path} is not valid JSON ({err}): rebuild with `hubsync build`.") from None
    base = record.get("base", {})
    if base.get("repo"):
        from hubsync.resolve import download_base

        _, base_folder = download_base(base["repo"], base["sha"])
    else:
        base_folder = Path(base.get("path") or "")
        if not base_folder.is_dir():
            raise VerifyError(
                f"the base folder {base_folder} recorded in {path} is gone: restore it or rebuild."
            )
    ft = Path(record.get("finetune", {}).get("folder", ""))
    settings = record.get("manifest", {}).get("verify", {})
    image = settings.get("image")
    return Subject(
        folder=target,
        record=record,
        base_folder=base_folder,
        finetune_folder=ft if ft.is_dir() else None,
        trust_remote_code=bool(settings.get("trust_remote_code", False)),
        device=str(settings.get("device", "auto")),
        prompt=str(settings.get("prompt") or DEFAULT_PROMPT),
        image=Path(image) if image else None,
    )


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise VerifyError(
            f"verify.device is {requested} but no CUDA device is visible: use `device: auto` or cpu."
        )
    return requested


# ----------------------------------------------------------------------------------------------- files


def _json_files(folder: Path) -> dict[str, dict[str, Any]]:
    from hubsync.resolve import read_json_files

    names = [p.name for p in folder.glob("*.json") if p.name != PROVENANCE]
    return read_json_files(folder, names)


def check_files(subject: Subject, report: Report) -> None:
    from hubsync.finetune import is_weight_file
    from hubsync.plan import CONFIG_PAIRS, _auto_map_refs, _get
    from hubsync.resolve import list_files

    out_files = set(list_files(subject.folder))
    base_files = list_files(subject.base_folder)
    needed = [f for f in base_files if not is_weight_file(f) and f not in ("README.md", ".gitattributes")]
    missing = [f for f in needed if f not in out_files]
    report.add(
        "files present",
        not missing,
        f"{len(missing)} file(s) of the base revision are missing: {', '.join(missing)}"
        if missing
        else f"all {len(needed)} non-weight file(s) of the base revision are present",
        evidence=missing,
    )

    jsons = _json_files(subject.folder)
    bad: list[str] = []
    for name, data in jsons.items():
        for ref in _auto_map_refs(data):
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

    config = jsons.get("config.json", {})
    disagree = []
    for cfg_key, proc_file, proc_key in CONFIG_PAIRS.get(str(config.get("model_type")), ()):
        a, b = _get(config, cfg_key), _get(jsons.get(proc_file, {}), proc_key)
        if a is not None and b is not None and a != b:
            disagree.append(f"config.json {cfg_key}={a!r} but {proc_file} {proc_key}={b!r}")
    if CONFIG_PAIRS.get(str(config.get("model_type"))):
        report.add(
            "config and processor config agree",
            not disagree,
            disagree[0] if disagree else "the architecture's paired keys agree",
            disagree,
        )


def check_tokenizer_and_processor(subject: Subject, report: Report) -> None:
    from transformers import AutoProcessor, AutoTokenizer
    from transformers.processing_utils import ProcessorMixin

    trust = subject.trust_remote_code
    kwargs: dict[str, Any] = {"trust_remote_code": trust, "local_files_only": True}
    try:
        tok = AutoTokenizer.from_pretrained(str(subject.folder), **kwargs)
        base_tok = AutoTokenizer.from_pretrained(str(subject.base_folder), **kwargs)
    except Exception as err:  # noqa: BLE001 - any loader failure is the finding
        report.add("tokenizer loads", False, f"AutoTokenizer failed: {_one_line(err)}")
        return
    ids, base_ids = tok(SAMPLE_TEXT)["input_ids"], base_tok(SAMPLE_TEXT)["input_ids"]
    text = tok.decode(ids, skip_special_tokens=True).strip()
    base_text = base_tok.decode(base_ids, skip_special_tokens=True).strip()
    same = ids == base_ids and text == base_text
    report.add(
        "tokenizer",
        same,
        f"{type(tok).__name__} encodes the sample to the same {len(ids)} ids as the base and decodes it back"
        + (" exactly" if text == SAMPLE_TEXT else f" as the base does ({text!r})")
        if same
        else f"{type(tok).__name__} encodes the sample differently from the base's {type(base_tok).__name__} "
        f"({len(ids)} vs {len(base_ids)} ids): the tokenizer was rebuilt or replaced",
        evidence=[f"build ids {ids[:24]}", f"base ids {base_ids[:24]}", f"build decode {text!r}"],
    )

    has_processor = any(
        (subject.base_folder / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")
    )
    processor = None
    if has_processor:
        try:
            processor = AutoProcessor.from_pretrained(str(subject.folder), **kwargs)
        except Exception as err:  # noqa: BLE001
            report.add("processor", False, f"AutoProcessor failed: {_one_line(err)}")
        else:
            ok = isinstance(processor, ProcessorMixin) and hasattr(processor, "tokenizer")
            report.add(
                "processor",
                ok,
                f"AutoProcessor returns {type(processor).__name__}"
                if ok
                else f"AutoProcessor returns a bare {type(processor).__name__}, not a processor: "
                "`processor.tokenizer` will fail (the MiniCPM-V seed error); restore the processor config",
            )
    template_owner = processor if processor is not None and getattr(processor, "chat_template", None) else tok
    if getattr(template_owner, "chat_template", None):
        conversation = [
            {"role": "user", "content": "Hello, who are you?"},
            {"role": "assistant", "content": "A helpful model."},
            {"role": "user", "content": "Describe the image."},
        ]
        try:
            rendered = template_owner.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=True
            )
            ok = (
                isinstance(rendered, str)
                and "Hello, who are you?" in rendered
                and "Describe the image." in rendered
            )
            report.add(
                "chat template",
                ok,
                f"renders a two-turn conversation ({len(rendered)} characters)"
                if ok
                else "the chat template renders without the conversation's text",
            )
        except Exception as err:  # noqa: BLE001
            report.add(
                "chat template",
                False,
                f"the chat template fails on a two-turn conversation: {_one_line(err)}",
            )
    else:
        base_has = any(
            (subject.base_folder / f).is_file() for f in ("chat_template.jinja", "chat_template.json")
        )
        report.add(
            "chat template",
            False if base_has else None,
            "the base has a chat template but the build's tokenizer and processor have none"
            if base_has
            else "the base has no chat template",
        )


# --------------------------------------------------------------------------------------------- weights


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

    manifest_dtype = subject.record.get("manifest", {}).get("output", {}).get("dtype", "base")
    from hubsync.plan import FLOAT_DTYPES, NAMED_DTYPES

    def expected_dtype(base_dtype: str) -> str:
        named = NAMED_DTYPES.get(manifest_dtype)
        return named if named and base_dtype in FLOAT_DTYPES else base_dtype

    layout = []
    for name in sorted(set(base.tensors) | set(out.tensors)):
        b, o = base.tensors.get(name), out.tensors.get(name)
        if b is None or o is None:
            layout.append(f"{name}: {'missing from the build' if o is None else 'not in the base'}")
        elif tuple(b.shape) != tuple(o.shape) or o.dtype != expected_dtype(b.dtype):
            layout.append(
                f"{name}: {o.dtype} {list(o.shape)}, expected {expected_dtype(b.dtype)} {list(b.shape)}"
            )
    report.add(
        "tensor layout",
        not layout,
        layout[0] if layout else f"{len(out.tensors)} tensors with the base's names, shapes and dtypes",
        layout[:20],
    )
    if layout:
        return

    tuned = subject.record.get("tuned_tensors", {})
    ft = None
    if tuned and subject.finetune_folder is not None:
        if (subject.finetune_folder / "adapter_config.json").is_file():
            from hubsync.adapters import read_adapter  # the merged tensors are recomputed from the adapter
            from hubsync.resolve import read_json

            base_config = read_json(subject.base_folder / "config.json")
            ft = read_adapter(subject.finetune_folder, base.tensors, base_config).checkpoint
        else:
            ft = T.list_checkpoint(subject.finetune_folder, error=VerifyError)
    base_shard_sha = {p.name: _cached_sha(p) for p in base.files}
    identical_shards = {
        p.name
        for p in out.files
        if base_shard_sha.get(p.name) and _file_sha(subject.record, p.name) == base_shard_sha[p.name]
    }
    untuned_bad, tuned_bad, nonfinite = [], [], []
    deltas: dict[str, dict[str, float]] = {}
    for name, o in out.tensors.items():
        b = base.tensors[name]
        if name not in tuned:
            if o.file.name in identical_shards and o.dtype == b.dtype:
                continue
            same_bytes = (
                isinstance(b, T.TensorInfo) and isinstance(o, T.TensorInfo) and T.tensor_bytes_equal(b, o)
            )
            if o.dtype == b.dtype and not same_bytes:
                untuned_bad.append(name)
            continue
        out_t = T.load_tensor(o)
        if out_t.is_floating_point() and T.has_nan_or_inf(out_t):
            nonfinite.append(name)
            continue
        base_t = T.load_tensor(b)
        if base_t.to(out_t.dtype).equal(out_t):
            tuned_bad.append(f"{name} equals the base (the fine-tune's change is not in the build)")
        elif ft is not None:
            src = tuned[name].get("from", name)
            if src in ft.tensors and not T.load_tensor(ft.tensors[src]).to(out_t.dtype).equal(out_t):
                tuned_bad.append(f"{name} differs from the fine-tune's {src} cast to {o.dtype}")
        prefix = next((p for p in subject.tuned_prefixes if matches(p, name)), "(other)")
        max_abs, rel = T.delta_stats(base_t, out_t)
        d = deltas.setdefault(prefix, {"tensors": 0, "max_abs": 0.0, "rel": 0.0})
        d["tensors"] += 1
        d["max_abs"] = max(d["max_abs"], max_abs)
        if math.isfinite(rel):  # a zero base tensor has no relative change
            d["rel"] = max(d["rel"], rel)
        del out_t, base_t
    report.add(
        "no NaN or Inf",
        not nonfinite,
        f"NaN or Inf in {len(nonfinite)} tuned tensor(s): {', '.join(nonfinite[:5])}"
        if nonfinite
        else "no NaN or Inf in the tuned tensors",
        nonfinite[:20],
    )
    report.add(
        "tuned tensors are the fine-tune's",
        not tuned_bad,
        tuned_bad[0]
        if tuned_bad
        else f"{len(tuned)} tuned tensor(s) equal the fine-tune after the cast"
        + (
            ""
            if ft is not None or not tuned
            else " (fine-tune folder not available: compared with the base only)"
        ),
        tuned_bad[:20],
        deltas=deltas,
    )
    report.add(
        "other tensors are the base's",
        not untuned_bad,
        f"{len(untuned_bad)} tensor(s) outside the tuned parts differ from the base: {', '.join(untuned_bad[:5])}"
        if untuned_bad
        else f"{len(out.tensors) - len(tuned)} tensor(s) byte-identical to the base "
        f"({len(identical_shards)} shard(s) identical as files)",
        untuned_bad[:20],
    )


def check_hashes(subject: Subject, report: Report) -> dict[str, str]:
    """Every file's sha256 against hubsync.json; returns the current hashes."""
    from hubsync.resolve import list_files

    recorded = {k: v["sha256"] for k, v in subject.record.get("files", {}).items()}
    current: dict[str, str] = {}
    for rel in list_files(subject.folder):
        if rel == PROVENANCE:
            continue
        current[rel] = T.sha256_file(subject.folder / rel)
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


# -------------------------------------------------------------------------------------------- load & run


@contextmanager
def _timed(report: Report, step: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        report.timings[step] = time.perf_counter() - start


def _peak(device: str) -> int:
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _model_class(folder: Path, trust: bool) -> Callable[..., Any]:
    import transformers

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    auto_map = config.get("auto_map") or {}
    if auto_map:
        if not trust:
            raise VerifyError(
                "the model needs its own code (config.json has an auto_map): set `verify.trust_remote_code: true` "
                "to allow the pinned base revision's code to run"
            )
        for key in (
            "AutoModelForImageTextToText",
            "AutoModelForCausalLM",
            "AutoModelForVision2Seq",
            "AutoModel",
        ):
            if key in auto_map:
                return getattr(transformers, key).from_pretrained  # type: ignore[no-any-return]
    for arch in config.get("architectures") or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls.from_pretrained  # type: ignore[no-any-return]
    return transformers.AutoModel.from_pretrained  # type: ignore[no-any-return]


def _too_big_for_one_gpu(folder: Path, device: str) -> bool:
    import torch

    if not device.startswith("cuda") or torch.cuda.device_count() < 2:
        return False
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return size > 0.85 * torch.cuda.get_device_properties(0).total_memory


def load_model(folder: Path, trust: bool, device: str) -> tuple[Any, dict[str, Any], str | None]:
    """Load with transformers in the checkpoint's dtype, with loading info; local files only."""
    load = _model_class(folder, trust)
    kwargs: dict[str, Any] = {
        "dtype": "auto",
        "trust_remote_code": trust,
        "local_files_only": True,
        "output_loading_info": True,
    }
    device_map = None
    if _too_big_for_one_gpu(folder, device):
        device_map = "auto"
        kwargs["device_map"] = "auto"
    model, info = load(str(folder), **kwargs)
    if device_map is None:
        model = model.to(device)
    model.eval()
    return model, info, device_map


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()


def _tuned_modules(model: Any, prefixes: tuple[str, ...]) -> dict[str, Any]:
    """The top modules of the tuned parts, under the model's own module names (checkpoint names may differ)."""
    from hubsync.tuned import is_regex

    modules = dict(model.named_modules())
    found = {}
    for prefix in prefixes:
        if is_regex(prefix):  # the shallowest module whose name (as a prefix) the pattern matches
            hits = [
                m
                for m in modules
                if m and any(matches(prefix, c + ".") for c in (m, m.removeprefix("model.")))
            ]
            if hits:
                found[prefix] = modules[min(hits, key=lambda m: (m.count("."), m))]
            continue
        name = prefix.rstrip(".")
        for candidate in (name, f"model.{name}", name.removeprefix("model.")):
            if candidate in modules:
                found[prefix] = modules[candidate]
                break
    return found


def _first_tensor(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            t = _first_tensor(item)
            if t is not None:
                return t
    if hasattr(value, "last_hidden_state") and value.last_hidden_state is not None:
        return value.last_hidden_state
    if hasattr(value, "values"):
        for item in value.values():
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def _image(subject: Subject) -> Any:
    from PIL import Image

    if subject.image is not None:
        return Image.open(subject.image).convert("RGB")
    from hubsync.testing.models import make_test_image

    return make_test_image(seed=7)


@dataclass
class RunOutputs:
    text_logits: Any = None
    image_logits: Any = None
    tuned_outputs: dict[str, Any] = field(default_factory=dict)
    generated: str | None = None
    loading_info: dict[str, Any] = field(default_factory=dict)
    device_map: str | None = None
    errors: dict[str, str] = field(default_factory=dict)


def run_model(
    folder: Path, subject: Subject, device: str, report: Report, label: str, *, generate: bool
) -> RunOutputs:
    """Load one model, run the probes, keep only small CPU copies of the outputs, free the device."""
    import torch
    from transformers import AutoProcessor, AutoTokenizer

    out = RunOutputs()
    trust = subject.trust_remote_code
    _reset_peak(device)
    with _timed(report, f"load {label}"):
        model, info, out.device_map = load_model(folder, trust, device)
    out.loading_info = {k: list(v) if isinstance(v, (list, set, tuple)) else v for k, v in info.items()}
    report.memory[f"after load {label}"] = _peak(device)
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust, local_files_only=True)
    processor = None
    if any((folder / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        try:
            processor = AutoProcessor.from_pretrained(
                str(folder), trust_remote_code=trust, local_files_only=True
            )
        except Exception as err:  # noqa: BLE001 - reported by the files checks
            out.errors["processor"] = _one_line(err)
    captured: dict[str, Any] = {}

    def capture(key: str) -> Callable[..., None]:
        def hook(
            _module: Any, _inputs: Any, output: Any
        ) -> None:  # must return None: a value replaces the output
            if key not in captured:
                captured[key] = _first_tensor(output)

        return hook

    hooks = [
        module.register_forward_hook(capture(prefix))
        for prefix, module in _tuned_modules(model, subject.tuned_prefixes).items()
    ]
    first_device = next(model.parameters()).device
    try:
        with torch.inference_mode(), _timed(report, f"text forward {label}"):
            ids = tok(SAMPLE_TEXT, return_tensors="pt")["input_ids"].to(first_device)
            try:
                out.text_logits = model(input_ids=ids).logits.float().cpu()
            except Exception as err:  # noqa: BLE001 - some remote forwards need more than input_ids
                lm = getattr(model, "llm", None) or getattr(model, "language_model", None)
                if lm is None:
                    out.errors["text"] = _one_line(err)
                else:
                    out.text_logits = lm(input_ids=ids).logits.float().cpu()
        image = _image(subject)
        with torch.inference_mode(), _timed(report, f"image {'generate' if generate else 'forward'} {label}"):
            if hasattr(model, "chat"):
                msgs = [{"role": "user", "content": subject.prompt}]
                try:
                    text = model.chat(
                        image=image, msgs=msgs, tokenizer=tok, processor=processor, max_new_tokens=8
                    )
                except TypeError:  # a chat() without the processor argument
                    text = model.chat(image=image, msgs=msgs, tokenizer=tok, max_new_tokens=8)
                out.generated = text if isinstance(text, str) else str(text)
            elif processor is not None:
                inputs = _processor_inputs(processor, image, subject.prompt).to(first_device)
                out.image_logits = model(**inputs).logits.float().cpu()
                if generate:
                    new = model.generate(**inputs, max_new_tokens=8, do_sample=False)
                    out.generated = processor.decode(
                        new[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
                    )
            else:
                out.errors["image"] = "no processor to build an image input"
    except Exception as err:  # noqa: BLE001 - a model that does not run is the finding
        out.errors.setdefault("run", _one_line(err))
    finally:
        for h in hooks:
            h.remove()
    out.tuned_outputs = {k: v.float().cpu() for k, v in captured.items() if v is not None}
    report.memory[f"peak {label}"] = _peak(device)
    del model
    _free(device)
    return out


def _processor_inputs(processor: Any, image: Any, prompt: str) -> Any:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(images=[image], text=[text], return_tensors="pt")


def check_load_and_run(subject: Subject, report: Report) -> None:
    import torch

    device = pick_device(subject.device)
    report.device = (
        device if not device.startswith("cuda") else f"{device} ({torch.cuda.get_device_name(device)})"
    )
    try:
        base = run_model(subject.base_folder, subject, device, report, "base", generate=False)
        build = run_model(subject.folder, subject, device, report, "build", generate=True)
    except HubsyncError as err:
        report.add("model loads", False, err.one_line())
        return
    except Exception as err:  # noqa: BLE001
        report.add("model loads", False, f"transformers could not load the build: {_one_line(err)}")
        return
    report.device_map = build.device_map
    info = build.loading_info
    problems = [
        f"{k}: {', '.join(map(str, v[:5]))}"
        for k in ("missing_keys", "unexpected_keys", "mismatched_keys")
        if (v := info.get(k))
    ]
    report.add(
        "model loads",
        not problems,
        "loads with no missing, unexpected or mismatched keys"
        + (" (spread with device_map='auto')" if build.device_map else "")
        if not problems
        else f"loading reports {problems[0]}",
        problems,
    )

    vision_only = bool(subject.tuned_prefixes) and all(
        any(h in p.lower() for h in VISION_HINTS) for p in subject.tuned_prefixes
    )
    tol = TOLERANCE["cuda" if device.startswith("cuda") else "cpu"]
    if base.text_logits is None or build.text_logits is None:
        report.add(
            "frozen parts untouched",
            None,
            "no text-only forward for this architecture: "
            + (build.errors.get("text") or base.errors.get("text") or "unknown"),
        )
    else:
        diff = float((base.text_logits - build.text_logits).abs().max())
        if vision_only:
            report.add(
                "frozen parts untouched",
                diff <= tol,
                f"text-only logits equal the base's (max |Δ| {diff:.3g}, tolerance {tol:g})"
                if diff <= tol
                else f"text-only logits differ from the base's by {diff:.3g} (tolerance {tol:g}): "
                "the language model changed although only vision parts were tuned",
                max_abs=diff,
                tolerance=tol,
            )
        else:
            report.add(
                "frozen parts untouched",
                None,
                f"the language model was tuned; text-only logits differ by {diff:.3g}",
                max_abs=diff,
            )

    live: dict[str, float] = {}
    for prefix, value in build.tuned_outputs.items():
        ref = base.tuned_outputs.get(prefix)
        if ref is not None and ref.shape == value.shape:
            live[prefix] = float((ref - value).abs().max())
    if (
        build.image_logits is not None
        and base.image_logits is not None
        and base.image_logits.shape == build.image_logits.shape
    ):
        live["logits"] = float((base.image_logits - build.image_logits).abs().max())
    if not live:
        report.add(
            "tuned parts are live",
            None if not subject.tuned_prefixes else False,
            "could not observe the tuned parts in a forward with an image: "
            + (build.errors.get("run") or build.errors.get("image") or "no tuned module ran"),
        )
    else:
        dead = [p for p, d in live.items() if d == 0.0 and p != "logits"]
        report.add(
            "tuned parts are live",
            not dead,
            "a forward with an image differs from the base's: "
            + ", ".join(f"{p} max |Δ| {d:.3g}" for p, d in live.items())
            if not dead
            else f"{', '.join(dead)} gives the base's output on an image: the tuned weights are "
            "not the ones being used",
            deltas=live,
        )

    if build.generated is not None:
        report.add("generation", True, f"greedy generation with an image returned {build.generated!r}")
    else:
        report.add(
            "generation",
            False,
            "generation with an image failed: "
            + (build.errors.get("run") or build.errors.get("image") or "no text returned"),
        )


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _cached_sha(path: Path) -> str | None:
    from hubsync.write import _cached_sha256

    return _cached_sha256(path)


def _file_sha(record: dict[str, Any], name: str) -> str | None:
    entry = record.get("files", {}).get(name)
    return entry.get("sha256") if isinstance(entry, dict) else None


def _versions() -> dict[str, str]:
    import torch
    import transformers

    from hubsync import __version__

    return {
        "hubsync": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


# ------------------------------------------------------------------------------------------------ entry


def verify(target: Path, *, run_models: bool = True, update_record: bool = True) -> Report:
    """Run every check on a build folder (or a manifest's output) and record the result in hubsync.json."""
    subject = load_subject(target)
    report = Report(folder=subject.folder)
    report.versions = _versions()
    start = time.perf_counter()
    with _timed(report, "files"):
        check_files(subject, report)
        check_tokenizer_and_processor(subject, report)
    with _timed(report, "weights"):
        check_weights(subject, report)
    if run_models:
        structural = [c for c in report.failures if c.name in ("weights readable", "tensor layout")]
        if structural:
            report.add("model loads", None, "not attempted: the weights are broken (see above)")
        else:
            check_load_and_run(subject, report)
    current = check_hashes(subject, report)
    report.timings["total"] = time.perf_counter() - start
    if update_record:
        _record(subject, report, current)
    return report


def _record(subject: Subject, report: Report, current: dict[str, str]) -> None:
    """Write the verification into hubsync.json and the card, so that push can check what it covered."""
    from hubsync.card import render_card
    from hubsync.write import write_json_atomic

    record = dict(subject.record)
    card_inputs = _card_inputs_from_record(subject, record)
    covered = dict(current)
    if card_inputs is not None:
        from dataclasses import replace

        draft = report.to_record(covered)
        card = render_card(replace(card_inputs, verification=draft))
        (subject.folder / "README.md").write_text(card, encoding="utf-8")
        sha = T.sha256_file(subject.folder / "README.md")
        covered["README.md"] = sha
        files = dict(record.get("files", {}))
        files["README.md"] = {
            **files.get("README.md", {"source": "generated"}),
            "sha256": sha,
            "size": (subject.folder / "README.md").stat().st_size,
        }
        record["files"] = files
    record["verification"] = report.to_record(covered)
    write_json_atomic(subject.folder / PROVENANCE, record)


def _card_inputs_from_record(subject: Subject, record: dict[str, Any]) -> Any:
    """Rebuild the card's inputs from hubsync.json alone (a copied folder re-renders the same card)."""
    from hubsync.card import CardInputs

    card = record.get("card_inputs")
    if not isinstance(card, dict):
        return None
    return CardInputs(**{k: tuple(v) if isinstance(v, list) else v for k, v in card.items()})


def verification_gate(folder: Path) -> dict[str, Any]:
    """What `hubsync push` demands: a passed verification that covers the files exactly as they are now."""
    from hubsync.resolve import list_files

    path = folder / PROVENANCE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise VerifyError(f"{folder} has no readable {PROVENANCE}: build it with `hubsync build`.") from None
    verification = record.get("verification")
    if not verification:
        raise VerifyError(
            f"{folder} was never verified: run `hubsync verify {folder}` (or push with --skip-verify-check)."
        )
    if not verification.get("passed"):
        failed = next((c for c in verification.get("checks", []) if c.get("ok") is False), {})
        raise VerifyError(
            f"the verification of {folder} failed ({failed.get('name')}: {failed.get('detail')}): "
            "fix the build and run `hubsync verify` again."
        )
    covered = verification.get("files_sha256", {})
    now = {rel for rel in list_files(folder) if rel != PROVENANCE}
    for rel in sorted(now | set(covered)):
        if rel not in covered or rel not in now or T.sha256_file(folder / rel) != covered[rel]:
            raise VerifyError(
                f"{rel} changed after verification: run `hubsync verify {folder}` again before pushing."
            )
    return record


def render_report(report: Report) -> str:
    lines = [
        f"verify {report.folder} on {report.device}" + (" (device_map=auto)" if report.device_map else "")
    ]
    for c in report.checks:
        mark = {True: "pass", False: "FAIL", None: "skip"}[c.ok]
        lines.append(f"  {mark}  {c.name}: {c.detail}")
        if c.ok is False:
            lines += [f"          {e}" for e in c.evidence[:5]]
    lines.append("timings: " + ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items()))
    if report.memory:
        lines.append("peak memory: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in report.memory.items()))
    lines.append(
        "PASSED" if report.passed else f"FAILED: {report.failures[0].name}: {report.failures[0].detail}"
    )
    return "\n".join(lines)


def summary_line(report: Report) -> str:
    return (
        "verification passed" if report.passed else f"{report.failures[0].name}: {report.failures[0].detail}"
    )
