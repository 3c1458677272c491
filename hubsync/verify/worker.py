"""hubsync's verification worker: load one model folder and run it, inside the model's own Python environment.

This file is a standalone script. hubsync starts it with the interpreter chosen for verification (the training
environment, a venv made for the model, or hubsync's own), so it must not import hubsync: at import time only the
standard library is used; torch, transformers, tokenizers, PIL, numpy and accelerate are imported where needed.
It runs on Python >= 3.9, transformers 4.40 -> 5.x and torch 2.1 -> current. It is the only place where hubsync
loads a model or executes a model's own code.

    PYTHON worker.py REQUEST.json RESULT.json

Files, not stdout: model code prints to stdout as it likes; the worker logs to stderr. The result file is
rewritten atomically after every step (and names the step that is running), so a crash leaves the steps done
so far and says where it died. The worker gathers facts; it judges nothing that needs the base (hubsync
compares a build's result with its base's).

Request (a JSON object; only `protocol` and `folder` are required):
    protocol          1
    folder            the model folder (config.json, weights, tokenizer, processor, remote code)
    trust_remote_code run the folder's own code (auto_map); default false
    device            "auto" (cuda when available, else cpu) | "cpu" | "cuda" | "cuda:N"; default "auto"
    prompt            the user text of the image prompt; default "Describe the image."
    image             an image file, or null: a deterministic test picture is drawn in the worker
    tuned_prefixes    checkpoint-name prefixes whose modules are hooked in the image forward ("vpm.", ...)
    sample_text       the text for the tokenizer and text-only forward; default below
    max_new_tokens    tokens generated; default 8
    generate          run the generation step; default true
    max_memory        null, or an accelerate budget ({"cpu": "200MB", "0": "20GiB"}): forces
                      device_map="auto" with that budget (CPU and disk offload)
    offload_dir       where offloaded weights go; default: a temporary folder beside the result file, removed
                      at the end (as is the temporary modules cache the model's code is copied into)
    outputs_dir       where arrays are written (.npy, float32); default: "outputs" beside the result file

Result (a JSON object):
    protocol          1
    finished          true once every step has been attempted (false: the worker died or is running)
    running           the step in progress (after a crash: the step that crashed), or null
    error             only when the request itself was refused ("bad request: ..."); no step ran
    steps             {name: record}, in this order: runtime, preflight, tokenizer, processor, load,
                      text_forward, image_forward, generate. Every record has
                        ok       true (done), false (failed: see error), null (not attempted: see skipped)
                        error    "TypeName: first line of the message" when ok is false
                        skipped  why a step was not attempted
                        seconds  wall time of the step
                        rss_peak_bytes, cuda_peak_bytes   the process' peak RSS so far; the device's peak
                                 allocation during the step (cuda only)
                      and its facts:
        runtime       python, executable, torch, transformers, tokenizers, cuda (bool), cuda_device (name or
                      null), modules {numpy, PIL, accelerate, torchvision, sentencepiece: version or null}
        preflight     files (the .py files read), checked (modules tried), missing [{module, files, error}]
                      (`module` may be `package.name` for a `from package import name` that fails);
                      ok is false when anything is missing, and no later step runs
        tokenizer     class, ids (with special tokens), ids_plain (without), decoded (ids_plain decoded,
                      special tokens skipped), roundtrip (decoded == sample_text, ignoring outer spaces),
                      reference {source: "tokenizer.json" | "tokenizer.model" | "vocab.json+merges.txt" |
                      null, ids, reason (when source is null), error}, agrees_with_reference (ids_plain ==
                      reference ids; null without a reference)
        processor     class, is_processor (a processor with a tokenizer, not a bare tokenizer),
                      processor_files (which of preprocessor_config.json / processor_config.json exist),
                      image_token, chat_template {source: "processor" | "tokenizer" | null, renders (bool),
                      rendered, error}
        load          class, via ("auto_map:<AutoClass>" | "architectures" | "auto": AutoModelForImageTextToText,
                      then AutoModelForVision2Seq, then AutoModel), dtype, device, missing_keys,
                      unexpected_keys, mismatched_keys (lists of strings), max_memory (the budget, when
                      spread), device_map (null, or {module: "cpu" | "disk" | GPU index}), device_counts
                      ({device: modules}; {device: 1} when the whole model is on one device)
        text_forward  via ("model" | the inner language model's attribute, e.g. "llm"), logits (file name in
                      outputs_dir), shape, first_error (the full model's error when the inner model was used)
        image_forward via ("chat" | "processor"), prompt, placeholder, placeholder_added (processor only),
                      logits, logits_shape (processor only), liveness {prefix: {checkpoint_tensors,
                      unmatched_tensors, modules: [{name, partial, ran, calls, output (file or null), shape}],
                      reason (when modules is empty)}}; skipped when there is no processor and no chat()
        generate      via ("chat" | "generate"), text, new_tokens (generate only)
"""

from __future__ import annotations

import ast
import contextlib
import faulthandler
import importlib
import inspect
import json
import os
import re
import shutil
import struct
import sys
import sysconfig
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

PROTOCOL = 1
DEFAULT_PROMPT = "Describe the image."
DEFAULT_SAMPLE_TEXT = "Describe the image. There is a white cat sitting on a brown table."
STEPS = (
    "runtime",
    "preflight",
    "tokenizer",
    "processor",
    "load",
    "text_forward",
    "image_forward",
    "generate",
)
# Name levels that transformers versions add or drop between checkpoint names and module names
# (`model.`, `language_model.`, CLIP's `vision_model.`), and the old LayerNorm parameter names it renames on load.
NAME_LEVELS = frozenset({"model", "language_model", "vision_model", "text_model", "base_model"})
PARAM_RENAMES = {"gamma": "weight", "beta": "bias"}
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
OPTIONAL_MODULES = ("numpy", "PIL", "accelerate", "torchvision", "sentencepiece")

Record = dict[str, Any]


def log(message: str) -> None:
    print(f"[hubsync worker] {message}", file=sys.stderr, flush=True)


def one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:500]


# ------------------------------------------------------------------------------------------------ the result


class Result:
    """The result file: rewritten atomically after every change, so that a crash leaves what was done."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {"protocol": PROTOCOL, "finished": False, "running": None, "steps": {}}
        self.save()

    def save(self) -> None:
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)

    def skip(self, name: str, reason: str) -> None:
        self.data["steps"][name] = {"ok": None, "skipped": reason}
        self.save()

    def run(self, name: str, action: Callable[[Record], Any]) -> tuple[bool, Any]:
        """Run one step; any exception, MemoryError and CUDA out-of-memory included, becomes its error."""
        record: Record = {"ok": None}
        self.data["steps"][name] = record
        self.data["running"] = name
        self.save()
        log(f"{name} ...")
        _reset_cuda_peak()
        start = time.perf_counter()
        value = None
        try:
            value = action(record)
            record["ok"] = record.get("error") is None
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # noqa: BLE001 - SystemExit from model code is a finding too
            record["ok"] = False
            record["error"] = one_line(err)
            log(f"{name} failed: {record['error']}")
            traceback.print_exc(file=sys.stderr)
            value = None
        record["seconds"] = round(time.perf_counter() - start, 3)
        record.update(_memory())
        self.data["running"] = None
        self.save()
        return bool(record["ok"]), value

    def finish(self) -> None:
        self.data["finished"] = True
        self.save()


def _memory() -> Record:
    out: Record = {}
    try:
        import resource

        # ru_maxrss is in KiB on Linux, bytes on macOS
        scale = 1 if sys.platform == "darwin" else 1024
        out["rss_peak_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
    except ImportError:
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def _reset_cuda_peak() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


# ------------------------------------------------------------------------------------------- the request


class Request:
    """The request with its defaults applied; unknown keys are refused (a typo must not pass silently)."""

    KEYS = (
        "protocol",
        "folder",
        "trust_remote_code",
        "device",
        "prompt",
        "image",
        "tuned_prefixes",
        "sample_text",
        "max_new_tokens",
        "generate",
        "max_memory",
        "offload_dir",
        "outputs_dir",
        "stop_after",
    )

    def __init__(self, data: dict[str, Any], result_path: str) -> None:
        unknown = sorted(set(data) - set(self.KEYS))
        if unknown:
            raise ValueError(f"unknown request keys: {', '.join(unknown)}")
        if data.get("protocol") != PROTOCOL:
            raise ValueError(f"request protocol {data.get('protocol')!r}, this worker speaks {PROTOCOL}")
        self.folder = os.path.abspath(str(data["folder"]))
        self.trust_remote_code = bool(data.get("trust_remote_code", False))
        self.device = str(data.get("device") or "auto")
        self.prompt = str(data.get("prompt") or DEFAULT_PROMPT)
        self.image: str | None = data.get("image")
        self.tuned_prefixes: list[str] = [str(p) for p in data.get("tuned_prefixes") or []]
        self.sample_text = str(data.get("sample_text") or DEFAULT_SAMPLE_TEXT)
        self.max_new_tokens = int(data.get("max_new_tokens") or 8)
        self.generate = bool(data.get("generate", True))
        self.max_memory: dict[str, Any] | None = data.get("max_memory")
        self.offload_dir: str | None = data.get("offload_dir")
        self.scratch = os.path.dirname(os.path.abspath(result_path))  # temporary folders go here
        default_outputs = os.path.join(self.scratch, "outputs")
        self.outputs_dir = os.path.abspath(str(data.get("outputs_dir") or default_outputs))
        self.stop_after: str | None = data.get("stop_after")  # "load": only whether the model loads
        if self.stop_after not in (None, "load"):
            raise ValueError(f"stop_after {self.stop_after!r}: only 'load' is known")


# ---------------------------------------------------------------------------------------------- the steps


class Session:
    """What the steps hand each other: the loaded tokenizer, processor and model."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.tokenizer: Any = None
        self.processor: Any = None
        self.model: Any = None
        self.input_device: Any = "cpu"
        self.image: Any = None


def step_runtime(record: Record) -> None:
    import platform

    record["python"] = platform.python_version()
    record["executable"] = sys.executable
    import torch

    record["torch"] = torch.__version__
    record["cuda"] = bool(torch.cuda.is_available())
    record["cuda_device"] = torch.cuda.get_device_name(0) if record["cuda"] else None
    import tokenizers
    import transformers

    record["transformers"] = transformers.__version__
    record["tokenizers"] = tokenizers.__version__
    record["modules"] = {name: _module_version(name) for name in OPTIONAL_MODULES}


def _module_version(name: str) -> str | None:
    try:
        module = importlib.import_module(name)
    except Exception:  # noqa: BLE001 - absent or broken: either way not usable here
        return None
    return str(getattr(module, "__version__", "unknown"))


# --------------------------------------------------------------------------------------------- preflight


def step_preflight(record: Record, folder: str) -> None:
    """Every module the folder's code imports at top level must import here, before any model code runs."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
    record["files"] = files
    local = {f[:-3] for f in files} | {
        d for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, "__init__.py"))
    }
    needed: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for name in files:
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            source = f.read()
        try:
            tree = ast.parse(source, filename=name)
        except SyntaxError as err:
            record.setdefault("unparsable", []).append(f"{name}: {one_line(err)}")
            continue
        for module, names in _top_level_imports(tree):
            if module.split(".")[0] in local or _is_stdlib(module.split(".")[0]):
                continue
            needed.setdefault((module, names), []).append(name)
    record["checked"] = sorted({module for module, _ in needed})
    missing: dict[str, Record] = {}
    for (module, names), users in sorted(needed.items()):
        for target, error in _import_problems(module, names):
            entry = missing.setdefault(target, {"module": target, "files": [], "error": error})
            entry["files"] = sorted(set(entry["files"]) | set(users))
    record["missing"] = list(missing.values())
    if missing:
        record["error"] = "missing modules: " + "; ".join(
            f"{m['module']} (imported by {', '.join(m['files'])})" for m in missing.values()
        )


def _top_level_imports(tree: ast.Module) -> Iterator[tuple[str, tuple[str, ...]]]:
    """Imports that run when the file is imported: module-level statements only (an import inside a
    function, a try block or an `if` is optional or deferred, and the model may never reach it)."""
    for node in tree.body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, tuple(a.name for a in node.names if a.name != "*")


def _is_stdlib(top: str) -> bool:
    names = getattr(sys, "stdlib_module_names", None)  # Python >= 3.10
    if names is not None:
        return top in names
    if top in sys.builtin_module_names:
        return True
    import importlib.util

    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    origin = (spec.origin or "") if spec else ""
    stdlib = sysconfig.get_paths()["stdlib"]
    return origin.startswith(stdlib) and "site-packages" not in origin


def _import_problems(module: str, names: tuple[str, ...]) -> list[tuple[str, str]]:
    """[(what cannot be imported, why)] for `import module` / `from module import names`."""
    try:
        imported = importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - a module that fails to import for any reason is missing
        return [(module, one_line(err))]
    problems = []
    for name in names:
        error = _name_problem(imported, module, name)
        if error is not None:
            problems.append((f"{module}.{name}", f"cannot import name {name!r} from {module}: {error}"))
    return problems


def _name_problem(imported: Any, module: str, name: str) -> str | None:
    """Why `from module import name` fails, or None. A lazy attribute (transformers') fails with what its
    import raised; a name that is not an attribute may still be a submodule."""
    try:
        getattr(imported, name)
        return None
    except AttributeError as err:
        absent = one_line(err)
    except Exception as err:  # noqa: BLE001 - the lazy import behind the attribute failed: that is the cause
        return one_line(err)
    try:
        importlib.import_module(f"{module}.{name}")
        return None
    except ModuleNotFoundError:
        return absent
    except Exception as err:  # noqa: BLE001
        return one_line(err)


# ----------------------------------------------------------------------------------------- tokenizer


def step_tokenizer(record: Record, session: Session) -> None:
    from transformers import AutoTokenizer

    request = session.request
    text = request.sample_text
    tokenizer = AutoTokenizer.from_pretrained(
        request.folder, trust_remote_code=request.trust_remote_code, local_files_only=True
    )
    session.tokenizer = tokenizer
    record["class"] = type(tokenizer).__name__
    record["ids"] = [int(i) for i in tokenizer(text)["input_ids"]]
    plain = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    record["ids_plain"] = plain
    decoded = str(tokenizer.decode(plain, skip_special_tokens=True))
    record["decoded"] = decoded
    record["roundtrip"] = decoded.strip() == text.strip()
    reference = _reference_ids(request.folder, text)
    record["reference"] = reference
    ref_ids = reference.get("ids")
    record["agrees_with_reference"] = None if ref_ids is None else ref_ids == plain


def _reference_ids(folder: str, text: str) -> Record:
    """The sample's ids from the tokenizer files read without transformers, without special tokens."""
    try:
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            from tokenizers import Tokenizer

            backend = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
            return {"source": "tokenizer.json", "ids": backend.encode(text, add_special_tokens=False).ids}
        if os.path.isfile(os.path.join(folder, "tokenizer.model")):
            return _sentencepiece_ids(os.path.join(folder, "tokenizer.model"), text)
        vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        if os.path.isfile(vocab) and os.path.isfile(merges):
            from tokenizers import Tokenizer, models, pre_tokenizers

            backend = Tokenizer(models.BPE.from_file(vocab, merges))
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            return {
                "source": "vocab.json+merges.txt",
                "ids": backend.encode(text, add_special_tokens=False).ids,
            }
    except Exception as err:  # noqa: BLE001 - an unreadable reference is reported, not fatal
        return {"source": None, "ids": None, "error": one_line(err)}
    return {
        "source": None,
        "ids": None,
        "reason": "no tokenizer.json, tokenizer.model or vocab.json+merges.txt",
    }


def _sentencepiece_ids(path: str, text: str) -> Record:
    try:
        import sentencepiece
    except ImportError:
        return {
            "source": None,
            "ids": None,
            "reason": "tokenizer.model needs sentencepiece, not installed here",
        }
    processor = sentencepiece.SentencePieceProcessor(model_file=path)
    return {"source": "tokenizer.model", "ids": [int(i) for i in processor.encode(text)]}


# --------------------------------------------------------------------------------------------- processor


def step_processor(record: Record, session: Session) -> None:
    from transformers import AutoProcessor
    from transformers.processing_utils import ProcessorMixin

    request = session.request
    record["processor_files"] = [
        f for f in PROCESSOR_FILES if os.path.isfile(os.path.join(request.folder, f))
    ]
    processor = AutoProcessor.from_pretrained(
        request.folder, trust_remote_code=request.trust_remote_code, local_files_only=True
    )
    record["class"] = type(processor).__name__
    is_processor = isinstance(processor, ProcessorMixin) and getattr(processor, "tokenizer", None) is not None
    record["is_processor"] = is_processor
    if is_processor:
        session.processor = processor
    record["image_token"] = _image_placeholder(session.processor, session.tokenizer)
    record["chat_template"] = _render_chat_template(session.processor, session.tokenizer or processor)


def _render_chat_template(processor: Any, tokenizer: Any) -> Record:
    """A two-turn conversation must come out with its text."""
    owner, source = _template_owner(processor, tokenizer)
    if owner is None:
        return {"source": None, "renders": False}
    turns = ["Hello, who are you?", "A helpful model.", "Describe the image."]
    roles = ["user", "assistant", "user"]
    out: Record = {"source": source}
    for style in ("string", "parts"):
        conversation = [
            {"role": role, "content": text if style == "string" else [{"type": "text", "text": text}]}
            for role, text in zip(roles, turns)
        ]
        try:
            rendered = owner.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - try the other content style, then report
            out["error"] = one_line(err)
            continue
        out.pop("error", None)
        out["rendered"] = rendered
        out["renders"] = isinstance(rendered, str) and all(t in rendered for t in turns)
        return out
    out["renders"] = False
    return out


def _template_owner(processor: Any, tokenizer: Any) -> tuple[Any, str | None]:
    if (
        processor is not None
        and getattr(processor, "chat_template", None)
        and hasattr(processor, "apply_chat_template")
    ):
        return processor, "processor"
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer, "tokenizer"
    return None, None


def _image_placeholder(processor: Any, tokenizer: Any) -> str | None:
    """The text a user writes where the image goes: the processor's begin-of-image token where it has one
    (Gemma 3 expands it), else its image token, else a `<image>` token of the vocabulary."""
    for owner in (processor, tokenizer):
        for attr in ("boi_token", "image_token"):
            value = getattr(owner, attr, None) if owner is not None else None
            if isinstance(value, str) and value:
                return value
    if tokenizer is not None and "<image>" in tokenizer.get_vocab():
        return "<image>"
    return None


# -------------------------------------------------------------------------------------------------- load


def step_load(record: Record, session: Session) -> None:
    import torch

    request = session.request
    with open(os.path.join(request.folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    device = _pick_device(request.device)
    load, via = _model_loader(config, request.trust_remote_code)
    record["via"] = via
    kwargs: dict[str, Any] = {
        _dtype_keyword(): "auto",
        "trust_remote_code": request.trust_remote_code,
        "local_files_only": True,
        "output_loading_info": True,
    }
    budget = _offload_budget(request, device)
    if budget is not None:
        kwargs.update(device_map="auto", max_memory=budget, offload_folder=_offload_dir(request))
        record["max_memory"] = {str(k): v for k, v in budget.items()}
    model, info = load(request.folder, **kwargs)
    if budget is None:
        model = model.to(device)
    model.eval()
    session.model = model
    record["class"] = type(model).__name__
    record["dtype"] = str(getattr(model, "dtype", None)).replace("torch.", "")
    record["device"] = device
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        record[key] = sorted(str(k) for k in info.get(key) or [])
    device_map = getattr(model, "hf_device_map", None) if budget is not None else None
    record["device_map"] = {str(k): str(v) for k, v in device_map.items()} if device_map else None
    counts: dict[str, int] = {}
    for value in (device_map or {}).values():
        counts[str(value)] = counts.get(str(value), 0) + 1
    record["device_counts"] = counts or {device: 1}
    session.input_device = _input_device(device_map, device, torch)


def _pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested} was asked for, but torch sees no CUDA device here")
    return requested


def _dtype_keyword() -> str:
    """transformers 5 takes `dtype=`; 4.x takes `torch_dtype=` (4.56+ accepts both)."""
    import transformers

    return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def _model_loader(config: dict[str, Any], trust: bool) -> tuple[Callable[..., Any], str]:
    """The class to load with: the auto_map's (remote code), else `architectures`, else the image-text
    Auto classes before AutoModel (AutoModel drops the LM head: a false `unexpected_keys: lm_head.weight`)."""
    import transformers

    auto_map = config.get("auto_map") or {}
    if auto_map:
        if not trust:
            raise ValueError(
                "config.json has an auto_map (the model's own code) but trust_remote_code is false"
            )
        for key in (
            "AutoModelForImageTextToText",
            "AutoModelForVision2Seq",
            "AutoModelForCausalLM",
            "AutoModel",
        ):
            if key in auto_map and hasattr(transformers, key):
                return getattr(transformers, key).from_pretrained, f"auto_map:{key}"
    for arch in config.get("architectures") or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls.from_pretrained, "architectures"
    if config.get("architectures"):
        raise ImportError(
            f"transformers {transformers.__version__} has no class {config['architectures'][0]} "
            "(named by config.json architectures)"
        )
    return _first_auto_class(), "auto"


def _first_auto_class() -> Callable[..., Any]:
    import transformers

    names = ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModel")
    classes = [getattr(transformers, n) for n in names if hasattr(transformers, n)]

    def load(folder: str, **kwargs: Any) -> Any:
        for cls in classes[:-1]:
            try:
                return cls.from_pretrained(folder, **kwargs)
            except ValueError as err:  # "Unrecognized configuration class": not an image-text model
                log(f"{cls.__name__} does not take this config ({one_line(err)}); trying the next class")
        return classes[-1].from_pretrained(folder, **kwargs)

    return load


def _weights_bytes(folder: str) -> int:
    return sum(
        os.path.getsize(os.path.join(folder, f))
        for f in os.listdir(folder)
        if f.endswith((".safetensors", ".bin")) and f != "training_args.bin"
    )


def _offload_budget(request: Request, device: str) -> dict[Any, Any] | None:
    """accelerate's max_memory when the model must be spread (a given budget, or one that does not fit)."""
    if request.max_memory is not None:
        return {int(k) if str(k).isdigit() else k: v for k, v in request.max_memory.items()}
    import torch

    size = _weights_bytes(request.folder)
    available = _available_ram()
    if device.startswith("cuda"):
        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        free = torch.cuda.mem_get_info(index)[0]
        if size < 0.85 * free:  # room left for activations
            return None
        budget: dict[Any, Any] = {index: int(0.85 * free)}
        if device == "cuda":
            for other in range(torch.cuda.device_count()):
                budget.setdefault(other, int(0.85 * torch.cuda.mem_get_info(other)[0]))
        log(f"{size / 1e9:.1f} GB of weights do not fit the free device memory: spreading with device_map")
        return {**budget, "cpu": int(0.8 * available)} if available else budget
    if available and size > 0.8 * available:
        log(f"{size / 1e9:.1f} GB of weights do not fit the free RAM: offloading to disk")
        return {"cpu": int(0.7 * available)}
    return None


def _available_ram() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _offload_dir(request: Request) -> str:
    if request.offload_dir:
        os.makedirs(request.offload_dir, exist_ok=True)
        return request.offload_dir
    path = tempfile.mkdtemp(prefix="offload-", dir=request.scratch)
    _CLEANUP.append(path)
    return path


def _input_device(device_map: dict[str, Any] | None, device: str, torch: Any) -> Any:
    """Where inputs go: with a device map, the first GPU in it (accelerate's hooks move the rest)."""
    if not device_map:
        return torch.device(device)
    for value in device_map.values():
        if isinstance(value, int) or str(value).startswith("cuda"):
            return torch.device(f"cuda:{value}" if isinstance(value, int) else value)
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------ text forward


def step_text_forward(record: Record, session: Session) -> None:
    import torch

    model = session.model
    ids = session.tokenizer(session.request.sample_text, return_tensors="pt")["input_ids"]
    ids = ids.to(session.input_device)
    with torch.inference_mode():
        try:
            output = model(input_ids=ids)
            record["via"] = "model"
        except Exception as err:
            name, inner = _inner_language_model(model)
            if inner is None:
                raise
            record["first_error"] = one_line(err)
            record["via"] = name
            output = inner(input_ids=ids)
    logits = getattr(output, "logits", None)
    if logits is None:
        raise TypeError(f"the {record['via']} forward returned no logits ({type(output).__name__})")
    record["logits"], record["shape"] = _save_array(session.request, "text_logits", logits)


def _inner_language_model(model: Any) -> tuple[str, Any]:
    for name in ("llm", "language_model", "model.language_model", "text_model"):
        inner: Any = model
        for part in name.split("."):
            inner = getattr(inner, part, None)
        if inner is not None and callable(inner):
            return name, inner
    return "", None


def _save_array(request: Request, name: str, tensor: Any) -> tuple[str, list[int]]:
    import numpy

    os.makedirs(request.outputs_dir, exist_ok=True)
    array = tensor.detach().float().cpu().numpy()
    numpy.save(os.path.join(request.outputs_dir, f"{name}.npy"), array)
    return f"{name}.npy", [int(d) for d in array.shape]


# ------------------------------------------------------------------------------------- image and liveness


def step_image_forward(record: Record, session: Session) -> None:
    import torch

    request = session.request
    model = session.model
    session.image = _load_image(request.image)
    checkpoint = _checkpoint_names(request.folder)
    liveness = {prefix: map_prefix(prefix, checkpoint, model) for prefix in request.tuned_prefixes}
    record["liveness"] = liveness
    hooks = _Hooks(model, liveness)
    try:
        with torch.inference_mode():
            if callable(getattr(model, "chat", None)):
                record["via"] = "chat"
                _chat(session, max_new_tokens=1)
            else:
                record["via"] = "processor"
                inputs = _processor_inputs(session, record)
                logits = getattr(model(**inputs), "logits", None)
                if logits is not None:
                    record["logits"], record["logits_shape"] = _save_array(request, "image_logits", logits)
    finally:
        hooks.remove()
        hooks.save(request)  # what ran before a failure is evidence too


class _Hooks:
    """Forward hooks on the tuned modules: did each run, and its first output."""

    def __init__(self, model: Any, liveness: dict[str, Record]) -> None:
        modules = dict(model.named_modules())
        self.entries = [m for prefix in liveness.values() for m in prefix["modules"]]
        self.outputs: dict[str, Any] = {}
        self.handles = []
        for entry in self.entries:
            entry.update(ran=False, calls=0, output=None)
            module = modules.get(entry["name"])
            if module is not None:
                self.handles.append(module.register_forward_hook(self._hook(entry)))

    def _hook(self, entry: Record) -> Callable[..., None]:
        def hook(
            _module: Any, _inputs: Any, output: Any
        ) -> None:  # returns None: a value would replace the output
            entry["ran"] = True
            entry["calls"] += 1
            if entry["name"] not in self.outputs:
                tensor = _first_tensor(output)
                if tensor is not None:
                    self.outputs[entry["name"]] = tensor.detach().float().cpu()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def save(self, request: Request) -> None:
        for index, entry in enumerate(self.entries):
            tensor = self.outputs.get(entry["name"])
            if tensor is not None:
                entry["output"], entry["shape"] = _save_array(request, f"module-{index}", tensor)


def _first_tensor(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
        return None
    hidden = getattr(value, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    if isinstance(value, dict) or hasattr(value, "values"):
        for item in value.values():
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _load_image(path: str | None) -> Any:
    from PIL import Image

    if path:
        return Image.open(path).convert("RGB")
    return _test_image()


def _test_image(width: int = 96, height: int = 72, seed: int = 7) -> Any:
    """A deterministic picture: a colour ramp with a filled rectangle, from a fixed seed (no numpy needed)."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    start = [rng.randrange(256) for _ in range(3)]
    stop = [rng.randrange(256) for _ in range(3)]
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for x in range(width):
        t = x / max(1, width - 1)
        draw.line([(x, 0), (x, height)], fill=tuple(round(a + (b - a) * t) for a, b in zip(start, stop)))
    left, top = rng.randrange(width // 2), rng.randrange(height // 2)
    draw.rectangle(
        [left, top, left + width // 3, top + height // 3], fill=tuple(rng.randrange(256) for _ in range(3))
    )
    return image


def _processor_inputs(session: Session, record: Record) -> dict[str, Any]:
    """The processor's inputs for one image and the prompt, on the model's input device and dtype."""
    text, placeholder, added = _image_prompt(session.processor, session.tokenizer, session.request.prompt)
    record.update(prompt=text, placeholder=placeholder, placeholder_added=added)
    inputs = session.processor(images=[session.image], text=[text], return_tensors="pt")
    return _to_model(dict(inputs), session)


def _image_prompt(processor: Any, tokenizer: Any, prompt: str) -> tuple[str, str | None, bool]:
    """The prompt text with the model's own image placeholder: from the chat template's image content where it
    renders one, else put before the user's text (a template without an image placeholder, the LLaVA case)."""
    placeholder = _image_placeholder(processor, tokenizer)
    owner, _ = _template_owner(processor, tokenizer)
    text = (_render_with_image(owner, prompt) if owner is not None else None) or prompt
    if placeholder is None or placeholder in text:
        return text, placeholder, False
    if prompt in text:
        return text.replace(prompt, f"{placeholder}\n{prompt}", 1), placeholder, True
    return f"{placeholder}\n{text}", placeholder, True


def _render_with_image(owner: Any, prompt: str) -> str | None:
    """The chat template on a user turn with an image; a template written for string content gets the text."""
    with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text_only = [{"role": "user", "content": prompt}]
    for messages in (with_image, text_only):
        try:
            text = owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as err:  # noqa: BLE001 - a template for string content only: try that
            log(f"the chat template fails on {messages[0]['content']!r}: {one_line(err)}")
            continue
        # A template that prints the content list as Python (`{'type': 'image'}`) did not understand it.
        if isinstance(text, str) and "'type'" not in text:
            return text
    return None


def _to_model(inputs: dict[str, Any], session: Session) -> dict[str, Any]:
    import torch

    dtype = getattr(session.model, "dtype", None)
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.to(session.input_device)
            if value.is_floating_point() and dtype is not None:
                value = value.to(dtype)
        moved[key] = value
    return moved


def _smoke_generation(tokenizer: Any, max_new_tokens: int) -> Record:
    """Greedy, and exactly `max_new_tokens` ordinary tokens: a smoke test asks whether generation runs and
    decodes to text, and a tiny or undertrained model would otherwise stop at once or emit only special
    tokens, which decode to nothing."""
    special = sorted(set(getattr(tokenizer, "all_special_ids", None) or []))
    kwargs: Record = {"max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens, "do_sample": False}
    if special:
        kwargs["bad_words_ids"] = [[i] for i in special]
    return kwargs


def _chat(session: Session, max_new_tokens: int) -> str:
    """model.chat() as its model card calls it, greedy where the signature allows it."""
    model = session.model
    parameters = inspect.signature(model.chat).parameters
    kwargs: dict[str, Any] = {
        "image": session.image,
        "msgs": [{"role": "user", "content": session.request.prompt}],
        "tokenizer": session.tokenizer,
    }
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if "sampling" in parameters:
        kwargs["sampling"] = False
    if "max_new_tokens" in parameters or takes_any:
        kwargs["max_new_tokens"] = max_new_tokens
    if takes_any and max_new_tokens > 1:  # passed on to generate(): ordinary tokens, not an immediate stop
        kwargs["min_new_tokens"] = max_new_tokens
    answer = model.chat(**kwargs)
    if isinstance(answer, tuple):  # some chat() return (answer, context, ...)
        answer = answer[0]
    return answer if isinstance(answer, str) else str(answer)


# ------------------------------------------------------------------------------------ prefix -> modules


def _checkpoint_names(folder: str) -> list[str] | None:
    """Tensor names as saved, from the safetensors headers (stdlib only); None without safetensors."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return sorted(json.load(f)["weight_map"])
    single = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(single):
        return None
    with open(single, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    return sorted(k for k in header if k != "__metadata__")


def normal_name(name: str) -> str:
    """A tensor name without the levels that move between versions, so checkpoint and module names meet."""
    parts = name.split(".")
    last = PARAM_RENAMES.get(parts[-1], parts[-1])
    return ".".join([p for p in parts[:-1] if p not in NAME_LEVELS] + [last])


def covers(prefix: str, name: str) -> bool:
    """Whether a tuned entry covers a checkpoint name: a plain prefix, or `re:<pattern>` matched at the start
    (the manifest's two forms)."""
    if prefix.startswith("re:"):
        return re.match(prefix[3:], name) is not None
    return name.startswith(prefix)


def map_prefix(prefix: str, checkpoint: list[str] | None, model: Any) -> Record:
    """The model's own modules that hold exactly the checkpoint tensors under `prefix`.

    A module belongs to the prefix when some of its parameters are tensors under the prefix and none is a
    checkpoint tensor outside it; the topmost such modules are the answer. A tensor under the prefix that is a
    direct parameter of a module that also holds others marks that module as `partial`.
    """
    runtime = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    runtime += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    names = checkpoint if checkpoint is not None else runtime
    inside = {normal_name(n) for n in names if covers(prefix, n)}
    outside = {normal_name(n) for n in names if not covers(prefix, n)}
    entry: Record = {"checkpoint_tensors": len([n for n in names if covers(prefix, n)]), "modules": []}
    if not inside:
        entry["reason"] = f"no tensor of the checkpoint starts with {prefix!r}"
        return entry
    counts: dict[str, list[int]] = {}
    hits = []
    for name in runtime:
        key = normal_name(name)
        side = 0 if key in inside else 1 if key in outside else None
        if side is None:
            continue
        if side == 0:
            hits.append(name)
        parts = name.split(".")[:-1]
        for depth in range(len(parts) + 1):
            counts.setdefault(".".join(parts[:depth]), [0, 0])[side] += 1
    entry["unmatched_tensors"] = len(inside - {normal_name(n) for n in hits})
    chosen: dict[str, bool] = {}
    for name in hits:
        owner = _topmost_pure(name, counts)
        chosen.setdefault(owner if owner is not None else name.rsplit(".", 1)[0], owner is None)
    entry["modules"] = [{"name": name, "partial": partial} for name, partial in sorted(chosen.items())]
    if not entry["modules"]:
        entry["reason"] = f"no parameter of the model corresponds to a tensor under {prefix!r}"
    return entry


def _topmost_pure(param: str, counts: dict[str, list[int]]) -> str | None:
    parts = param.split(".")[:-1]
    for depth in range(1, len(parts) + 1):
        module = ".".join(parts[:depth])
        inside, outside = counts.get(module, [0, 0])
        if inside and not outside:
            return module
    return None


# ---------------------------------------------------------------------------------------------- generate


def step_generate(record: Record, session: Session) -> None:
    """A few greedy tokens: with the image where the model takes one, from the prompt alone otherwise."""
    import torch

    model, request = session.model, session.request
    if session.image is None and _takes_images(session):
        session.image = _load_image(request.image)
    torch.manual_seed(0)
    with torch.inference_mode():
        if callable(getattr(model, "chat", None)):
            record["via"] = "chat"
            record["text"] = _chat(session, max_new_tokens=request.max_new_tokens)
            return
        record["via"] = "generate"
        record["with_image"] = session.processor is not None
        if session.processor is not None:
            inputs = _processor_inputs(session, {})
        else:
            inputs = _to_model(dict(session.tokenizer(request.prompt, return_tensors="pt")), session)
        output = model.generate(**inputs, **_smoke_generation(session.tokenizer, request.max_new_tokens))
    new = output[0, inputs["input_ids"].shape[1] :]
    record["new_tokens"] = [int(i) for i in new]
    record["text"] = session.tokenizer.decode(new, skip_special_tokens=True)


# -------------------------------------------------------------------------------------------------- main

_CLEANUP: list[str] = []


def run(request: Request, result: Result) -> None:
    session = Session(request)
    ok, _ = result.run("runtime", step_runtime)
    if not ok:
        return _skip_rest(result, "runtime", "torch, transformers or tokenizers cannot be imported")
    ok, _ = result.run("preflight", lambda r: step_preflight(r, request.folder))
    if not ok:
        return _skip_rest(result, "preflight", "the model's code imports modules this runtime lacks")
    result.run("tokenizer", lambda r: step_tokenizer(r, session))
    if session.tokenizer is not None:
        result.run("processor", lambda r: step_processor(r, session))
    else:
        result.skip("processor", "no tokenizer")
    ok, _ = result.run("load", lambda r: step_load(r, session))
    if not ok:
        return _skip_rest(result, "load", "the model did not load")
    if request.stop_after == "load":
        return _skip_rest(result, "load", "not requested")
    if session.tokenizer is None:
        return _skip_rest(result, "load", "no tokenizer to build inputs with")
    result.run("text_forward", lambda r: step_text_forward(r, session))
    if _takes_images(session):
        result.run("image_forward", lambda r: step_image_forward(r, session))
    else:
        result.skip(
            "image_forward",
            "no way to give the model an image: AutoProcessor gave no processor and the model has no chat()",
        )
    if request.generate:
        result.run("generate", lambda r: step_generate(r, session))
    else:
        result.skip("generate", "not requested")


def _takes_images(session: Session) -> bool:
    return session.processor is not None or callable(getattr(session.model, "chat", None))


def _skip_rest(result: Result, after: str, reason: str) -> None:
    for name in STEPS[STEPS.index(after) + 1 :]:
        result.skip(name, reason)


@contextlib.contextmanager
def _isolated_environment(scratch: str) -> Iterator[None]:
    """Offline, and remote code copied into a temporary modules cache: the user's HF cache is an input,
    never written to. Set before transformers is imported (it reads them once). Temporary folders go into
    `scratch` (beside the result file), so that what a crash leaves is in the caller's folder."""
    modules = tempfile.mkdtemp(prefix="hf-modules-", dir=scratch)
    _CLEANUP.append(modules)
    os.environ.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_MODULES_CACHE=modules,
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
    )
    try:
        yield
    finally:
        for path in _CLEANUP:
            shutil.rmtree(path, ignore_errors=True)


def _importable_view(folder: str, scratch: str) -> str:
    """The folder under a name remote code can be imported from. transformers 4.x names the dynamic module after
    the folder, so a folder called `.x.hubsync-staging-1` or `model-v2.5` breaks relative imports
    (`No module named 'transformers_modules.'`); then the model is loaded through a folder of symlinks with a
    plain name, made in the worker's scratch folder (the model's own folder is never written)."""
    name = os.path.basename(os.path.normpath(folder))
    if name.isidentifier():
        return folder
    view = tempfile.mkdtemp(prefix="model_", dir=scratch)
    _CLEANUP.append(view)
    for entry in os.listdir(folder):
        os.symlink(os.path.join(folder, entry), os.path.join(view, entry))
    return view


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: worker.py REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    faulthandler.enable()  # a segfault in model code leaves a Python stack on stderr
    result = Result(argv[2])
    try:
        with open(argv[1], encoding="utf-8") as f:
            request = Request(json.load(f), argv[2])
    except (OSError, ValueError, KeyError) as err:
        result.data["error"] = f"bad request: {one_line(err)}"
        result.save()
        return 2
    scratch = os.path.dirname(os.path.abspath(argv[2]))
    with _isolated_environment(scratch):
        request.folder = _importable_view(request.folder, scratch)
        run(request, result)
    result.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
