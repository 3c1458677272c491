"""Run a composite action's steps the way the GitHub Actions runner does, on this machine.

Enough of actions/runner to test action.yml for real: inputs with their defaults (unknown or missing
required ones are errors here, a typo must not pass silently), the `${{ }}` expression language for the
contexts a composite action sees (`inputs`, `github`, `steps`, `env`, `runner`) with its operators and
status functions, `if:` (wrapped in `success() && (...)` unless it calls a status function, as the runner
does), step `env:`, a fresh `$GITHUB_OUTPUT` / `$GITHUB_STEP_SUMMARY` / `$GITHUB_ENV` / `$GITHUB_PATH` file
per step (read back after it, heredoc form included), each `run:` written to a script and run as
`bash --noprofile --norc -eo pipefail {0}` (what `shell: bash` means), workflow commands parsed from both
stdout and stderr (`::add-mask::` masks the log from then on), and the action's outputs evaluated at the end.
`uses:` steps are handed to a callable the test provides (e.g. one that stands in for actions/setup-python).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# ------------------------------------------------------------------------------------------- expressions

_TOKEN = re.compile(
    r"\s*(?:(?P<str>'(?:[^']|'')*')|(?P<num>-?\d+(?:\.\d+)?)|(?P<op>==|!=|<=|>=|&&|\|\||[!<>().,])"
    r"|(?P<ident>[A-Za-z_][A-Za-z0-9_-]*))"
)
STATUS_FUNCTIONS = ("success", "failure", "always", "cancelled")


class ExpressionError(ValueError):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ExpressionError(f"cannot parse expression at {text[pos:]!r}")
        kind = m.lastgroup or ""
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def _truthy(value: Any) -> bool:
    return value not in (None, False, "", 0)


def _coerce_number(value: Any) -> float:
    if value is None or value is False or value == "":
        return 0.0
    if value is True:
        return 1.0
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _equal(a: Any, b: Any) -> bool:
    # The runner compares strings case-insensitively and coerces other mixed types to numbers.
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    if type(a) is type(b):
        return bool(a == b)
    return _coerce_number(a) == _coerce_number(b)


def to_string(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class _Parser:
    """Recursive descent over: or -> and -> comparison -> unary -> primary (with `.name` / `(...)`)."""

    def __init__(self, text: str, contexts: Mapping[str, Any], functions: Mapping[str, Callable[..., Any]]):
        self.toks = _tokens(text)
        self.i = 0
        self.contexts = contexts
        self.functions = functions

    def parse(self) -> Any:
        value = self.or_()
        if self.i != len(self.toks):
            raise ExpressionError(f"unexpected {self.toks[self.i][1]!r}")
        return value

    def peek(self) -> str | None:
        return self.toks[self.i][1] if self.i < len(self.toks) else None

    def take(self) -> tuple[str, str]:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def or_(self) -> Any:
        left = self.and_()
        while self.peek() == "||":
            self.take()
            right = self.and_()
            left = left if _truthy(left) else right
        return left

    def and_(self) -> Any:
        left = self.cmp()
        while self.peek() == "&&":
            self.take()
            right = self.cmp()
            left = right if _truthy(left) else left
        return left

    def cmp(self) -> Any:
        left = self.unary()
        while self.peek() in ("==", "!=", "<", ">", "<=", ">="):
            op = self.take()[1]
            right = self.unary()
            if op in ("==", "!="):
                left = _equal(left, right) == (op == "==")
            else:
                a, b = _coerce_number(left), _coerce_number(right)
                left = {"<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b}[op]
        return left

    def unary(self) -> Any:
        if self.peek() == "!":
            self.take()
            return not _truthy(self.unary())
        return self.primary()

    def primary(self) -> Any:
        kind, text = self.take()
        if text == "(":
            inner = self.or_()
            self.expect(")")
            return inner
        if kind == "str":
            return text[1:-1].replace("''", "'")
        if kind == "num":
            return float(text)
        if kind != "ident":
            raise ExpressionError(f"unexpected {text!r}")
        if text in ("true", "false"):
            return text == "true"
        if text == "null":
            return None
        if self.peek() == "(":
            self.take()
            args = []
            while self.peek() != ")":
                args.append(self.or_())
                if self.peek() == ",":
                    self.take()
            self.expect(")")
            if text not in self.functions:
                raise ExpressionError(f"unknown function {text}()")
            return self.functions[text](*args)
        if text not in self.contexts:
            raise ExpressionError(f"unknown context {text!r}")
        value: Any = self.contexts[text]
        while self.peek() == ".":
            self.take()
            name = self.take()[1]
            value = value.get(name) if isinstance(value, Mapping) else None
        return value

    def expect(self, text: str) -> None:
        if self.peek() != text:
            raise ExpressionError(f"expected {text!r}")
        self.take()


_TEMPLATE = re.compile(r"\$\{\{(.*?)\}\}", re.DOTALL)


def evaluate(text: str, contexts: Mapping[str, Any], functions: Mapping[str, Callable[..., Any]]) -> Any:
    return _Parser(text, contexts, functions).parse()


def expand(text: str, contexts: Mapping[str, Any], functions: Mapping[str, Callable[..., Any]]) -> str:
    """Replace every `${{ expr }}` in a string with its value as a string."""
    return _TEMPLATE.sub(lambda m: to_string(evaluate(m.group(1), contexts, functions)), text)


# ------------------------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    """One workflow command (`::name key=value,...::message`), unescaped."""

    name: str
    properties: dict[str, str]
    message: str
    step: str

    def __str__(self) -> str:  # pragma: no cover - for assertion messages
        props = ",".join(f"{k}={v}" for k, v in self.properties.items())
        return f"::{self.name}{' ' + props if props else ''}::{self.message}  [{self.step}]"


_COMMAND = re.compile(r"^::([A-Za-z-]+)(?: ([^:]*))?::(.*)$")


def _unescape(text: str, prop: bool = False) -> str:
    text = text.replace("%0D", "\r").replace("%0A", "\n")
    if prop:
        text = text.replace("%3A", ":").replace("%2C", ",")
    return text.replace("%25", "%")


def parse_command(line: str, step: str) -> Command | None:
    m = _COMMAND.match(line.rstrip("\r"))
    if not m:
        return None
    props = {}
    for part in (m.group(2) or "").split(","):
        if "=" in part:
            key, _, value = part.partition("=")
            props[key.strip()] = _unescape(value, prop=True)
    return Command(m.group(1), props, _unescape(m.group(3)), step)


def read_file_command(path: Path) -> dict[str, str]:
    """`$GITHUB_OUTPUT` / `$GITHUB_ENV` syntax: `name=value` lines and `name<<DELIMITER` heredocs."""
    values: dict[str, str] = {}
    lines = path.read_text(encoding="utf-8").split("\n") if path.exists() else []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line:
            continue
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, _, delimiter = line.partition("<<")
            body: list[str] = []
            while i < len(lines) and lines[i] != delimiter:
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise ValueError(f"{path}: no closing delimiter {delimiter!r} for {name!r}")
            i += 1
            values[name] = "\n".join(body)
        else:
            name, sep, value = line.partition("=")
            if not sep:
                raise ValueError(f"{path}: invalid line {line!r}")
            values[name] = value
    return values


# ------------------------------------------------------------------------------------------- the runner


@dataclass
class StepResult:
    id: str
    name: str
    outcome: str  # success | failure | skipped
    exit_code: int | None = None
    log: str = ""  # stdout + stderr as the runner shows them (masked)
    outputs: dict[str, str] = field(default_factory=dict)
    summary: str = ""
    script: str = ""
    seconds: float = 0.0


@dataclass
class ActionRun:
    steps: list[StepResult]
    outputs: dict[str, str]
    summary: str
    commands: list[Command]
    masks: list[str]

    @property
    def ok(self) -> bool:
        return all(s.outcome != "failure" for s in self.steps)

    def step(self, step_id: str) -> StepResult:
        return next(s for s in self.steps if s.id == step_id)

    @property
    def failed_step(self) -> StepResult | None:
        return next((s for s in self.steps if s.outcome == "failure"), None)

    def annotations(self, level: str = "error") -> list[Command]:
        return [c for c in self.commands if c.name == level]

    @property
    def log(self) -> str:
        return "\n".join(
            f"--- {s.id or s.name} ({s.outcome}, {s.seconds:.1f} s)\n{s.log}" for s in self.steps
        )


UsesHandler = Callable[[str, dict[str, str]], Mapping[str, Any]]


class ActionRunner:
    """Runs the composite action in `action_dir` with `workspace` as the working directory.

    `env`: the process environment of the job (what the runner's own environment plus the workflow's `env:`
    give a step); `job_env`: the part of it the workflow set, which is what the `env` context shows.
    `uses`: called as `uses(action_ref, with_inputs)` for each `uses:` step; it may return `path` (folders to
    prepend to PATH, as `$GITHUB_PATH` does), `env` and `outputs`.
    """

    def __init__(
        self,
        action_dir: Path,
        workspace: Path,
        *,
        env: Mapping[str, str],
        job_env: Mapping[str, str] | None = None,
        uses: UsesHandler | None = None,
        timeout: float = 300,
    ) -> None:
        self.action_dir = Path(action_dir)
        self.workspace = Path(workspace)
        self.metadata = yaml.safe_load((self.action_dir / "action.yml").read_text(encoding="utf-8"))
        self.env = {k: v for k, v in env.items() if not k.startswith(("GITHUB_", "ACTIONS_", "RUNNER_"))}
        self.job_env = dict(job_env or {})
        self.uses = uses
        self.timeout = timeout

    def _inputs(self, given: Mapping[str, str]) -> dict[str, str]:
        declared = self.metadata.get("inputs") or {}
        unknown = set(given) - set(declared)
        if unknown:
            raise ValueError(f"unexpected input(s) {sorted(unknown)}; the action declares {sorted(declared)}")
        inputs = {}
        for name, spec in declared.items():
            if name in given:
                inputs[name] = str(given[name])
            elif spec.get("required") and "default" not in spec:
                raise ValueError(f"input {name!r} is required")
            else:
                inputs[name] = to_string(spec.get("default", ""))
        return inputs

    def run(
        self,
        inputs: Mapping[str, str],
        *,
        only: tuple[str, ...] | None = None,
        steps_context: Mapping[str, Mapping[str, str]] | None = None,
        before_step: Callable[[str], None] | None = None,
    ) -> ActionRun:
        """Run the steps (or `only` those ids, with `steps_context` standing in for the outputs of the others)."""
        temp = Path(tempfile.mkdtemp(prefix="runner-temp-"))
        contexts: dict[str, Any] = {
            "inputs": self._inputs(inputs),
            "github": {
                "action_path": str(self.action_dir),
                "workspace": str(self.workspace),
                "event_name": "push",
            },
            "runner": {"temp": str(temp), "os": "Linux"},
            "env": dict(self.job_env),
            "steps": {
                k: {"outputs": dict(v), "outcome": "success", "conclusion": "success"}
                for k, v in (steps_context or {}).items()
            },
        }
        state = {"failed": False}
        functions: dict[str, Callable[..., Any]] = {
            "success": lambda: not state["failed"],
            "failure": lambda: state["failed"],
            "always": lambda: True,
            "cancelled": lambda: False,
            "contains": lambda a, b: (
                any(_equal(x, b) for x in a)
                if isinstance(a, list)
                else to_string(b).lower() in to_string(a).lower()
            ),
            "startsWith": lambda a, b: to_string(a).lower().startswith(to_string(b).lower()),
            "format": lambda f, *args: re.sub(r"\{(\d+)\}", lambda m: to_string(args[int(m.group(1))]), f),
        }
        path_prefix: list[str] = []
        extra_env: dict[str, str] = {}
        masks: list[str] = []
        commands: list[Command] = []
        results: list[StepResult] = []
        summary_parts: list[str] = []

        for n, step in enumerate(self.metadata["runs"]["steps"]):
            step_id = str(step.get("id") or f"__{n}")
            name = str(step.get("name") or step_id)
            if only is not None and step_id not in only:
                continue
            condition = str(step.get("if", "success()"))
            condition = condition.strip()
            if condition.startswith("${{") and condition.endswith("}}"):
                condition = condition[3:-2]
            if not any(re.search(rf"\b{f}\s*\(", condition) for f in STATUS_FUNCTIONS):
                condition = f"success() && ({condition})"
            if not _truthy(evaluate(condition, contexts, functions)):
                results.append(StepResult(step_id, name, "skipped"))
                contexts["steps"][step_id] = {"outputs": {}, "outcome": "skipped", "conclusion": "skipped"}
                continue
            if before_step is not None:
                before_step(step_id)
            step_env = {k: expand(str(v), contexts, functions) for k, v in (step.get("env") or {}).items()}
            if "uses" in step:
                if self.uses is None:
                    raise ValueError(f"step {name!r} uses {step['uses']} and no handler was given")
                with_ = {k: expand(str(v), contexts, functions) for k, v in (step.get("with") or {}).items()}
                effect = self.uses(str(step["uses"]), with_)
                path_prefix = [str(p) for p in effect.get("path", ())] + path_prefix
                extra_env.update(effect.get("env", {}))
                result = StepResult(step_id, name, "success", 0, outputs=dict(effect.get("outputs", {})))
            else:
                result = self._run_script(
                    step,
                    step_id,
                    name,
                    contexts,
                    functions,
                    temp,
                    step_env,
                    path_prefix,
                    extra_env,
                    masks,
                    commands,
                )
                summary_parts.append(result.summary)
            results.append(result)
            contexts["steps"][step_id] = {
                "outputs": result.outputs,
                "outcome": result.outcome,
                "conclusion": result.outcome,
            }
            if result.outcome == "failure" and not step.get("continue-on-error"):
                state["failed"] = True

        outputs = {
            name: expand(str(spec.get("value", "")), contexts, functions)
            for name, spec in (self.metadata.get("outputs") or {}).items()
        }
        return ActionRun(results, outputs, "".join(summary_parts), commands, masks)

    def _run_script(
        self,
        step: Mapping[str, Any],
        step_id: str,
        name: str,
        contexts: dict[str, Any],
        functions: Mapping[str, Callable[..., Any]],
        temp: Path,
        step_env: dict[str, str],
        path_prefix: list[str],
        extra_env: dict[str, str],
        masks: list[str],
        commands: list[Command],
    ) -> StepResult:
        if step.get("shell") != "bash":
            raise ValueError(f"step {name!r}: only `shell: bash` is emulated, got {step.get('shell')!r}")
        script = expand(str(step["run"]), contexts, functions)
        files = {
            key: temp / f"{step_id}.{key.lower()}"
            for key in ("GITHUB_OUTPUT", "GITHUB_STEP_SUMMARY", "GITHUB_ENV", "GITHUB_PATH")
        }
        for path in files.values():
            path.write_text("")
        script_path = temp / f"{step_id}.sh"
        script_path.write_text(script, encoding="utf-8")
        env = {
            **self.env,
            "CI": "true",
            "GITHUB_ACTIONS": "true",
            "GITHUB_WORKSPACE": str(self.workspace),
            "GITHUB_ACTION_PATH": str(self.action_dir),
            "RUNNER_TEMP": str(temp),
            "RUNNER_OS": "Linux",
            **self.job_env,
            **extra_env,
            **{k: str(v) for k, v in files.items()},
            **step_env,
        }
        env["PATH"] = os.pathsep.join([*path_prefix, env.get("PATH", os.defpath)])
        start = time.perf_counter()
        proc = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script_path)],
            check=False,
            cwd=self.workspace,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=self.timeout,
        )
        shown: list[str] = []
        for line in proc.stdout.splitlines():  # both streams, in the order written: commands count on either
            command = parse_command(line, step_id)
            if command is not None and command.name == "add-mask":
                if command.message:
                    masks.append(command.message)
                continue  # the runner does not print add-mask lines
            if command is not None:
                commands.append(command)
            for secret in masks:
                line = line.replace(secret, "***")
            shown.append(line)
        outputs = read_file_command(files["GITHUB_OUTPUT"])
        extra_env.update(read_file_command(files["GITHUB_ENV"]))
        path_prefix[:0] = [p for p in files["GITHUB_PATH"].read_text().splitlines() if p]
        return StepResult(
            step_id,
            name,
            "success" if proc.returncode == 0 else "failure",
            proc.returncode,
            log="\n".join(shown),
            outputs=outputs,
            summary=files["GITHUB_STEP_SUMMARY"].read_text(encoding="utf-8"),
            script=script,
            seconds=time.perf_counter() - start,
        )
