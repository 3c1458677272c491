"""The model card: a pure function from the build's facts to README.md text, via a template in the package.

No network and no file reads besides the template: the base card's text comes in as an argument. Lineage
(`base_model`, `base_model_relation`), the license and its terms are inherited from the base card, because a
card that loses them misrepresents the model (failure catalogue #12).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from string import Template
from typing import Any

import yaml


@dataclass(frozen=True)
class CardInputs:
    """Everything the card says, gathered by the caller."""

    repo_id: str | None  # the repo the card will be published as (None: not known yet)
    base_repo: str | None
    base_sha: str | None
    base_card: str | None  # the base's README.md text
    manifest: Mapping[str, Any]  # the manifest as data, local paths relative to its folder
    license: str = "inherit"
    tags: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    language: tuple[str, ...] = ()
    description: str | None = None
    prefixes: tuple[dict[str, Any], ...] = ()  # PrefixSummary as dicts
    tuned_dtypes: tuple[str, ...] = ()
    has_processor: bool = False
    remote_code: bool = False
    verification: dict[str, Any] | None = None
    skip_verify_check: bool = False
    extra_tags: tuple[str, ...] = field(default=("hubsync",))
    hub_url: str = "https://huggingface.co"  # the Hub the base lives on (HF_ENDPOINT at build time): card links

    @classmethod
    def from_record(cls, data: Mapping[str, Any], **changes: Any) -> CardInputs:
        """The inputs as hubsync.json stores them (lists for tuples), with `changes` applied."""
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**{**fields, **changes})

    def to_record(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=list))


def split_front_matter(text: str | None) -> tuple[dict[str, Any], str]:
    """(metadata, body) of a card; a card without front matter has empty metadata."""
    if not text:
        return {}, ""
    match = re.match(r"^---\s*\n(.*?\n)---\s*\n?(.*)$", text, re.S)
    if not match:
        return {}, text
    try:
        data = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError:
        data = {}
    return (data if isinstance(data, dict) else {}), match.group(2)


def front_matter(inputs: CardInputs) -> dict[str, Any]:
    base_meta, _ = split_front_matter(inputs.base_card)
    meta: dict[str, Any] = {}
    if inputs.license == "inherit":
        for key in ("license", "license_name", "license_link"):
            if key in base_meta:
                meta[key] = base_meta[key]
    else:
        meta["license"] = inputs.license
    for key in ("pipeline_tag", "library_name"):
        if key in base_meta:
            meta[key] = base_meta[key]
    if inputs.base_repo:
        meta["base_model"] = inputs.base_repo
        meta["base_model_relation"] = "finetune"
    tags = list(dict.fromkeys([*inputs.tags, *inputs.extra_tags]))
    meta["tags"] = tags
    if inputs.datasets:
        meta["datasets"] = list(inputs.datasets)
    if inputs.language:
        meta["language"] = list(inputs.language)
    return meta


def _code_blocks(markdown: str) -> list[str]:
    return re.findall(r"```(?:python|py)\s*\n(.*?)```", markdown, re.S)


def loading_snippet(inputs: CardInputs) -> str:
    """The base card's own loading snippet with the new repo id, or one built from the Auto classes."""
    target = inputs.repo_id or "<your-repo-id>"
    _, body = split_front_matter(inputs.base_card)
    if inputs.base_repo:
        for block in _code_blocks(body):
            if inputs.base_repo in block and "from_pretrained" in block:
                return block.replace(inputs.base_repo, target).rstrip()
    trust = ", trust_remote_code=True" if inputs.remote_code else ""
    lines = [
        "from transformers import AutoModel"
        + (", AutoProcessor" if inputs.has_processor else ", AutoTokenizer"),
        "",
    ]
    lines.append(f'model = AutoModel.from_pretrained("{target}", dtype="auto"{trust})')
    if inputs.has_processor:
        lines.append(f'processor = AutoProcessor.from_pretrained("{target}"{trust})')
    else:
        lines.append(f'tokenizer = AutoTokenizer.from_pretrained("{target}"{trust})')
    return "\n".join(lines)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}"
    if isinstance(x, int) and x >= 1000:
        return f"{x:,}"
    return str(x)


def verification_section(inputs: CardInputs) -> str:
    record = inputs.verification
    lines: list[str] = []
    if inputs.skip_verify_check:
        lines.append(
            "**Published with `--skip-verify-check`: the verification below may not cover these files.**\n"
        )
    if not record:
        lines.append("Not verified: this folder was built with `--no-verify`.")
        return "\n".join(lines)
    status = "passed" if record.get("passed") else "FAILED"
    device = record.get("device", "?")
    versions = ", ".join(f"{k} {v}" for k, v in sorted((record.get("versions") or {}).items()))
    lines.append(f"Verification **{status}** on `{device}`" + (f" ({versions})." if versions else "."))
    lines += ["", "| check | result | details |", "|---|---|---|"]
    for check in record.get("checks", []):
        lines.append(_check_row(check))
    return "\n".join(lines)


def _check_row(check: Mapping[str, Any]) -> str:
    """One row of the verification table. A check that did not run (ok is None) says why, never FAIL."""
    detail = " ".join(str(check.get("detail", "")).split()).replace("|", "\\|")
    ok = check.get("ok")
    if ok is None:
        return f"| {check.get('name')} | skipped ({detail or 'not applicable'}) | |"
    return f"| {check.get('name')} | {'pass' if ok else 'FAIL'} | {detail} |"


def render_card(inputs: CardInputs) -> str:
    """README.md text for the built repo."""
    template = Template(resources.files("hubsync").joinpath("templates/card.md").read_text(encoding="utf-8"))
    meta = front_matter(inputs)
    title = (inputs.repo_id or "").split("/")[-1] or (
        f"{inputs.base_repo.split('/')[-1]} fine-tune" if inputs.base_repo else "Fine-tuned model"
    )
    description = inputs.description or (
        f"A fine-tune of {inputs.base_repo} ({', '.join(p['prefix'] for p in inputs.prefixes) or 'see below'} tuned)."
        if inputs.base_repo
        else "A fine-tuned model."
    )
    rows = [
        f"| `{p['prefix']}` | {p['changed']}/{p['tensors']} | {_fmt(p['params_changed'])} | {_fmt(p['max_abs'])} | {_fmt(p['rel'])} |"
        for p in inputs.prefixes
    ] or ["| (none) | | | | |"]
    license_section = ""
    if "license_link" in meta or meta.get("license") == "other":
        link = meta.get("license_link")
        license_section = (
            "\n## License\n\nThis model keeps the base model's license terms"
            + (f" ({meta.get('license_name')})" if meta.get("license_name") else "")
            + (f": see [{link}]({link})." if link else ".")
            + "\n"
        )
    if inputs.base_repo and inputs.base_sha:
        url = f"{inputs.hub_url.rstrip('/')}/{inputs.base_repo}"
        base_line = (
            f"[{inputs.base_repo}]({url}) at commit [`{inputs.base_sha[:12]}`]({url}/tree/{inputs.base_sha})"
        )
    else:
        base_line = "a local base folder (not on the Hub)"
    return template.substitute(
        front_matter=yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(),
        title=title,
        description=description.strip(),
        base_line=base_line,
        tuned_summary=", ".join(f"`{p['prefix']}`" for p in inputs.prefixes) or "the model",
        license_section=license_section,
        tuned_rows="\n".join(rows),
        dtype_summary=", ".join(inputs.tuned_dtypes) or "the base's dtype",
        verification=verification_section(inputs),
        snippet=loading_snippet(inputs),
        manifest_yaml=yaml.safe_dump(dict(inputs.manifest), sort_keys=False, allow_unicode=True).strip(),
    )
