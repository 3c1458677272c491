"""Manifest stage: every kind of mistake gets its location and a message that says what to do."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from hubsync.errors import ManifestError
from hubsync.manifest import json_schema, load_manifest, parse_manifest, render_json_schema

SHA = "320a581d2195ad4a52140bb427a07f7207aeac6e"
GOOD = f"""\
base:
  repo: openbmb/MiniCPM-Llama3-V-2_5
  revision: {SHA}
finetune:
  path: output/minicpmv-vision
  tuned: ["vpm.", "resampler."]
output:
  dir: build/minicpmv-vision
  dtype: base
verify:
  device: auto
  trust_remote_code: true
  prompt: "Describe the image."
push:
  repo: my-org/minicpmv-vision-ft
  private: true
  revision: main
  create_pr: false
  tag: v1
card:
  license: inherit
  tags: [vision]
  datasets: []
  language: [en]
  description: "A vision-tuned MiniCPM-V."
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "manifest.yaml"
    path.write_text(text)
    return path


def problems_of(text: str) -> list[str]:
    with pytest.raises(ManifestError) as info:
        parse_manifest(text, file="m.yaml")
    return [p.render() for p in info.value.problems]


def test_good_manifest_loads_with_paths_relative_to_the_manifest(tmp_path: Path) -> None:
    manifest = load_manifest(write(tmp_path, GOOD))
    assert manifest.base.repo == "openbmb/MiniCPM-Llama3-V-2_5"
    assert manifest.base.revision == SHA and manifest.base.is_pinned_sha
    assert manifest.finetune.path == (tmp_path / "output/minicpmv-vision").resolve()
    assert manifest.output.dir == (tmp_path / "build/minicpmv-vision").resolve()
    assert manifest.finetune.tuned == ("vpm.", "resampler.")
    assert manifest.push is not None and manifest.push.tag == "v1"
    assert manifest.card.language == ("en",)


def test_manifest_is_frozen(tmp_path: Path) -> None:
    manifest = load_manifest(write(tmp_path, GOOD))
    with pytest.raises(Exception):
        manifest.base.revision = "main"  # type: ignore[misc]


def test_shorthand_repo_at_revision() -> None:
    manifest = parse_manifest("base: {repo: org/name@v1.0}\nfinetune: {path: f}\noutput: {dir: o}\n")
    assert (manifest.base.repo, manifest.base.revision) == ("org/name", "v1.0")
    assert not manifest.base.is_pinned_sha


def test_defaults() -> None:
    manifest = parse_manifest("base: {path: b}\nfinetune: {path: f}\noutput: {dir: o}\n")
    assert manifest.output.dtype == "base" and manifest.output.link == "copy"
    assert manifest.verify.device == "auto" and manifest.verify.trust_remote_code is False
    assert manifest.finetune.tuned is None and manifest.push is None
    assert manifest.card.license == "inherit"


def test_rename_rules_use_from_and_to() -> None:
    manifest = parse_manifest(
        "base: {path: b}\nfinetune:\n  path: f\n  rename:\n    - {from: '^visual\\.', to: 'vpm.'}\noutput: {dir: o}\n"
    )
    assert manifest.finetune.rename[0].pattern == "^visual\\."
    assert manifest.to_record()["finetune"]["rename"] == [{"from": "^visual\\.", "to": "vpm."}]


def test_misspelt_key_names_file_line_key_and_suggestion() -> None:
    text = "base: {repo: a/b@main}\nfinetune: {pth: x}\noutput: {dir: o}\n"
    assert problems_of(text) == ["m.yaml:2: finetune.pth: unknown key 'pth': did you mean `path`?"]


# Ten (and more) other kinds of bad manifest, each with its message.
BAD = {
    "missing revision": (
        "base: {repo: a/b}\nfinetune: {path: f}\noutput: {dir: o}\n",
        "m.yaml:1: base: `revision` is missing: pin the base to a commit sha, tag or branch",
    ),
    "bad repo id": (
        "base: {repo: 'not a repo', revision: main}\nfinetune: {path: f}\noutput: {dir: o}\n",
        "m.yaml:1: base.repo: 'not a repo' is not a repo id: write it as 'owner/name'",
    ),
    "bad repo characters": (
        "base: {repo: 'org/na--me..', revision: main}\nfinetune: {path: f}\noutput: {dir: o}\n",
        "m.yaml:1: base.repo: 'org/na--me..' is not a valid repo id",
    ),
    "repo and path": (
        "base: {repo: a/b@main, path: x}\nfinetune: {path: f}\noutput: {dir: o}\n",
        "m.yaml:1: base: has both `repo` and path: keep one".replace("path:", "`path`:"),
    ),
    "no base source": (
        "base: {revision: main}\nfinetune: {path: f}\noutput: {dir: o}\n",
        "m.yaml:1: base: needs `repo`",
    ),
    "conflicting shorthand": (
        "base: {repo: a/b@v1, revision: v2}\nfinetune: {path: f}\noutput: {dir: o}\n",
        "m.yaml:1: base: repo says '@v1' but revision says 'v2': keep one of them",
    ),
    "missing section": (
        "base: {path: b}\nfinetune: {path: f}\n",
        "m.yaml:1: output: is required but missing: add it",
    ),
    "bad dtype": (
        "base: {path: b}\nfinetune: {path: f}\noutput:\n  dir: o\n  dtype: bf16\n",
        "m.yaml:5: output.dtype: must be 'base', 'bfloat16', 'float16' or 'float32', got 'bf16'",
    ),
    "bad device": (
        "base: {path: b}\nfinetune: {path: f}\noutput: {dir: o}\nverify: {device: gpu}\n",
        "m.yaml:4: verify.device: 'gpu' is not a device: use auto, cpu, cuda or cuda:N",
    ),
    "bad bool": (
        "base: {path: b}\nfinetune: {path: f}\noutput: {dir: o}\nverify: {trust_remote_code: maybe}\n",
        "m.yaml:4: verify.trust_remote_code: must be true or false, got 'maybe'",
    ),
    "traversal": (
        "base: {path: b}\nfinetune: {path: f, keep_files: [../secret]}\noutput: {dir: o}\n",
        "m.yaml:2: finetune.keep_files: '../secret' climbs out of the repo with '..'",
    ),
    "absolute repo path": (
        "base: {path: b}\nfinetune: {path: f, keep_files: [/etc/passwd]}\noutput: {dir: o}\n",
        "m.yaml:2: finetune.keep_files: '/etc/passwd' must be a path relative to the repo root",
    ),
    "into .git": (
        "base: {path: b}\nfinetune: {path: f, keep_files: [.git/config]}\noutput: {dir: o}\n",
        "m.yaml:2: finetune.keep_files: '.git/config' points into .git/",
    ),
    "tuned is a string": (
        "base: {path: b}\nfinetune: {path: f, tuned: vpm.}\noutput: {dir: o}\n",
        "m.yaml:2: finetune.tuned: must be a list (e.g. [a, b]), got str 'vpm.'",
    ),
    "empty tuned prefix": (
        "base: {path: b}\nfinetune: {path: f, tuned: ['']}\noutput: {dir: o}\n",
        "m.yaml:2: finetune.tuned: contains an empty prefix",
    ),
    "bad regex": (
        "base: {path: b}\nfinetune:\n  path: f\n  rename: [{from: '(', to: x}]\noutput: {dir: o}\n",
        "m.yaml:4: finetune.rename.0.from: '(' is not a valid regular expression",
    ),
    "push repo id": (
        "base: {path: b}\nfinetune: {path: f}\noutput: {dir: o}\npush: {repo: justaname}\n",
        "m.yaml:4: push.repo: 'justaname' is not a repo id",
    ),
    "duplicate key": (
        "base: {path: b}\nfinetune: {path: f}\noutput: {dir: o}\nbase: {path: c}\n",
        "m.yaml:4: base: appears twice: keep one",
    ),
    "unknown section": (
        "base: {path: b}\nfinetune: {path: f}\noutput: {dir: o}\npsuh: {repo: a/b}\n",
        "m.yaml:4: psuh: unknown key 'psuh': did you mean `push`?",
    ),
    "two runtimes": (
        "base: {path: b}\nfinetune: {path: f}\noutput: {dir: o}\nverify: {python: v/bin/python, requirements: [x]}\n",
        "m.yaml:4: verify: has both `python` and `requirements`: keep one",
    ),
    "pip option as a requirement": (
        "base: {path: b}\nfinetune: {path: f}\noutput: {dir: o}\nverify: {requirements: ['--index-url=x']}\n",
        "m.yaml:4: verify.requirements: '--index-url=x' is a pip option, not a requirement: set pip options",
    ),
    "empty requirements": (
        "base: {path: b}\nfinetune: {path: f}\noutput: {dir: o}\nverify: {requirements: []}\n",
        "m.yaml:4: verify.requirements: is empty: list pip requirements",
    ),
    "not yaml": ("base: [unclosed\n", "m.yaml:2: is not valid YAML"),
    "not a mapping": (
        "- a\n- b\n",
        "m.yaml:1: must be a YAML mapping with base:, finetune: and output: sections",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_manifest_messages(case: str) -> None:
    text, expected = BAD[case]
    found = problems_of(text)
    assert any(p.startswith(expected) for p in found), found


def test_all_problems_reported_at_once() -> None:
    text = (
        "base: {repo: a/b}\nfinetune: {pth: f}\noutput:\n  dir: o\n  dtype: fp8\n"
        "verify: {device: tpu}\npush: {repo: x, privat: true}\n"
    )
    found = problems_of(text)
    assert len(found) == 6, found
    assert [p.split(":")[1] for p in found] == sorted((p.split(":")[1] for p in found), key=int)


def test_missing_file_is_a_manifest_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no such manifest file"):
        load_manifest(tmp_path / "nope.yaml")


def test_json_schema_in_docs_matches_the_code() -> None:
    docs = Path(__file__).resolve().parents[1] / "docs" / "manifest.schema.json"
    assert docs.read_text() == render_json_schema(), (
        "docs/manifest.schema.json is stale: run `python -m hubsync.manifest > docs/manifest.schema.json`"
    )


def test_json_schema_accepts_the_example_and_rejects_typos() -> None:
    import yaml

    schema = json_schema()
    jsonschema.validate(yaml.safe_load(GOOD), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"base": {"path": "b"}, "finetune": {"pth": "x"}, "output": {"dir": "o"}}, schema)


def test_record_is_json(tmp_path: Path) -> None:
    record = load_manifest(write(tmp_path, GOOD)).to_record()
    assert json.loads(json.dumps(record))["base"]["revision"] == SHA
