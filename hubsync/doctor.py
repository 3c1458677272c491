"""`hubsync doctor`: for someone holding a broken trainer output and no manifest.

It runs the same resolve -> read -> compare -> plan stages as a build, with nothing declared, then explains
what is missing or stale against the base in plain words (the failure catalogue) and prints a manifest that
`hubsync build` accepts. The base's weights are not downloaded (unless already cached): their headers and a
sample of each tensor's values are read over HTTP (hubsync.sample), enough to find the parts that changed.

When the base's config.json was written by another major version of transformers than the one hubsync would
verify with, doctor says so, and (when the base's weights are in the cache) tries to load the base in the
verification worker: a base this runtime cannot load gets a `verify.requirements` suggestion in the manifest.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from hubsync.errors import FinetuneError, HubsyncError
from hubsync.manifest import parse_manifest
from hubsync.tuned import unmoved_under

if TYPE_CHECKING:
    from hubsync.build import Prepared

KEPT_KINDS = ("processor", "remote code", "tokenizer", "chat template", "license", "generation config")
TORCHVISION_IMPORT = re.compile(r"^\s*(?:from|import)\s+torchvision\b", re.M)


@dataclass(frozen=True)
class Diagnosis:
    findings: tuple[str, ...]
    manifest_text: str
    problems: tuple[str, ...]


@dataclass(frozen=True)
class RuntimeAdvice:
    """What doctor found about the runtime the model needs."""

    finding: str
    requirements: tuple[str, ...]  # a verify.requirements suggestion, or () when none is needed
    certain: bool = (
        True  # the base failed to load here (set in the manifest), or it was not tried (a comment)
    )


def _base_spec(base: str) -> tuple[str, str | None]:
    repo, _, rev = base.partition("@")
    return repo, rev or None


def diagnose(
    finetune_dir: Path, base: str, *, cwd: Path | None = None, trust_remote_code: bool = False
) -> Diagnosis:
    """Compare a trainer output with its base; return findings and a ready manifest. A base whose config was
    written by another major transformers is loaded in the verification worker when its weights are here; its
    remote code runs there only with `trust_remote_code` (never in this process)."""
    cwd = (cwd or Path.cwd()).resolve()
    if not finetune_dir.is_dir():  # before anything is fetched
        raise FinetuneError(f"fine-tune folder {finetune_dir} does not exist: check the path")
    findings: list[str] = []
    base_yaml = _pin_base(base, findings)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", finetune_dir.resolve().name).strip("-") or "model"
    prep = _prepare(finetune_dir, base_yaml, name, cwd)
    findings += _file_findings(prep)
    findings += _tensor_findings(prep)
    suggested = list(prep.plan.suggested_tuned)
    findings += _change_findings(prep, suggested)
    advice = runtime_advice(prep, trust_remote_code=trust_remote_code)
    if advice is not None:
        findings.append(advice.finding)
    text = _manifest_text(prep, base_yaml, finetune_dir, name, suggested, advice)
    parse_manifest(text, file="<doctor output>", root=cwd)  # the printed manifest must be one build accepts
    blocking = tuple(p for p in prep.plan.problems if "not declared" not in p)
    return Diagnosis(tuple(findings), text, blocking)


def _pin_base(base: str, findings: list[str]) -> dict[str, str]:
    from hubsync.resolve import download_base

    local = Path(base)
    if local.is_dir():
        return {"path": str(local.resolve())}
    repo, rev = _base_spec(base)
    if rev is None:
        findings.append(f"no revision given for {repo}: pinned to the current head of main")
    sha, _ = download_base(repo, rev or "main", weights=False)
    return {"repo": repo, "revision": sha}


def _prepare(finetune_dir: Path, base_yaml: dict[str, str], name: str, cwd: Path) -> Prepared:
    from hubsync.build import prepare_manifest

    draft = {
        "base": base_yaml,
        "finetune": {"path": str(finetune_dir.resolve())},
        "output": {"dir": str(cwd / "build" / name)},
    }
    manifest = parse_manifest(yaml.safe_dump(draft, sort_keys=False), file="<doctor>", root=cwd)
    return prepare_manifest(manifest, cwd / "manifest.yaml", weights="headers")


def _file_findings(prep: Prepared) -> list[str]:
    from hubsync.finetune import is_leftover

    plan = prep.plan
    found = [
        f"{kind} file {path} is missing from the fine-tune (the build restores it from the base)"
        for path, kind in plan.restored
        if kind in KEPT_KINDS
    ]
    found += [n for n in plan.notes if "auto_map" in n or "cast to" in n or "normalised" in n or "stray" in n]
    found += [
        f"config.json {d.key} was {d.base!r} in the base and is {d.finetune!r} here ({d.decision})"
        for d in plan.config_diff
    ]
    leftovers = [p for p in plan.dropped if is_leftover(p)]
    if leftovers:
        found.append(f"trainer leftovers that must not be published: {', '.join(leftovers)}")
    extra = [p for p in plan.dropped if not is_leftover(p)]
    if extra:
        found.append(
            f"files the base does not have, left out (finetune.keep_files keeps them): {', '.join(extra)}"
        )
    return found


def _tensor_findings(prep: Prepared) -> list[str]:
    base_dtypes = {n: i.dtype for n, i in prep.base.checkpoint.tensors.items()}
    casts: dict[tuple[str, str], int] = {}
    for d in prep.diffs.values():
        if d.finetune_dtype != base_dtypes[d.name]:
            key = (d.finetune_dtype, base_dtypes[d.name])
            casts[key] = casts.get(key, 0) + 1
    found = [
        f"{count} tensor(s) saved as {src} while the base is {dst} (the build casts them back)"
        for (src, dst), count in sorted(casts.items())
    ]
    found += [f"tensor {u.name} does not map onto the base: {u.reason}" for u in prep.finetune.unmapped]
    nonfinite = [d.name for d in prep.diffs.values() if d.nonfinite]
    if nonfinite:
        found.append(f"NaN or Inf in {len(nonfinite)} tensor(s), e.g. {nonfinite[0]}: the training diverged")
    return found


def _change_findings(prep: Prepared, suggested: list[str]) -> list[str]:
    sampled = any(d.sampled for d in prep.diffs.values())
    if suggested:
        found = [f"changed parts (declare them as finetune.tuned): {', '.join(suggested)}"]
        found += _unmoved_findings(prep.diffs, suggested, prep.base.checkpoint.tensors)
    else:
        found = [
            "no tensor differs from the base"
            + (" in a sample of its values" if sampled else "")
            + ": wrong checkpoint, or the change vanished in the cast"
        ]
    if sampled:
        found.append(
            "compared on a sample of each tensor's values (the base's weights were not downloaded): "
            "`hubsync build` compares every byte"
        )
    return found


def _unmoved_findings(diffs: Mapping[str, Any], proposed: list[str], names: Iterable[str]) -> list[str]:
    """The tensors inside the proposed modules that did not move (a bf16 LayerNorm weight at a small learning
    rate): said, so that a module proposed whole does not hide them."""
    moved = [n for n, d in diffs.items() if d.state in ("changed", "vanished")]
    found = []
    for prefix, still in unmoved_under(proposed, moved, names).items():
        shown = ", ".join(still[:4]) + (f" and {len(still) - 4} more" if len(still) > 4 else "")
        found.append(
            f"{len(still)} tensor(s) under {prefix} did not move (the build keeps the base's): {shown}"
        )
    return found


# ----------------------------------------------------------------------------------------------------
# The runtime the model needs


def _major(version: str | None) -> str | None:
    return version.split(".", 1)[0] if version else None


def runtime_advice(prep: Prepared, *, trust_remote_code: bool = False) -> RuntimeAdvice | None:
    """Whether hubsync's own runtime can run the base: asked only when its config.json was written by another
    major version of transformers (the case where remote code written for 4.x fails on 5.x)."""
    from hubsync.verify.runtime import current_runtime, suggested_requirements

    written = prep.base.config.get("transformers_version")
    runtime = current_runtime()
    running = runtime.versions.get("transformers")
    if not isinstance(written, str) or _major(written) == _major(running):
        return None
    requirements = tuple(suggested_requirements(written, torchvision=_imports_torchvision(prep)))
    why_not = _why_not_load(prep, trust_remote_code)
    if why_not is not None:
        return RuntimeAdvice(
            f"the base's config.json was written by transformers {written} and hubsync would verify with "
            f"{running} ({why_not}): if `hubsync build` says the base does not load, uncomment the "
            "verify.requirements suggested in the manifest below, or set verify.python",
            requirements,
            certain=False,
        )
    error = _base_load_error(prep, runtime, trust_remote_code)
    if error is None:
        return RuntimeAdvice(
            f"the base's config.json was written by transformers {written}; it loads under {running} too", ()
        )
    return RuntimeAdvice(
        f"the base does not load under transformers {running} ({error}): its config.json was written by "
        f"transformers {written}: verify with verify.requirements (set in the manifest below) or "
        "verify.python",
        requirements,
    )


def _imports_torchvision(prep: Prepared) -> bool:
    """Whether the base's code imports torchvision (read as text, never run)."""
    for path in prep.base.files:
        full = prep.base.folder / path
        if (
            path.endswith(".py")
            and full.is_file()
            and TORCHVISION_IMPORT.search(full.read_text("utf-8", "replace"))
        ):
            return True
    return False


def _why_not_load(prep: Prepared, trust_remote_code: bool) -> str | None:
    """Why doctor cannot try loading the base here, or None when it can."""
    if prep.base.remote is not None:
        return "its weights are not downloaded, so doctor did not try to load it"
    if "auto_map" in prep.base.config and not trust_remote_code:
        return (
            "its remote code was not run: `hubsync doctor --trust-remote-code` tries to load it in a worker"
        )
    return None


def _base_load_error(prep: Prepared, runtime: Any, trust_remote_code: bool) -> str | None:
    """Load the base in the verification worker (its code runs there, never here); the error, or None."""
    import tempfile

    from hubsync.verify.runtime import run_worker

    request = {
        "folder": str(prep.base.folder),
        "trust_remote_code": trust_remote_code,
        "device": "cpu",
        "stop_after": "load",
    }
    with tempfile.TemporaryDirectory(prefix="hubsync-doctor-") as scratch:
        result = run_worker(runtime, request, timeout=3600, workdir=Path(scratch))
    for step in ("preflight", "load"):
        record = result.step(step)
        if record.get("ok") is False:
            return str(record.get("error") or step)
    return result.failure


def _manifest_text(
    prep: Prepared,
    base_yaml: dict[str, str],
    finetune_dir: Path,
    name: str,
    suggested: list[str],
    advice: RuntimeAdvice | None,
) -> str:
    remote_code = any(f.endswith(".py") for f in prep.base.files)
    verify: dict[str, Any] = {"device": "auto", "trust_remote_code": remote_code}
    if advice is not None and advice.requirements and advice.certain:
        verify["requirements"] = list(advice.requirements)
    out = {
        "base": base_yaml,
        "finetune": {"path": str(finetune_dir), "tuned": suggested or ["<prefix>."]},
        "output": {"dir": f"build/{name}"},
        "verify": verify,
    }
    keep = [
        d.key
        for d in prep.plan.config_diff
        if "keep_config" in d.decision and "training run" not in d.decision
    ]
    text = yaml.safe_dump(out, sort_keys=False)
    if keep:
        text += "# the trainer changed these config keys; keep them only if that was on purpose:\n"
        text += "# finetune.keep_config: [" + ", ".join(keep) + "]\n"
    if advice is not None and advice.requirements and not advice.certain:
        text += "# the base may need the runtime it was written for (doctor could not load it here):\n"
        text += "# verify.requirements: [" + ", ".join(advice.requirements) + "]\n"
    if advice is not None and advice.requirements:
        text += "# or verify in the environment the model was trained in:\n"
        text += "# verify.python: /path/to/env/bin/python\n"
    text += "# push: {repo: your-name/" + name + ", private: true}\n"
    return text


__all__ = ["Diagnosis", "HubsyncError", "RuntimeAdvice", "diagnose", "runtime_advice"]
