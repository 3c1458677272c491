"""Load and run the base and the build, each in the verification worker, in the model's own runtime, and
judge what came back: tokenizer (against an independent reference), processor, chat template, loading, the
frozen parts, the liveness of every tuned part, generation.

hubsync's own process never imports a model's code or loads its weights: `runtime.run_worker` starts
`worker.py` in the chosen interpreter, and only small facts and arrays come back. When the build fails to load
or run, the base's result in the same runtime says whether the build or the runtime is to blame.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hubsync.record import MODEL_LOADS
from hubsync.verify import basecache
from hubsync.verify.report import Report
from hubsync.verify.runtime import (
    Runtime,
    WorkerResult,
    current_runtime,
    python_runtime,
    requirements_runtime,
    run_worker,
    suggested_requirements,
)
from hubsync.verify.subject import Subject

VISION_HINTS = (
    "vpm",
    "vision",
    "visual",
    "resampler",
    "multi_modal_projector",
    "mm_projector",
    "image",
    "img",
    "connector",  # Idefics3 / SmolVLM's projector
)
# Same weights, same inputs, same kernels give the same logits on a CPU; GPU kernels may reorder sums.
TOLERANCE = {"cpu": 0.0, "cuda": 1e-2}
# The torch that most remote code written for transformers 4.x still runs on (field notes: MiniCPM-V 2.5's
# resampler needs torch <= 2.6).


def choose_runtime(subject: Subject) -> Runtime:
    """The interpreter the subject asks for: verify.python, verify.requirements, or hubsync's own."""
    spec = subject.runtime
    if spec.get("python"):
        return python_runtime(Path(str(spec["python"])))
    if spec.get("requirements"):
        return requirements_runtime(tuple(spec["requirements"]))
    return current_runtime()


def run_models(subject: Subject, report: Report) -> Runtime:
    """Run the build and the base in the worker and add every load-and-run check to `report`."""
    runtime = choose_runtime(subject)
    report.runtime = {"kind": runtime.kind, "requirements": list(runtime.requirements)}
    report.versions.update({k: str(v) for k, v in runtime.versions.items() if v and k != "executable"})
    with tempfile.TemporaryDirectory(prefix="hubsync-verify-") as scratch:
        with report.timed("run build"):
            build = _run(subject, subject.folder, runtime, Path(scratch) / "build")
        base = _run_base(subject, runtime, Path(scratch) / "base", report)
        _Judge(subject, report, runtime, build, base).judge()
    return runtime


def _run_base(subject: Subject, runtime: Runtime, workdir: Path, report: Report) -> WorkerResult:
    """The base's run: the one kept from an earlier verify with the same base, runtime and request (see
    hubsync.verify.basecache), else a fresh one, kept when it passed."""
    request = _request(subject, subject.base_folder)
    cache_key = basecache.key(runtime, request)
    kept = basecache.load(runtime, cache_key)
    if kept is not None:
        report.timings["run base (kept from an earlier verify)"] = 0.0
        return kept
    with report.timed("run base"):
        result = run_worker(runtime, request, timeout=subject.timeout, workdir=workdir)
    basecache.save(cache_key, result)
    return result


def _run(subject: Subject, folder: Path, runtime: Runtime, workdir: Path) -> WorkerResult:
    return run_worker(runtime, _request(subject, folder), timeout=subject.timeout, workdir=workdir)


def _request(subject: Subject, folder: Path) -> dict[str, Any]:
    return {
        "folder": str(folder),
        "trust_remote_code": subject.trust_remote_code,
        "device": subject.device,
        "prompt": subject.prompt,
        "image": str(subject.image) if subject.image else None,
        "tuned_prefixes": list(subject.tuned_prefixes),
        "max_memory": subject.max_memory,
    }


def _kind(error: str | None) -> str:
    """The exception type of a worker error line ("TypeName: message")."""
    return (error or "").split(":", 1)[0]


def _base_version(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    version = config.get("transformers_version") if isinstance(config, dict) else None
    return version if isinstance(version, str) else None


class _Judge:
    """Turns the two worker results into checks."""

    def __init__(
        self, subject: Subject, report: Report, runtime: Runtime, build: WorkerResult, base: WorkerResult
    ) -> None:
        self.subject, self.report, self.runtime = subject, report, runtime
        self.build, self.base = build, base

    # ---- the order of judgement
    def judge(self) -> None:
        self._record_device_and_memory()
        if not self._runtime_can_import():
            return
        self._tokenizer()
        self._processor_and_template()
        if not self._loads():
            return
        self._frozen_parts()
        self._liveness()
        self._generation()

    # ---- helpers
    @property
    def where(self) -> str:
        return self.runtime.describe()

    @property
    def base_label(self) -> str:
        base = self.subject.record.base
        return (
            f"{base.repo} @ {(base.sha or '')[:12]}"
            if base.repo
            else f"the base folder {self.subject.base_folder}"
        )

    def _blame_base(self, build_error: str | None, base_step: Mapping[str, Any], doing: str) -> str | None:
        """The one-line message when the base fails the same way (the runtime, not the build, is at fault)."""
        if base_step.get("ok") is not False or _kind(base_step.get("error")) != _kind(build_error):
            return None
        written = _base_version(self.subject.base_folder)
        running = self.runtime.versions.get("transformers") or "?"
        fix = "verify in the environment the model was written for: set verify.requirements or verify.python"
        if written and written.split(".")[0] != str(running).split(".")[0]:
            checked = self.base.step("preflight").get("checked") or []
            reqs = suggested_requirements(written, torchvision="torchvision" in checked)
            fix = (
                f"its config.json was written by transformers {written}: set verify.requirements: "
                f"[{', '.join(reqs)}] or verify.python"
            )
        return (
            f"the base {self.base_label} itself does not {doing} under transformers {running} "
            f"({base_step.get('error')}): {fix}"
        )

    def _crash(self, result: WorkerResult) -> str | None:
        failure = result.failure
        if failure is None:
            return None
        tail = "; ".join(result.stderr_tail[-2:])
        return f"{failure}" + (f" ({tail})" if tail else "")

    # ---- checks
    def _record_device_and_memory(self) -> None:
        load = self.build.step("load")
        self.report.device = str(load.get("device") or self.subject.device)
        counts = load.get("device_counts") or {}
        if load.get("device_map"):
            self.report.device_map = "device_map=auto: " + ", ".join(
                f"{d} {n} module(s)" for d, n in counts.items()
            )
        for label, result in (("build", self.build), ("base", self.base)):
            for step, record in result.steps.items():
                if record.get("seconds") is not None:
                    self.report.timings[f"{step} {label}"] = float(record["seconds"])
            peaks = [s.get("rss_peak_bytes") or 0 for s in result.steps.values()]
            cuda = [s.get("cuda_peak_bytes") or 0 for s in result.steps.values()]
            self.report.memory[f"peak RAM {label}"] = max(peaks, default=0)
            if any(cuda):
                self.report.memory[f"peak device {label}"] = max(cuda)

    def _runtime_can_import(self) -> bool:
        preflight = self.build.step("preflight")
        if preflight.get("ok") is False:
            missing = preflight.get("missing") or []
            first = missing[0] if missing else {}
            needed_by = ", ".join(first.get("files") or []) or "the model's code"
            self.report.add(
                "runtime has the model's imports",
                False,
                f"{self.where} cannot import {first.get('module', '?')} (needed by {needed_by}): install it there, "
                "or set verify.python / verify.requirements",
                [f"{m.get('module')}: {m.get('error')}" for m in missing],
            )
            return False
        crash = self._crash(self.build) if not self.build.steps.get("load") else None
        if crash:
            self.report.add(
                MODEL_LOADS, False, f"the build could not be loaded: {crash}", self.build.stderr_tail
            )
            return False
        return True

    def _tokenizer(self) -> None:
        tok, base_tok = self.build.step("tokenizer"), self.base.step("tokenizer")
        if tok.get("ok") is not True:
            blame = self._blame_base(tok.get("error"), base_tok, "load its tokenizer")
            self.report.add(
                "tokenizer",
                False,
                blame or f"AutoTokenizer fails under {self.where}: {tok.get('error')}",
                blame="base" if blame else "build",
            )
            return
        ids, base_ids = tok.get("ids"), base_tok.get("ids")
        if ids != base_ids or tok.get("decoded") != base_tok.get("decoded"):
            self.report.add(
                "tokenizer",
                False,
                f"{tok.get('class')} encodes the sample differently from the base's {base_tok.get('class')} "
                f"({len(ids or [])} vs {len(base_ids or [])} ids): the tokenizer was rebuilt or replaced",
                [f"build ids {(ids or [])[:24]}", f"base ids {(base_ids or [])[:24]}"],
            )
            return
        self._tokenizer_reference(tok, base_tok)

    def _tokenizer_reference(self, tok: Mapping[str, Any], base_tok: Mapping[str, Any]) -> None:
        ref = tok.get("reference") or {}
        agrees = tok.get("agrees_with_reference")
        plain, ref_ids = tok.get("ids_plain") or [], ref.get("ids") or []
        if agrees is False:
            whose = (
                "for the base too"
                if base_tok.get("agrees_with_reference") is False
                else "the base's does not"
            )
            self.report.add(
                "tokenizer",
                False,
                f"{tok.get('class')} under {self.where} gives {len(plain)} ids where {ref.get('source')} gives "
                f"{len(ref_ids)} ({whose}): this runtime rebuilds the tokenizer lossily; verify in the model's "
                "own runtime (verify.requirements or verify.python)",
                [f"AutoTokenizer {plain[:24]}", f"{ref.get('source')} {ref_ids[:24]}"],
            )
            return
        reference = (
            f", and {ref.get('source')} read by the tokenizers library agrees"
            if agrees
            else f" (no independent reference: {ref.get('reason') or ref.get('error') or 'none'})"
        )
        self.report.add(
            "tokenizer",
            True,
            f"{tok.get('class')} encodes the sample to the same {len(tok.get('ids') or [])} ids as the base"
            f"{reference}",
        )

    def _processor_and_template(self) -> None:
        proc, base_proc = self.build.step("processor"), self.base.step("processor")
        if base_proc.get("processor_files"):
            if proc.get("ok") is not True:
                self.report.add(
                    "processor", False, f"AutoProcessor fails under {self.where}: {proc.get('error')}"
                )
            elif not proc.get("is_processor"):
                self.report.add(
                    "processor",
                    False,
                    f"AutoProcessor returns a bare {proc.get('class')}, not a processor: `processor.tokenizer` will "
                    "fail (the MiniCPM-V seed error); restore the processor config",
                )
            else:
                self.report.add("processor", True, f"AutoProcessor returns {proc.get('class')}")
        template, base_template = proc.get("chat_template") or {}, base_proc.get("chat_template") or {}
        if template.get("renders"):
            self.report.add(
                "chat template", True, f"renders a two-turn conversation (from the {template.get('source')})"
            )
        elif base_template.get("renders"):
            self.report.add(
                "chat template",
                False,
                "the base has a chat template but the build's tokenizer and processor have none"
                + (f" ({template.get('error')})" if template.get("error") else ""),
            )
        else:
            self.report.add("chat template", None, "the base has no chat template")

    def _loads(self) -> bool:
        load, base_load = self.build.step("load"), self.base.step("load")
        if load.get("ok") is not True:
            error = load.get("error") or self._crash(self.build) or load.get("skipped")
            blame = self._blame_base(load.get("error"), base_load, "load")
            self.report.add(
                MODEL_LOADS,
                False,
                blame
                or f"the build does not load under {self.where} ({error})"
                + (" although the base does" if base_load.get("ok") else ""),
                self.build.stderr_tail[-5:],
                blame="base" if blame else "build",
            )
            return False
        problems = [
            f"{key}: {', '.join(map(str, load.get(key)[:5]))}"
            for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
            if load.get(key)
        ]
        spread = f" ({self.report.device_map})" if self.report.device_map else ""
        self.report.add(
            MODEL_LOADS,
            not problems,
            f"{load.get('class')} loads with no missing, unexpected or mismatched keys{spread}"
            if not problems
            else f"loading reports {problems[0]}",
            problems,
        )
        return True

    def _array(self, result: WorkerResult, name: str | None) -> Any:
        import numpy as np

        return None if not name else np.load(result.outputs_dir / name)

    def _frozen_parts(self) -> None:
        text, base_text = self.build.step("text_forward"), self.base.step("text_forward")
        if text.get("ok") is not True or base_text.get("ok") is not True:
            why = text.get("error") or text.get("skipped") or base_text.get("error") or "unknown"
            self.report.add(
                "frozen parts untouched", None, f"no text-only forward for this architecture: {why}"
            )
            return
        a, b = self._array(self.build, text.get("logits")), self._array(self.base, base_text.get("logits"))
        diff = float(abs(a - b).max()) if a.shape == b.shape else float("inf")
        tol = TOLERANCE["cuda" if self.report.device.startswith("cuda") else "cpu"]
        prefixes = self.subject.tuned_prefixes
        if not (prefixes and all(any(h in p.lower() for h in VISION_HINTS) for p in prefixes)):
            self.report.add(
                "frozen parts untouched",
                None,
                f"the language model was tuned; text-only logits differ by {diff:.3g}",
            )
            return
        self.report.add(
            "frozen parts untouched",
            diff <= tol,
            f"text-only logits equal the base's (max |Δ| {diff:.3g}, tolerance {tol:g})"
            if diff <= tol
            else f"text-only logits differ from the base's by {diff:.3g} (tolerance {tol:g}): the language model "
            "changed although only vision parts were tuned",
            max_abs=diff,
            tolerance=tol,
        )

    def _liveness(self) -> None:
        image, base_image = self.build.step("image_forward"), self.base.step("image_forward")
        if image.get("ok") is not True:
            blame = self._blame_base(image.get("error"), base_image, "run with an image")
            why = image.get("error") or self._crash(self.build) or image.get("skipped")
            self.report.add(
                "tuned parts are live",
                False,
                blame or f"a forward with an image failed: {why}",
                blame="base" if blame else "build",
            )
            return
        problems, deltas = [], {}
        base_live = base_image.get("liveness") or {}
        for prefix in self.subject.tuned_prefixes:
            entry = (image.get("liveness") or {}).get(prefix) or {}
            found, delta = self._prefix_liveness(prefix, entry, base_live.get(prefix) or {})
            problems += found
            deltas.update(delta)
        self.report.add(
            "tuned parts are live",
            not problems,
            problems[0]
            if problems
            else "every tuned part ran in a forward with an image and differs from the base's: "
            + ", ".join(f"{m} max |Δ| {d:.3g}" for m, d in deltas.items()),
            problems,
            deltas=deltas,
        )

    def _prefix_liveness(
        self, prefix: str, entry: Mapping[str, Any], base_entry: Mapping[str, Any]
    ) -> tuple[list[str], dict[str, float]]:
        modules = entry.get("modules") or []
        if not modules:
            return [
                f"tuned prefix '{prefix}' maps to no module of the model ({entry.get('reason') or 'no match'})"
            ], {}
        base_modules = {m.get("name"): m for m in base_entry.get("modules") or []}
        problems, deltas = [], {}
        for module in modules:
            name = module.get("name")
            if not module.get("ran"):
                problems.append(f"{name} (tuned prefix '{prefix}') never ran in a forward with an image")
                continue
            theirs = base_modules.get(name) or {}
            a, b = self._array(self.build, module.get("output")), self._array(self.base, theirs.get("output"))
            if a is None or b is None or a.shape != b.shape:
                problems.append(
                    f"{name}: its output cannot be compared with the base's (shapes differ or missing)"
                )
                continue
            delta = float(abs(a - b).max())
            deltas[str(name)] = delta
            if delta == 0.0:
                problems.append(
                    f"{name} gives the base's output on an image: the tuned weights are not the ones being used"
                )
        return problems, deltas

    def _generation(self) -> None:
        generate = self.build.step("generate")
        text = generate.get("text")
        if generate.get("ok") is True and isinstance(text, str) and text:
            how = "with an image" if generate.get("with_image", True) else "from text alone (no image input)"
            self.report.add("generation", True, f"greedy generation {how} returned {text!r}")
            return
        why = generate.get("error") or self._crash(self.build) or generate.get("skipped") or "empty text"
        blame = self._blame_base(generate.get("error"), self.base.step("generate"), "generate")
        self.report.add(
            "generation",
            False,
            blame or f"generation with an image failed: {why}",
            blame="base" if blame else "build",
        )
