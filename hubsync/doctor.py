"""`hubsync doctor`: for someone holding a broken trainer output and no manifest.

It runs the same resolve -> read -> compare -> plan stages as a build, with nothing declared, then explains
what is missing or stale against the base in plain words (the failure catalogue) and prints a manifest that
`hubsync build` accepts. The base's weights are not downloaded (unless already cached): their headers and a
sample of each tensor's values are read over HTTP (hubsync.sample), enough to find the parts that changed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hubsync.errors import FinetuneError, HubsyncError
from hubsync.manifest import parse_manifest
from hubsync.tuned import unmoved_under


@dataclass(frozen=True)
class Diagnosis:
    findings: tuple[str, ...]
    manifest_text: str
    problems: tuple[str, ...]


def _base_spec(base: str) -> tuple[str, str | None]:
    repo, _, rev = base.partition("@")
    return repo, rev or None


def diagnose(finetune_dir: Path, base: str, *, cwd: Path | None = None) -> Diagnosis:
    """Compare a trainer output with its base; return findings and a ready manifest."""
    from hubsync.build import prepare_manifest
    from hubsync.resolve import download_base

    cwd = (cwd or Path.cwd()).resolve()
    findings: list[str] = []
    if not finetune_dir.is_dir():  # before anything is fetched
        raise FinetuneError(f"fine-tune folder {finetune_dir} does not exist: check the path")
    local = Path(base)
    if local.is_dir():
        base_yaml = {"path": str(local.resolve())}
    else:
        repo, rev = _base_spec(base)
        if rev is None:
            findings.append(f"no revision given for {repo}: pinned to the current head of main")
        sha, _ = download_base(repo, rev or "main", weights=False)
        base_yaml = {"repo": repo, "revision": sha}
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", finetune_dir.resolve().name).strip("-") or "model"
    draft = {
        "base": base_yaml,
        "finetune": {"path": str(finetune_dir.resolve())},
        "output": {"dir": str(cwd / "build" / name)},
    }
    manifest = parse_manifest(yaml.safe_dump(draft, sort_keys=False), file="<doctor>", root=cwd)
    prep = prepare_manifest(manifest, cwd / "manifest.yaml", weights="headers")
    plan = prep.plan
    ft = prep.finetune

    for path, kind in plan.restored:
        if kind in ("processor", "remote code", "tokenizer", "chat template", "license", "generation config"):
            findings.append(
                f"{kind} file {path} is missing from the fine-tune (the build restores it from the base)"
            )
    findings.extend(
        n for n in plan.notes if "auto_map" in n or "cast to" in n or "normalised" in n or "stray" in n
    )
    for diff in plan.config_diff:
        findings.append(
            f"config.json {diff.key} was {diff.base!r} in the base and is {diff.finetune!r} here ({diff.decision})"
        )
    from hubsync.finetune import is_leftover

    leftovers = [p for p in plan.dropped if is_leftover(p)]
    if leftovers:
        findings.append(f"trainer leftovers that must not be published: {', '.join(leftovers)}")
    extra = [p for p in plan.dropped if not is_leftover(p)]
    if extra:
        findings.append(
            f"files the base does not have, left out (finetune.keep_files keeps them): {', '.join(extra)}"
        )
    base_dtypes = {n: i.dtype for n, i in prep.base.checkpoint.tensors.items()}
    casts: dict[tuple[str, str], int] = {}
    for d in prep.diffs.values():
        if d.finetune_dtype != base_dtypes[d.name]:
            key = (d.finetune_dtype, base_dtypes[d.name])
            casts[key] = casts.get(key, 0) + 1
    for (src, dst), count in sorted(casts.items()):
        findings.append(
            f"{count} tensor(s) saved as {src} while the base is {dst} (the build casts them back)"
        )
    for u in ft.unmapped:
        findings.append(f"tensor {u.name} does not map onto the base: {u.reason}")
    nonfinite = [d.name for d in prep.diffs.values() if d.nonfinite]
    if nonfinite:
        findings.append(
            f"NaN or Inf in {len(nonfinite)} tensor(s), e.g. {nonfinite[0]}: the training diverged"
        )
    suggested = list(plan.suggested_tuned)
    sampled = any(d.sampled for d in prep.diffs.values())
    if suggested:
        findings.append(f"changed parts (declare them as finetune.tuned): {', '.join(suggested)}")
        findings.extend(_unmoved_findings(prep.diffs, suggested, prep.base.checkpoint.tensors))
    else:
        findings.append(
            "no tensor differs from the base"
            + (" in a sample of its values" if sampled else "")
            + ": wrong checkpoint, or the change vanished in the cast"
        )
    if sampled:
        findings.append(
            "compared on a sample of each tensor's values (the base's weights were not downloaded): "
            "`hubsync build` compares every byte"
        )

    remote_code = any(f.endswith(".py") for f in prep.base.files)
    out = {
        "base": base_yaml,
        "finetune": {"path": str(finetune_dir), "tuned": suggested or ["<prefix>."]},
        "output": {"dir": f"build/{name}"},
        "verify": {"device": "auto", "trust_remote_code": remote_code},
    }
    keep = [
        d.key for d in plan.config_diff if "keep_config" in d.decision and "training run" not in d.decision
    ]
    text = yaml.safe_dump(out, sort_keys=False)
    if keep:
        text += "# the trainer changed these config keys; keep them only if that was on purpose:\n"
        text += "# finetune.keep_config: [" + ", ".join(keep) + "]\n"
    text += "# push: {repo: your-name/" + name + ", private: true}\n"
    parse_manifest(text, file="<doctor output>", root=cwd)  # the printed manifest must be one build accepts
    blocking = tuple(p for p in plan.problems if "not declared" not in p)
    return Diagnosis(tuple(findings), text, blocking)


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


__all__ = ["Diagnosis", "HubsyncError", "diagnose"]
