"""Load and run the base and the build with transformers: tokenizer, processor, chat template, loading
info, text-only logits, liveness of the tuned modules, generation.

(Runs in hubsync's own process for now; it moves into the verification worker.)
"""

from __future__ import annotations

import gc
import json
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubsync.errors import HubsyncError, VerifyError
from hubsync.verify.report import Report
from hubsync.verify.subject import Subject

SAMPLE_TEXT = "Describe the image. There is a white cat sitting on a brown table."
VISION_HINTS = (
    "vpm",
    "vision",
    "visual",
    "resampler",
    "multi_modal_projector",
    "mm_projector",
    "image",
    "img",
)
# Same weights, same inputs, same kernels give the same logits on a CPU; GPU kernels may reorder sums.
TOLERANCE = {"cpu": 0.0, "cuda": 1e-2}


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise VerifyError(
            f"verify.device is {requested} but no CUDA device is visible: use `device: auto` or cpu"
        )
    return requested


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
    modules = dict(model.named_modules())
    found = {}
    for prefix in prefixes:
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
    import numpy as np

    ramp = np.linspace(0, 255, 40, dtype=np.float64)[None, :, None]
    pixels = np.broadcast_to(ramp * np.array([1.0, 0.5, 0.25]), (32, 40, 3)).copy()
    pixels[8:20, 10:24] = (200, 30, 90)  # a deterministic picture: a gradient and a rectangle
    return Image.fromarray(pixels.round().astype(np.uint8), mode="RGB")


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
    with report.timed(f"load {label}"):
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
        with torch.inference_mode(), report.timed(f"text forward {label}"):
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
        with torch.inference_mode(), report.timed(f"image {'generate' if generate else 'forward'} {label}"):
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


def runtime_versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
