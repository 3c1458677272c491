"""action.yml, run for real: an emulated Actions runner executes its steps against the local Hub.

The runner (tests/action_runner.py) does what actions/runner does for a composite action; the one `uses:`
step, actions/setup-python, is stood in for by a fresh virtual environment on PATH: made from this
interpreter with `--system-site-packages` plus a `.pth` line for this environment's site-packages, so
torch and transformers are importable without reinstalling them, while hubsync itself is really installed
by the action's install step from a copy of the checkout (`hubsync-version: local`). pip runs with no
index: the setuptools that builds hubsync's wheel is this interpreter's own (or, lacking one, comes from a wheelhouse filled once
per session. Also here: the action metadata against a schema, the action's security rules, each branch of
the credentials step, the OIDC contract we rely on in huggingface_hub, and hubsync/ci.py's pure parts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jsonschema
import pytest
import yaml

from hubsync import __version__, ci
from hubsync.record import load as load_record
from hubsync.testing.hub import DEFAULT_TOKEN, LocalHub
from hubsync.testing.models import PublishedModel
from tests.action_runner import ActionRun, ActionRunner, evaluate, expand, parse_command, read_file_command
from tests.cli import run_cli
from tests.fixtures_models import HUB_NAMESPACE

# one xdist worker runs this whole module, so its module- and session-scoped fixtures are made once
pytestmark = [pytest.mark.xdist_group("test_action")]

ROOT = Path(__file__).resolve().parents[1]
ACTION = ROOT / "action.yml"
UPLOAD_ROUTES = {
    "create-repo",
    "preupload",
    "lfs-batch",
    "lfs-upload",
    "lfs-verify",
    "lfs-duplicate",
    "commit",
    "branch",
    "tag",
}
PY_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


# ------------------------------------------------------------------------------------------- metadata schema

# A faithful subset of the action metadata schema (SchemaStore's github-action.json, which follows GitHub's
# "Metadata syntax for GitHub Actions"): the keys GitHub accepts at each level, what is required, and types.
_STEP_COMMON = {
    "name": {"type": "string"},
    "id": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_-]*$"},
    "if": {"type": ["string", "boolean"]},
    "env": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}},
    "continue-on-error": {"type": ["string", "boolean"]},
}
ACTION_SCHEMA: dict[str, Any] = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["name", "description", "runs"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "author": {"type": "string"},
        "description": {"type": "string", "minLength": 1},
        "inputs": {
            "type": "object",
            "additionalProperties": False,
            "patternProperties": {
                "^[_a-zA-Z][a-zA-Z0-9_-]*$": {
                    "type": "object",
                    "required": ["description"],
                    "additionalProperties": False,
                    "properties": {
                        "description": {"type": "string"},
                        "deprecationMessage": {"type": "string"},
                        "required": {"type": "boolean"},
                        "default": {"type": "string"},
                    },
                }
            },
        },
        "outputs": {
            "type": "object",
            "additionalProperties": False,
            "patternProperties": {
                "^[_a-zA-Z][a-zA-Z0-9_-]*$": {
                    "type": "object",
                    "required": ["description", "value"],  # composite outputs map a step's output
                    "additionalProperties": False,
                    "properties": {"description": {"type": "string"}, "value": {"type": "string"}},
                }
            },
        },
        "runs": {
            "type": "object",
            "required": ["using", "steps"],
            "additionalProperties": False,
            "properties": {
                "using": {"const": "composite"},
                "steps": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "oneOf": [
                            {
                                "type": "object",
                                "required": ["run", "shell"],
                                "additionalProperties": False,
                                "properties": {
                                    **_STEP_COMMON,
                                    "run": {"type": "string"},
                                    "shell": {"type": "string"},
                                    "working-directory": {"type": "string"},
                                },
                            },
                            {
                                "type": "object",
                                "required": ["uses"],
                                "additionalProperties": False,
                                "properties": {
                                    **_STEP_COMMON,
                                    "uses": {"type": "string"},
                                    "with": {
                                        "type": "object",
                                        "additionalProperties": {"type": ["string", "number", "boolean"]},
                                    },
                                },
                            },
                        ]
                    },
                },
            },
        },
        "branding": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "icon": {"type": "string"},
                "color": {
                    "enum": [
                        "white",
                        "black",
                        "yellow",
                        "blue",
                        "green",
                        "orange",
                        "red",
                        "purple",
                        "gray-dark",
                    ]
                },
            },
        },
    },
}


@pytest.fixture(scope="module")
def metadata() -> dict[str, Any]:
    return yaml.safe_load(ACTION.read_text(encoding="utf-8"))


def test_action_metadata_matches_the_schema(metadata: dict[str, Any]) -> None:
    jsonschema.validate(metadata, ACTION_SCHEMA)
    assert metadata["inputs"]["manifest"]["required"] is True
    assert set(metadata["inputs"]) >= {
        "manifest",
        "push",
        "hf-token",
        "python-version",
        "hubsync-version",
        "device",
        "verify-python",
        "verify-requirements",
        "extra-args",
    }
    assert set(metadata["outputs"]) >= {
        "commit-url",
        "commit-sha",
        "repo-url",
        "revision",
        "verified",
        "bytes-uploaded",
    }


def test_the_schema_rejects_what_github_rejects(metadata: dict[str, Any]) -> None:
    for broken in (
        {k: v for k, v in metadata.items() if k != "description"},
        {**metadata, "runs": {"using": "composite", "steps": [{"run": "echo hi"}]}},  # run without shell
        {**metadata, "inputs": {"x": {"description": "x", "required": "yes"}}},
        {**metadata, "outputs": {"x": {"description": "no value"}}},
        {**metadata, "brandng": {}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, ACTION_SCHEMA)


def test_action_keeps_its_security_rules(metadata: dict[str, Any]) -> None:
    steps = metadata["runs"]["steps"]
    for step in steps:
        if "run" in step:
            # inputs and step outputs reach scripts through env: only (no script injection)
            assert "${{" not in step["run"], step["name"]
    uses_lines = [line for line in ACTION.read_text().splitlines() if re.match(r"\s*(- )?uses:", line)]
    assert uses_lines
    for line in uses_lines:
        # pinned by a full commit sha, with the release it is in as a comment
        assert re.search(r"uses: [\w.-]+/[\w.-]+@[0-9a-f]{40}\s+# v\d+\.\d+\.\d+$", line), line
    # the token is an env value of the steps that need it, never an argument
    text = ACTION.read_text()
    assert "inputs.hf-token" in text
    for step in steps:
        for value in (step.get("env") or {}).values():
            if "hf-token" in str(value):
                assert step.get("shell") == "bash"
    # the default install is this very release
    assert metadata["inputs"]["hubsync-version"]["default"] == __version__


def test_workflow_files_pin_their_actions() -> None:
    for workflow in (ROOT / ".github" / "workflows").glob("*.yml"):
        data = yaml.safe_load(workflow.read_text())
        assert data["jobs"], workflow
        for line in workflow.read_text().splitlines():
            if re.match(r"\s*(- )?uses:", line):
                assert re.search(r"@[0-9a-f]{40}\s+# v\d", line), f"{workflow.name}: {line.strip()}"


# ------------------------------------------------------------------------------------------- the runner itself


def test_runner_expressions_follow_github_semantics() -> None:
    contexts = {"inputs": {"push": "True", "empty": ""}, "steps": {"a": {"outputs": {"x": "1"}}}, "env": {}}
    functions = {"success": lambda: True}
    assert evaluate("inputs.push == 'true'", contexts, functions) is True  # case-insensitive
    assert evaluate("inputs.empty || 'false'", contexts, functions) == "false"
    assert evaluate("steps.a.outputs.x || 'no'", contexts, functions) == "1"
    assert evaluate("steps.b.outputs.x", contexts, functions) is None
    assert evaluate("success() && (inputs.empty != '')", contexts, functions) is False
    assert expand("a-${{ env.NOPE }}-b", contexts, functions) == "a--b"
    command = parse_command("::error file=a%2Cb.yaml,line=3,title=x%3A y::50%25%0Adone", "s")
    assert command is not None and command.properties == {"file": "a,b.yaml", "line": "3", "title": "x: y"}
    assert command.message == "50%\ndone"


# ------------------------------------------------------------------------------------------- hubsync/ci.py


def test_ci_escapes_workflow_commands() -> None:
    assert ci.escape_data("50% done\r\nnext") == "50%25 done%0D%0Anext"
    assert ci.escape_property("a:b,c%") == "a%3Ab%2Cc%25"
    line = ci.command("error", "bad: value\nsecond", file="dir,x/m.yaml", line=4, title="t: x", col=None)
    assert line == "::error file=dir%2Cx/m.yaml,line=4,title=t%3A x::bad: value%0Asecond"
    parsed = parse_command(line, "s")
    assert (
        parsed is not None
        and parsed.properties["file"] == "dir,x/m.yaml"
        and parsed.message == "bad: value\nsecond"
    )


def test_ci_outputs_use_a_heredoc_for_multiline_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_OUTPUT", str(out))
    ci.set_outputs({"one": "x=y", "flag": True, "none": None, "many": "a\nb\n==\nc"})
    text = out.read_text()
    assert re.search(r"^many<<ghadelimiter_[0-9a-f-]{36}$", text, re.MULTILINE)
    assert read_file_command(out) == {"one": "x=y", "flag": "true", "none": "", "many": "a\nb\n==\nc"}


def test_ci_is_silent_outside_actions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    monkeypatch.setenv("GITHUB_OUTPUT", str(tmp_path / "out"))
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "summary"))
    ci.annotate("x", file="m.yaml", line=1)
    with ci.group("g"):
        pass
    ci.set_outputs({"a": 1})
    ci.append_summary("# hi")
    assert capsys.readouterr() == ("", "")
    assert not (tmp_path / "out").exists() and not (tmp_path / "summary").exists()


def test_ci_annotations_name_workspace_relative_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.setenv("GITHUB_WORKSPACE", str(tmp_path))
    ci.annotate("bad key", file=str(tmp_path / "manifests" / "m.yaml"), line=7)
    with ci.group("phase"):
        print("inside")
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "::error file=manifests/m.yaml,line=7::bad key",
        "::group::phase",
        "::endgroup::",
    ]
    assert captured.out == "inside\n"


def test_cli_in_actions_annotates_on_stderr_and_keeps_json_on_stdout(tmp_path: Path) -> None:
    manifest = tmp_path / "m.yaml"
    manifest.write_text("base: {repo: a/b@main}\nfinetune: {pth: x}\noutput: {dir: o}\n")
    outputs = tmp_path / "outputs"
    env = {
        **os.environ,
        "GITHUB_ACTIONS": "true",
        "GITHUB_WORKSPACE": str(tmp_path),
        "GITHUB_OUTPUT": str(outputs),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary"),
    }
    env.pop("HUBSYNC_DEBUG", None)
    bad = run_cli("validate", "--json", str(manifest), env=env, timeout=120)
    assert bad.returncode == 2 and json.loads(bad.stdout)["ok"] is False
    assert (
        "::error file=m.yaml,line=2::finetune.pth: unknown key 'pth': did you mean `path`?"
        in bad.stderr.splitlines()
    )
    manifest.write_text(
        "base: {repo: a/b@main}\nfinetune: {path: x}\noutput: {dir: o}\npush: {repo: my-org/m}\n"
    )
    good = run_cli("validate", "--json", str(manifest), env=env, timeout=120)
    assert good.returncode == 0 and json.loads(good.stdout)["ok"] is True
    assert read_file_command(outputs)["repo"] == "my-org/m"


@dataclass
class _FakePush:
    repo_id: str = "my-org/model"
    revision: str = "main"
    commit_url: str | None = "https://hub/my-org/model/commit/abc123"
    commit_sha: str | None = "abc123" + "0" * 34
    pr_url: str | None = None
    repo_url: str | None = "https://hub/my-org/model"
    up_to_date: bool = False
    bytes_uploaded: int = 2_500
    bytes_copied: int = 7_500
    bytes_in_build: int = 10_000
    uploaded: list[str] = field(default_factory=lambda: ["README.md"])
    copied: list[str] = field(default_factory=lambda: ["model.safetensors"])
    deleted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    tag: str | None = "v1"
    created_repo: bool = False
    notes: list[str] = field(default_factory=lambda: ["the Hub would not copy 1 shard(s) | uploaded instead"])


def test_ci_push_summary_links_and_bytes() -> None:
    text = ci.push_markdown(_FakePush())  # type: ignore[arg-type]
    assert "[abc123000000](https://hub/my-org/model/commit/abc123)" in text
    assert "[my-org/model](https://hub/my-org/model)" in text
    assert "Uploaded 2.5 kB of the 10.0 kB in the build (25%)" in text
    assert "| copied server-side from the base | 1 | 7.5 kB |" in text and "tag: `v1`" in text
    assert "- note: the Hub would not copy 1 shard(s) \\| uploaded instead" in text
    assert "already up to date" in ci.push_markdown(_FakePush(up_to_date=True, commit_url=None))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- the credentials step


@pytest.fixture
def auth_runner(tmp_path: Path) -> Callable[..., ActionRun]:
    def run(
        inputs: Mapping[str, str],
        env: Mapping[str, str] | None = None,
        job_env: Mapping[str, str] | None = None,
        repo: str = "my-org/model",
    ) -> ActionRun:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_TOKEN", "HF_OIDC"))}
        runner = ActionRunner(ROOT, tmp_path, env={**base, **(env or {})}, job_env=job_env)
        return runner.run(
            {"manifest": "m.yaml", **inputs}, only=("auth",), steps_context={"validate": {"repo": repo}}
        )

    return run


def test_auth_masks_the_token_input(auth_runner: Callable[..., ActionRun]) -> None:
    run = auth_runner({"hf-token": "hf_secret_value"})
    step = run.step("auth")
    assert step.outcome == "success", step.log
    assert run.masks == ["hf_secret_value"]
    assert step.outputs["oidc-resource"] == "" and "the hf-token input" in step.log
    assert "hf_secret_value" not in step.script  # env only: the script text never holds it


def test_auth_uses_the_jobs_hf_token(auth_runner: Callable[..., ActionRun]) -> None:
    run = auth_runner({}, job_env={"HF_TOKEN": "hf_from_job"})
    assert run.step("auth").outcome == "success" and run.masks == ["hf_from_job"]
    assert run.step("auth").outputs["oidc-resource"] == ""


def test_auth_falls_back_to_trusted_publishing(auth_runner: Callable[..., ActionRun]) -> None:
    oidc_env = {
        "ACTIONS_ID_TOKEN_REQUEST_URL": "http://127.0.0.1:9/token",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "t",
    }
    run = auth_runner({}, job_env=oidc_env)
    step = run.step("auth")
    assert step.outcome == "success", step.log
    assert (
        step.outputs["oidc-resource"] == "my-org/model"
        and "trusted publishing (OIDC) for my-org/model" in step.log
    )
    # an explicit HF_OIDC_RESOURCE (e.g. a user scope) wins over the manifest's repo
    run = auth_runner({}, job_env={**oidc_env, "HF_OIDC_RESOURCE": "my-org/other"})
    assert run.step("auth").outputs["oidc-resource"] == "my-org/other"


def test_auth_without_credentials_fails_before_the_build(auth_runner: Callable[..., ActionRun]) -> None:
    run = auth_runner({})
    assert run.step("auth").outcome == "failure"
    assert any("no Hub credentials" in c.message for c in run.annotations())
    run = auth_runner({}, job_env={"HF_OIDC_RESOURCE": "my-org/model"})  # no id-token permission
    assert run.step("auth").outcome == "failure"
    assert any("id-token: write" in c.message for c in run.annotations())
    # building without pushing needs no credentials
    assert auth_runner({"push": "false"}).step("auth").outcome == "success"


def test_auth_refuses_to_push_a_manifest_without_a_push_section(
    auth_runner: Callable[..., ActionRun],
) -> None:
    run = auth_runner({"hf-token": "hf_x"}, repo="")
    assert run.step("auth").outcome == "failure"
    assert any("no push section" in c.message for c in run.annotations())
    assert auth_runner({"hf-token": "hf_x", "push": "false"}, repo="").step("auth").outcome == "success"


def test_huggingface_hub_exchanges_the_github_oidc_token(tmp_path: Path) -> None:
    """The contract the credentials step relies on: with HF_OIDC_RESOURCE set, huggingface_hub requests the
    job's id token for the audience of the Hub endpoint and exchanges it at {endpoint}/oauth/token."""
    seen: dict[str, Any] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            seen["audience"] = parse_qs(url.query).get("audience", [""])[0]
            seen["authorization"] = self.headers.get("Authorization")
            self._reply({"value": "github-id-token"})

        def do_POST(self) -> None:
            seen["exchange_path"] = self.path
            seen["exchange"] = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self._reply({"access_token": "hf_exchanged_token", "token_type": "bearer", "expires_in": 3600})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GITHUB_", "ACTIONS_"))}
        env.update(
            {
                "HF_ENDPOINT": endpoint,
                "HF_HOME": str(tmp_path),
                "HF_TOKEN": "",
                "GITHUB_ACTIONS": "true",
                "ACTIONS_ID_TOKEN_REQUEST_URL": f"{endpoint}/id-token",
                "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "request-token",
                "HF_OIDC_RESOURCE": "my-org/model",
            }
        )
        result = subprocess.run(
            [sys.executable, "-c", "from huggingface_hub import get_token; print(get_token())"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert result.stdout.strip() == "hf_exchanged_token", result.stderr
    assert seen["audience"] == endpoint and seen["authorization"] == "Bearer request-token"
    assert seen["exchange_path"] == "/oauth/token"
    assert (
        seen["exchange"]["resource"] == "my-org/model"
        and seen["exchange"]["subject_token"] == "github-id-token"
    )


# ------------------------------------------------------------------------------------------- end to end


def _local_setuptools() -> bool:
    """Whether this interpreter's own setuptools can build hubsync (PEP 639 license needs 77 or newer)."""
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """setuptools for pip's isolated build of hubsync, fetched once, so that each install needs no index."""
    folder = tmp_path_factory.mktemp("wheelhouse")
    given = os.environ.get("HUBSYNC_TEST_WHEELHOUSE")
    if given:
        return Path(given)
    if _local_setuptools():
        return folder  # the build uses this interpreter's setuptools (no build isolation): nothing to fetch
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--disable-pip-version-check",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(folder),
            "setuptools>=77",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(
            "cannot fetch setuptools>=77 to build hubsync's wheel; set HUBSYNC_TEST_WHEELHOUSE to a folder "
            f"holding one ({result.stderr.strip().splitlines()[-1:]})"
        )
    return folder


@pytest.fixture(scope="session")
def action_checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The action as the runner downloads it (_actions/owner/repo/ref): the repository's files."""
    dest = tmp_path_factory.mktemp("actions") / "hubsync" / f"v{__version__}"
    shutil.copytree(
        ROOT,
        dest,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "__pycache__",
            "*.egg-info",
            ".mypy_cache",
            ".pytest_cache",
            ".ruff_cache",
            "build",
            "dist",
            ".hubsync",
            "hubsync-demo",
            "benchmarks",
        ),
    )
    if not (dest / "README.md").exists():  # pyproject names it as the long description
        (dest / "README.md").write_text("# hubsync\n")
    return dest


@dataclass
class Workflow:
    """A job that calls the action: its workspace, the Hub, and the Python the setup-python stand-in provides."""

    workspace: Path
    runner: ActionRunner
    tool_python: Path
    hub: LocalHub

    def manifest(self, name: str, lines: list[str]) -> str:
        path = self.workspace / "manifests" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return f"manifests/{name}.yaml"

    def run(self, manifest: str, **inputs: str) -> ActionRun:
        given = {
            "manifest": manifest,
            "hf-token": DEFAULT_TOKEN,
            "hubsync-version": "local",
            "device": "cpu",
            "python-version": PY_VERSION,
            **inputs,
        }
        return self.runner.run(given)


@pytest.fixture
def workflow(
    hub: LocalHub, hub_env: dict[str, str], tmp_path: Path, wheelhouse: Path, action_checkout: Path
) -> Iterator[Workflow]:
    tool = tmp_path / "toolcache-python"

    def setup_python(uses: str, with_: dict[str, str]) -> Mapping[str, Any]:
        assert uses.startswith("actions/setup-python@")
        assert with_["python-version"] == PY_VERSION
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(tool)], check=True
        )
        purelib = Path(sysconfig.get_path("purelib", vars={"base": str(tool), "platbase": str(tool)}))
        here = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
        (purelib / "outer-environment.pth").write_text("".join(f"{p}\n" for p in sorted(here)))
        return {"path": [tool / "bin"]}

    env = {k: v for k, v in hub_env.items() if k not in ("HF_TOKEN", "HUBSYNC_DEBUG", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(sys.prefix)
    )
    env.update({"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse), "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if _local_setuptools():
        env["PIP_NO_BUILD_ISOLATION"] = "0"  # pip reads this inverted: "0" turns build isolation off
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    runner = ActionRunner(action_checkout, workspace, env=env, uses=setup_python, timeout=240)
    yield Workflow(workspace, runner, tool, hub)


def _manifest(
    base: PublishedModel, finetune: Path, repo: str, *, trust: bool = True, typo: bool = False
) -> list[str]:
    return [
        "base:",
        f"  repo: {base.repo_id}",
        f"  revision: {base.sha}",
        "finetune:",
        f"  path: {finetune}",
        "  tuned: [vpm., resampler.]",
        "output:",
        f"  dir: ../build/{repo.split('/')[1]}",
        "verify:",
        f"  trust_remote_code: {str(trust).lower()}",
        "push:",
        f"  repo: {repo}",
        "  privat: true" if typo else "  private: true",  # line 13
    ]


def _no_upload(hub: LocalHub, repo: str) -> None:
    hits = [r for r in hub.requests(repo_id=repo) if r.route in UPLOAD_ROUTES]
    assert not hits, hits
    assert not hub.repo_exists(repo)


def test_good_manifest_publishes_and_sets_every_output(
    workflow: Workflow, published_remote_base: PublishedModel, remote_trainer_output: Path, repo_name: str
) -> None:
    repo = f"{HUB_NAMESPACE}/{repo_name}"
    run = workflow.run(
        workflow.manifest("good", _manifest(published_remote_base, remote_trainer_output, repo))
    )
    assert run.ok, run.log

    head = workflow.hub.branch_head(repo)
    assert head is not None
    out = run.outputs
    assert out["commit-sha"] == head
    assert out["commit-url"].endswith(f"/commit/{head}") and repo in out["commit-url"]
    assert out["repo-url"] == f"{workflow.hub.endpoint}/{repo}"
    assert out["revision"] == "main" and out["verified"] == "true" and out["pr-url"] == ""
    # the session Hub serves LFS-only files, so the base's shards are uploaded too, not copied server-side
    assert 0 < int(out["bytes-uploaded"]) <= int(run.step("push").outputs["bytes-in-build"])
    assert out["output-dir"].endswith(f"build/{repo_name}")

    # hubsync ran from the wheel the action installed out of its checkout
    assert run.step("install").outputs["python"] == str(workflow.tool_python / "bin" / "python3")
    assert f"hubsync, version {__version__}" in run.step("install").log
    installed = list(workflow.tool_python.glob("lib/python*/site-packages/hubsync/cli.py"))
    assert installed, "hubsync was not installed into the job's Python"

    # long phases are folded; nothing failed, so nothing is annotated
    groups = [c.message for c in run.commands if c.name == "group"]
    assert {"hubsync build: resolve, plan, write, verify", "hubsync push"} <= set(groups)
    assert sum(c.name == "endgroup" for c in run.commands) == len(groups)
    assert run.annotations() == []

    # the token was masked and never shown
    assert run.masks == [DEFAULT_TOKEN] and DEFAULT_TOKEN not in run.log

    summary = run.summary
    assert "| check | result | detail |" in summary and "| files match hubsync.json | ✅ pass |" in summary
    assert "**Verification ✅ passed**" in summary
    assert "| tuned prefix | changed |" in summary and "`vpm.`" in summary and "`resampler.`" in summary
    assert f"[{head[:12]}]({out['commit-url']})" in summary
    assert f"[{repo}]({out['repo-url']})" in summary and "Uploaded " in summary and "in the build" in summary


def test_verify_python_runs_the_model_in_the_named_interpreter(
    workflow: Workflow, published_remote_base: PublishedModel, remote_trainer_output: Path, repo_name: str
) -> None:
    repo = f"{HUB_NAMESPACE}/{repo_name}"
    manifest = workflow.manifest("runtime", _manifest(published_remote_base, remote_trainer_output, repo))
    run = workflow.run(manifest, push="false", **{"verify-python": sys.executable})
    assert run.ok, run.log
    record = load_record(Path(run.outputs["output-dir"]))
    assert record.verification is not None and record.verification.passed
    assert dict(record.verification.runtime) == {"kind": "python", "requirements": []}
    _no_upload(workflow.hub, repo)


def test_broken_manifest_fails_with_an_annotation_at_the_line(
    workflow: Workflow, published_remote_base: PublishedModel, remote_trainer_output: Path, repo_name: str
) -> None:
    repo = f"{HUB_NAMESPACE}/{repo_name}"
    manifest = workflow.manifest(
        "broken", _manifest(published_remote_base, remote_trainer_output, repo, typo=True)
    )
    run = workflow.run(manifest)

    assert run.failed_step is not None and run.failed_step.id == "validate"
    assert [s.outcome for s in run.steps if s.id in ("auth", "build", "push")] == ["skipped"] * 3
    [annotation] = run.annotations()
    assert annotation.properties == {"file": manifest, "line": "13"}
    assert annotation.message == "push.privat: unknown key 'privat': did you mean `private`?"
    assert f"::error file={manifest},line=13::push.privat: unknown key" in run.step("validate").log
    assert run.outputs["verified"] == "false" and run.outputs["commit-sha"] == ""
    assert "hubsync failed" in run.summary and "did you mean `private`?" in run.summary
    _no_upload(workflow.hub, repo)


def test_failed_verification_fails_before_anything_is_uploaded(
    workflow: Workflow, published_remote_base: PublishedModel, remote_trainer_output: Path, repo_name: str
) -> None:
    repo = f"{HUB_NAMESPACE}/{repo_name}"
    # the remote-code base cannot load without trust_remote_code: the build is written, verification fails
    run = workflow.run(
        workflow.manifest(
            "unverified", _manifest(published_remote_base, remote_trainer_output, repo, trust=False)
        )
    )

    assert run.failed_step is not None and run.failed_step.id == "build", run.log
    assert run.step("push").outcome == "skipped"
    assert run.outputs["verified"] == "false" and run.outputs["bytes-uploaded"] == "0"
    titles = [c.properties.get("title", "") for c in run.annotations()]
    assert "hubsync: verification failed: model loads" in titles
    assert "hubsync: verification failed" in titles  # the error that ends the step
    assert "**Verification ❌ failed" in run.summary and "| model loads | ❌ FAIL |" in run.summary
    _no_upload(workflow.hub, repo)


# ------------------------------------------------------------------------------------- which torch, in which Python


def _fake_torch_wheel(folder: Path, version: str) -> Path:
    """A wheel named torch whose only content says which build it stands for (CPU or CUDA)."""
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"torch-{version}-py3-none-any.whl"
    info = f"torch-{version}.dist-info"
    files = {
        "torch/__init__.py": f"__version__ = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hubsync-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return wheel


def _package_index(root: Path, version: str) -> str:
    """A PEP 503 index (file://) that serves one torch wheel: a stand-in for PyPI or PyTorch's CPU index."""
    wheel = _fake_torch_wheel(root / "torch", version)
    (root / "torch" / "index.html").write_text(f'<a href="{wheel.name}">{wheel.name}</a>\n')
    return root.as_uri()


@dataclass
class Runner:
    """A runner machine for the environment step: its `python3`, maybe a GPU, and two package indexes."""

    tmp_path: Path
    python: Path
    gpu: bool = False

    def run(self, **inputs: str) -> tuple[ActionRun, str]:
        """Run the environment step alone; return it and the torch version its Python imports."""
        machine = self.tmp_path / "machine-bin"
        machine.mkdir(exist_ok=True)
        (machine / "python3").unlink(missing_ok=True)
        (machine / "python3").symlink_to(self.python)
        if self.gpu:  # what nvidia-smi -L prints on a GPU runner
            smi = machine / "nvidia-smi"
            smi.write_text(
                "#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)'\n"
            )
            smi.chmod(0o755)
        pypi = _package_index(self.tmp_path / "pypi", "2.13.0")  # on Linux, PyPI's torch is the CUDA build
        cpu = _package_index(self.tmp_path / "cpu-index", "2.13.0+cpu")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "PYTHON"))}
        env.update(
            {
                "PATH": os.pathsep.join([str(machine), "/usr/bin", "/bin"]),
                "PIP_INDEX_URL": pypi,
                "PIP_CONFIG_FILE": os.devnull,  # this machine's pip settings (mirrors, find-links) stay out
            }
        )
        runner = ActionRunner(ROOT, self.tmp_path, env=env, timeout=240)
        given = {"manifest": "m.yaml", "python-version": "", "torch-cpu-index": cpu, **inputs}
        run = runner.run(given, only=("venv",))
        step = run.step("venv")
        assert step.outcome == "success", step.log
        imported = subprocess.run(
            [step.outputs["python"], "-c", "import torch; print(torch.__version__)"],
            capture_output=True,
            text=True,
            check=True,
        )
        return run, imported.stdout.strip()


def _plain_python() -> Path:
    """This interpreter's base installation: a Python that is not a virtual environment."""
    return Path(getattr(sys, "_base_executable", sys.executable))


def test_a_hosted_runner_gets_the_cpu_build_of_torch_in_a_new_venv(tmp_path: Path) -> None:
    run, torch_version = Runner(tmp_path, _plain_python()).run()
    step = run.step("venv")
    assert torch_version == "2.13.0+cpu" and step.outputs["torch"] == "2.13.0+cpu"
    venv = Path(step.outputs["python"]).parents[1]
    assert venv.name == "hubsync-venv" and (venv / "pyvenv.cfg").is_file()
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    assert "pip install torch (CPU build, from file://" in step.log


@pytest.mark.parametrize(
    ("device", "expected"), [("auto", "2.13.0"), ("cuda", "2.13.0"), ("cpu", "2.13.0+cpu")]
)
def test_a_gpu_runner_gets_the_cuda_build_unless_told_cpu(tmp_path: Path, device: str, expected: str) -> None:
    _, torch_version = Runner(tmp_path, _plain_python(), gpu=True).run(device=device)
    assert torch_version == expected


def test_a_device_cuda_runner_without_a_gpu_still_gets_the_cuda_build(tmp_path: Path) -> None:
    # the install step then fails at once ("torch sees no CUDA device"), before anything is built
    _, torch_version = Runner(tmp_path, _plain_python()).run(device="cuda")
    assert torch_version == "2.13.0"


def _externally_managed_python() -> Path | None:
    """A system Python that refuses pip installs outside a venv (PEP 668), if this machine has one."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if not Path(candidate).exists():
            continue
        probe = subprocess.run(
            [
                candidate,
                "-c",
                "import os, sys, sysconfig; ok = sys.version_info >= (3, 10) and sys.prefix == sys.base_prefix"
                " and os.path.exists(os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED'));"
                " sys.exit(not ok)",
            ],
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return Path(candidate)
    return None


def test_an_externally_managed_system_python_works_through_a_venv(tmp_path: Path) -> None:
    system = _externally_managed_python()
    if system is None:
        pytest.skip("no externally managed (PEP 668) system Python 3.10+ on this machine")
    refused = subprocess.run(
        [str(system), "-m", "pip", "install", "--no-index", "--dry-run", "torch"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PIP_BREAK_SYSTEM_PACKAGES": "0"},
    )
    assert refused.returncode != 0 and "externally-managed-environment" in refused.stderr
    run, torch_version = Runner(tmp_path, system).run()
    assert torch_version == "2.13.0+cpu"
    assert f"from {tmp_path / 'machine-bin' / 'python3'}" in run.step("venv").log
