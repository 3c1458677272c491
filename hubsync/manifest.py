"""The manifest: a frozen, typed description of one build, read from YAML.

Every mistake is reported with its place in the file (`file:line`), the key path and what to do, and all
mistakes are collected at once so that `hubsync validate` can list them together. Unknown keys are refused
with a suggestion, because a misspelt key that is silently ignored is the worst kind of config bug.
Paths in the manifest are relative to the manifest file.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hubsync.errors import ManifestError, ManifestProblem
from hubsync.tuned import regex_error
from hubsync.yaml_limits import YamlLimitError, check_file_size, compose_bounded

SHA_RE = re.compile(r"^[0-9a-f]{40}$")
DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
OutputDtype = Literal["base", "bfloat16", "float16", "float32"]
# (section, key) of every local path in a manifest: resolved against the manifest's folder when read.
LOCAL_PATH_FIELDS = (
    ("base", "path"),
    ("finetune", "path"),
    ("output", "dir"),
    ("verify", "image"),
    ("verify", "python"),
)


def _check_repo_id(value: str) -> str:
    # Imported lazily: huggingface_hub reads HF_ENDPOINT at import, and `hubsync --help` must stay fast.
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if value.count("/") != 1:
        raise ValueError(f"'{value}' is not a repo id: write it as 'owner/name'")
    try:
        validate_repo_id(value)
    except HFValidationError as err:
        raise ValueError(f"'{value}' is not a valid repo id ({str(err).splitlines()[0]})") from None
    return value


def _check_repo_relative(value: str) -> str:
    """A path inside a repo: no absolute paths, no `..`, no `.git/` (what the Hub itself refuses)."""
    if not value or value.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", value):
        raise ValueError(f"'{value}' must be a path relative to the repo root, not an absolute path")
    parts = PurePosixPath(value.replace("\\", "/")).parts
    if ".." in parts:
        raise ValueError(f"'{value}' climbs out of the repo with '..': name a file inside the repo")
    if parts and parts[0] == ".git":
        raise ValueError(f"'{value}' points into .git/, which is never part of a published repo")
    return value


def _local_path(value: Any, info: ValidationInfo) -> Path:
    """Resolve a local path against the manifest's folder (given in the validation context)."""
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise ValueError("must be a non-empty path")
    path = Path(str(value)).expanduser()
    root = (info.context or {}).get("root")
    if not path.is_absolute() and root is not None:
        path = Path(root) / path
    return path.resolve() if root is not None else path


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseSpec(_Section):
    """Where the base model comes from: a Hub repo at a pinned revision, or a local snapshot folder."""

    repo: str | None = Field(
        None, description="Hub repo id `owner/name`; the shorthand `owner/name@revision` is accepted."
    )
    revision: str | None = Field(
        None,
        description="Branch, tag or 40-hex commit sha. Required with `repo`: a moving `main` is never implied.",
    )
    path: Path | None = Field(None, description="A local base snapshot folder instead of `repo`.")

    @model_validator(mode="before")
    @classmethod
    def _split_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("repo"), str) and "@" in data["repo"]:
            repo, _, rev = data["repo"].partition("@")
            if data.get("revision") not in (None, rev):
                raise ValueError(
                    f"repo says '@{rev}' but revision says '{data['revision']}': keep one of them"
                )
            data = {**data, "repo": repo, "revision": rev}
        return data

    @field_validator("repo")
    @classmethod
    def _repo(cls, value: str | None) -> str | None:
        return None if value is None else _check_repo_id(value)

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty: give a branch, a tag or a 40-hex commit sha")
        return value

    @field_validator("path", mode="before")
    @classmethod
    def _path(cls, value: Any, info: ValidationInfo) -> Path | None:
        return None if value is None else _local_path(value, info)

    @model_validator(mode="after")
    def _one_source(self) -> BaseSpec:
        if self.repo is None and self.path is None:
            raise ValueError("needs `repo` (a Hub repo id with `revision`) or `path` (a local base snapshot)")
        if self.repo is not None and self.path is not None:
            raise ValueError("has both `repo` and `path`: keep one")
        if self.repo is not None and self.revision is None:
            raise ValueError(
                "`revision` is missing: pin the base to a commit sha, tag or branch "
                f"(e.g. `repo: {self.repo}@<sha>`); hubsync never implies a moving `main`"
            )
        return self

    @property
    def is_pinned_sha(self) -> bool:
        return self.revision is not None and SHA_RE.match(self.revision) is not None


class RenameRule(_Section):
    """A regular-expression rename applied to fine-tune tensor names after the built-in normalisation."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    pattern: str = Field(..., alias="from", description="Python regular expression matched against the name.")
    replacement: str = Field(..., alias="to", description="Replacement (`\\1` refers to groups).")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"'{value}' is not a valid regular expression ({err})") from None
        return value


class FinetuneSpec(_Section):
    """The trainer's output folder and what in it was meant to change."""

    path: Path = Field(..., description="The trainer's output folder (relative to the manifest).")
    tuned: tuple[str, ...] | None = Field(
        None,
        description="Tensor-name prefixes (base naming) allowed to differ from the base, e.g. ['vpm.', 'resampler.']; "
        "a prefix ends at a dot or is a whole tensor name; `re:<pattern>` is a regex matched at the name's start.",
    )
    rename: tuple[RenameRule, ...] = Field(
        (), description="Extra tensor renames: a list of {from: regex, to: replacement}."
    )
    format: Literal["auto", "full", "peft"] = Field(
        "auto", description="auto-detect, a full state dict, or a PEFT adapter."
    )
    checkpoint: str | None = Field(
        None, description="Which `checkpoint-N` sub-folder to take; default: the newest."
    )
    keep_files: tuple[str, ...] = Field(
        (),
        description="Repo-relative files to take from the fine-tune instead of the base (changed on purpose).",
    )
    keep_config: tuple[str, ...] = Field(
        (),
        description="Dotted config.json keys whose fine-tune value is kept, e.g. 'slice_config.max_slice_nums'.",
    )

    @field_validator("path", mode="before")
    @classmethod
    def _path(cls, value: Any, info: ValidationInfo) -> Path:
        return _local_path(value, info)

    @field_validator("tuned")
    @classmethod
    def _prefixes(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError(
                "is empty: list the tensor-name prefixes that were trained, or leave `tuned` out"
            )
        for prefix in value:
            if not prefix.strip():
                raise ValueError("contains an empty prefix, which would match every tensor: remove it")
            problem = regex_error(prefix)
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_validator("keep_files")
    @classmethod
    def _repo_paths(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_repo_relative(v) for v in value)


class OutputSpec(_Section):
    """Where and how the built repo is written."""

    dir: Path = Field(
        ..., description="Output folder (relative to the manifest); replaced atomically by each build."
    )
    dtype: OutputDtype = Field(
        "base", description="dtype of the tuned tensors: the base's (default) or a named one."
    )
    link: Literal["copy", "hardlink"] = Field(
        "copy",
        description="How untouched base shards reach the output: a byte copy, or a hard link to the cache.",
    )

    @field_validator("dir", mode="before")
    @classmethod
    def _dir(cls, value: Any, info: ValidationInfo) -> Path:
        return _local_path(value, info)


class VerifySpec(_Section):
    """How the build is proven to load and run."""

    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (auto = CUDA when available).")
    trust_remote_code: bool = Field(False, description="Allow the pinned base revision's own code to run.")
    prompt: str | None = Field(None, description="Smoke-test prompt for the generation check.")
    image: Path | None = Field(None, description="Smoke-test image; default: a generated one.")
    python: Path | None = Field(
        None,
        description="The interpreter of the environment the model runs in (typically the training env's "
        "bin/python, with its CUDA torch); relative to the manifest. Models are loaded only there.",
    )
    requirements: tuple[str, ...] | None = Field(
        None,
        description="pip requirements of a verification environment hubsync creates once and caches, e.g. "
        "[transformers==4.40.0, torch==2.6.0, torchvision]. Neither this nor `python`: hubsync's own interpreter.",
    )
    timeout: int = Field(
        3600, ge=60, description="Seconds one model may take to load and run before it is stopped."
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE_RE.match(value):
            raise ValueError(f"'{value}' is not a device: use auto, cpu, cuda or cuda:N")
        return value

    @field_validator("image", "python", mode="before")
    @classmethod
    def _local(cls, value: Any, info: ValidationInfo) -> Path | None:
        return None if value is None else _local_path(value, info)

    @field_validator("requirements")
    @classmethod
    def _requirements(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError(
                "is empty: list pip requirements (e.g. [transformers==4.40.0, torch==2.6.0]) or leave it out"
            )
        for item in value:
            if not item.strip():
                raise ValueError("contains an empty requirement: remove it")
            if item.strip().startswith("-"):
                raise ValueError(
                    f"'{item}' is a pip option, not a requirement: set pip options through PIP_* environment "
                    "variables (e.g. PIP_INDEX_URL)"
                )
        return tuple(item.strip() for item in value)

    @model_validator(mode="after")
    def _one_runtime(self) -> VerifySpec:
        if self.python is not None and self.requirements is not None:
            raise ValueError(
                "has both `python` and `requirements`: keep one (an existing env, or one hubsync makes)"
            )
        return self


class PushSpec(_Section):
    """Where the build is published."""

    repo: str = Field(..., description="Target Hub repo id `owner/name`.")
    private: bool = Field(
        True, description="Create the repo private (an existing repo keeps its visibility)."
    )
    revision: str = Field("main", description="Branch to commit to (created from `branch_from` if missing).")
    branch_from: str = Field(
        "main",
        description="Where `revision` starts when the push creates that branch: a branch, tag or commit of the "
        "target repo. The push is compared with it, deletions included.",
    )
    create_pr: bool = Field(False, description="Open a pull request instead of committing to the branch.")
    tag: str | None = Field(
        None, description="Tag to put on the pushed commit; a tag already on another commit stops the push."
    )
    tag_move: bool = Field(
        False, description="Move `tag` to the pushed commit when it is already on another commit."
    )

    @field_validator("repo")
    @classmethod
    def _repo(cls, value: str) -> str:
        return _check_repo_id(value)


class CardSpec(_Section):
    """What the model card says beyond what is inherited from the base."""

    license: str = Field(
        "inherit", description="`inherit` takes the base card's license, else an SPDX-like id."
    )
    tags: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    language: tuple[str, ...] = ()
    description: str | None = None


class Manifest(_Section):
    """One build: a pinned base, a fine-tune folder, and what to do with the result."""

    base: BaseSpec
    finetune: FinetuneSpec
    output: OutputSpec
    verify: VerifySpec = VerifySpec()
    push: PushSpec | None = None
    card: CardSpec = CardSpec()

    def to_record(self) -> dict[str, Any]:
        """The manifest as resolved, JSON-ready, with absolute local paths (for this machine only)."""
        return json.loads(self.model_dump_json(by_alias=True, exclude_none=True))

    def to_data(self, root: Path) -> dict[str, Any]:
        """The manifest as data for what is published (hubsync.json, the card): local paths relative to `root`,
        the manifest's folder, so that nothing names this machine's folders; no comments, no formatting."""
        data = self.to_record()
        for section, key in LOCAL_PATH_FIELDS:
            value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
            if isinstance(value, str):
                data[section][key] = Path(os.path.relpath(value, root)).as_posix()
        return data


# --- loading, with YAML locations -------------------------------------------------------------------------


class _LineMap:
    """Maps a key path such as ('finetune', 'pth') to the line of that key in the YAML file."""

    def __init__(self) -> None:
        self.lines: dict[tuple[str | int, ...], int] = {}
        self.duplicates: list[tuple[tuple[str | int, ...], int]] = []

    def walk(self, node: yaml.Node, path: tuple[str | int, ...], visited: set[int] | None = None) -> None:
        self.lines.setdefault(path, node.start_mark.line + 1)
        visited = set() if visited is None else visited
        if id(node) in visited:  # an alias: its keys keep the anchor's lines; never expand it again
            return
        visited.add(id(node))
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                key = str(key_node.value)
                if key in seen:
                    self.duplicates.append((path + (key,), key_node.start_mark.line + 1))
                seen.add(key)
                self.lines[path + (key,)] = key_node.start_mark.line + 1
                self.walk(value_node, path + (key,), visited)
                self.lines[path + (key,)] = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.walk(item, path + (i,), visited)

    def line_for(self, path: tuple[str | int, ...]) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), None)


def _model_for(path: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The schema class that owns the mapping at `path`, to suggest the right key for a typo."""
    model: type[BaseModel] | None = Manifest
    for part in path:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        model = next((a for a in candidates if issubclass(a, BaseModel)), None)
    return model


def _keys_of(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _problem_from_pydantic(err: dict[str, Any], file: str, lines: _LineMap) -> ManifestProblem:
    loc: tuple[str | int, ...] = tuple(p for p in err["loc"] if p != "__root__")
    # Pydantic puts union-member names into the location (e.g. 'PushSpec'); they are not YAML keys.
    loc = tuple(p for p in loc if not (isinstance(p, str) and p[:1].isupper()))
    key = ".".join(str(p) for p in loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, bad = loc[:-1], str(loc[-1])
        owner = _model_for(parent)
        allowed = _keys_of(owner) if owner else []
        close = difflib.get_close_matches(bad, allowed, n=1, cutoff=0.5)
        hint = f"did you mean `{close[0]}`?" if close else f"allowed keys: {', '.join(allowed)}"
        return ManifestProblem(file, lines.line_for(loc), key, f"unknown key '{bad}': {hint}")
    if kind == "missing":
        return ManifestProblem(file, lines.line_for(loc), key, "is required but missing: add it")
    message = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    got = err.get("input")
    if kind.startswith("literal_error"):
        message = f"{message.replace('Input should be', 'must be')}, got {got!r}"
    elif kind in ("bool_type", "bool_parsing"):
        message = f"must be true or false, got {got!r}"
    elif kind in ("tuple_type", "list_type"):
        message = f"must be a list (e.g. [a, b]), got {type(got).__name__} {got!r}"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        message = f"must be a mapping of keys, got {type(got).__name__} {got!r}"
    elif kind == "string_type":
        message = f"must be a string, got {type(got).__name__} {got!r}"
    return ManifestProblem(file, lines.line_for(loc), key, message)


def _drop_missing_explained_by_typo(problems: list[ManifestProblem]) -> list[ManifestProblem]:
    """`pth: x` yields both "unknown key pth" and "path is missing"; the first says it all."""
    suggested = set()
    for p in problems:
        match = re.search(r"did you mean `([^`]+)`", p.message)
        if match:
            parent = p.key.rpartition(".")[0]
            suggested.add(f"{parent}.{match.group(1)}" if parent else match.group(1))
    return [p for p in problems if not (p.message.startswith("is required") and p.key in suggested)]


def parse_manifest(text: str, *, file: str = "<manifest>", root: Path | None = None) -> Manifest:
    """Parse and validate manifest text; raise ManifestError listing every problem with its location."""
    try:
        node = compose_bounded(text)  # first: everything below walks the document, aliases expanded
        data = yaml.safe_load(text)
    except YamlLimitError as err:
        raise ManifestError([ManifestProblem(file, err.line, "", err.message)], file) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ManifestError(
            [ManifestProblem(file, line, "", f"is not valid YAML: {problem}")], file
        ) from None
    lines = _LineMap()
    if node is not None:
        lines.walk(node, ())
    if not isinstance(data, dict):
        raise ManifestError(
            [
                ManifestProblem(
                    file, 1, "", "must be a YAML mapping with base:, finetune: and output: sections"
                )
            ],
            file,
        )
    problems = [
        ManifestProblem(file, line, ".".join(map(str, path)), "appears twice: keep one")
        for path, line in lines.duplicates
    ]
    try:
        manifest = Manifest.model_validate(data, context={"root": root})
    except ValidationError as err:
        problems += _drop_missing_explained_by_typo(
            [_problem_from_pydantic(e, file, lines) for e in err.errors()]
        )
        problems.sort(key=lambda p: (p.line or 0, p.key))
        raise ManifestError(problems, file) from None
    if problems:
        raise ManifestError(problems, file)
    return manifest


def load_manifest(path: str | Path) -> Manifest:
    """Read a manifest file; relative paths inside it are taken from the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(
            [ManifestProblem(str(path), None, "", "no such manifest file: check the path")], str(path)
        )
    try:
        check_file_size(path.stat().st_size)
        text = path.read_text(encoding="utf-8")
    except YamlLimitError as err:
        raise ManifestError([ManifestProblem(str(path), None, "", err.message)], str(path)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError(
            [ManifestProblem(str(path), None, "", f"cannot be read ({err})")], str(path)
        ) from None
    return parse_manifest(text, file=str(path), root=path.resolve().parent)


def line_of(path: Path, key: tuple[str | int, ...]) -> int | None:
    """The line of `key` in a manifest file that parsed, for problems found after validation."""
    lines = _LineMap()
    node = compose_bounded(path.read_text(encoding="utf-8"))
    if node is not None:
        lines.walk(node, ())
    return lines.line_for(key)


def json_schema() -> dict[str, Any]:
    """The manifest's JSON Schema, generated from the code (docs/manifest.schema.json is this, checked for drift)."""
    schema = Manifest.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "hubsync manifest"
    return schema


def render_json_schema() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":  # pragma: no cover - `python -m hubsync.manifest > docs/manifest.schema.json`
    print(render_json_schema(), end="")
