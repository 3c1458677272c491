"""The interpreter a model is verified with, and running the verification worker in it.

A model runs where its users run it: the training environment (`verify.python`), a venv made once for a
pinned set of requirements (`verify.requirements`), or, with neither, hubsync's own interpreter. hubsync never
loads a model in its own process: `run_worker` starts `worker.py` in the chosen interpreter, in a fresh folder,
and reads back its JSON result, partial when the worker died. A worker that crashes, is killed or runs out of
time is a result that says so in one line; a runtime that cannot start at all is a `VerifyError`.

Only the standard library is imported here: choosing an interpreter must not pull torch into hubsync.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hubsync.errors import VerifyError

log = logging.getLogger("hubsync")

WORKER = Path(__file__).with_name("worker.py")
PROTOCOL = 1
MARKER = "hubsync-runtime.json"
INSTALLER_ENV = "HUBSYNC_VENV_INSTALLER"
# pip's settings that uv reads under its own names (uv reads no pip configuration file).
PIP_TO_UV = {
    "PIP_INDEX_URL": "UV_INDEX_URL",
    "PIP_EXTRA_INDEX_URL": "UV_EXTRA_INDEX_URL",
    "PIP_FIND_LINKS": "UV_FIND_LINKS",
    "PIP_NO_INDEX": "UV_NO_INDEX",
    "PIP_CONSTRAINT": "UV_CONSTRAINT",
}
# What a signal that ends the worker most likely means, for the one-line message.
SIGNAL_MEANING = {
    "SIGKILL": "was killed (SIGKILL; likely out of memory)",
    "SIGTERM": "was stopped (SIGTERM)",
    "SIGINT": "was interrupted (SIGINT)",
}

# Runs in the target interpreter (any Python 3): what it is and which of our packages it has, without
# importing them (importing torch takes seconds; the metadata answers in milliseconds).
PROBE = """
import json, platform, sys
try:
    from importlib import metadata
except ImportError:
    metadata = None
def version(name):
    try:
        return metadata.version(name) if metadata else None
    except Exception:
        return None
print(json.dumps({
    "python": platform.python_version(),
    "executable": sys.executable,
    "torch": version("torch"),
    "transformers": version("transformers"),
    "tokenizers": version("tokenizers"),
}))
"""


@dataclass(frozen=True)
class Runtime:
    """An interpreter that can run the worker, and what it holds."""

    kind: str  # "current" | "python" | "requirements"
    python: Path
    versions: Mapping[str, str | None] = field(default_factory=dict)
    requirements: tuple[str, ...] = ()

    def describe(self) -> str:
        """How messages name it: what the user configured, then what it runs."""
        what = {
            "current": f"hubsync's own interpreter ({self.python})",
            "python": f"verify.python {self.python}",
            "requirements": f"the verify.requirements venv [{', '.join(self.requirements)}]",
        }[self.kind]
        found = ", ".join(
            f"{name} {self.versions[name]}"
            for name in ("python", "torch", "transformers")
            if self.versions.get(name)
        )
        return f"{what} ({found})" if found else what

    def to_record(self) -> dict[str, Any]:
        """What a build records, so that a later `hubsync verify` can reuse the same runtime."""
        return {
            "kind": self.kind,
            "python": str(self.python),
            "requirements": list(self.requirements),
            "versions": dict(self.versions),
        }


# ------------------------------------------------------------------------------------------- the runtimes


# The torch most remote code written for transformers 4.x still runs on (MiniCPM-V 2.5: torch <= 2.6).
TORCH_FOR_4X = "torch==2.6.0"


def suggested_requirements(written: str, *, torchvision: bool) -> list[str]:
    """verify.requirements for a model whose config.json was written by transformers `written`; `torchvision`
    when its code imports it."""
    reqs = [f"transformers=={written}"]
    if written.startswith("4."):
        reqs.append(TORCH_FOR_4X)
    if torchvision:
        reqs.append("torchvision")
    return reqs


def current_runtime() -> Runtime:
    return Runtime("current", Path(sys.executable), probe(Path(sys.executable), "hubsync's own interpreter"))


def python_runtime(path: Path) -> Runtime:
    """An existing interpreter (typically the training environment's): it must run and hold torch and
    transformers."""
    label = f"verify.python {path}"
    if len(path.parts) == 1 and shutil.which(str(path)):  # a bare name such as `python3`: from PATH
        path = Path(str(shutil.which(str(path))))
    if not path.exists():
        raise VerifyError(
            f"{label} does not exist: point it at the interpreter of the environment the model runs in "
            "(e.g. /path/to/venv/bin/python)"
        )
    if path.is_dir() or not os.access(path, os.X_OK):
        raise VerifyError(
            f"{label} is not an executable file: point it at a python interpreter, not a folder"
        )
    versions = probe(path, label)
    _require_packages(versions, label, "install them into that environment")
    return Runtime("python", path, versions)


def probe(python: Path, label: str) -> dict[str, str | None]:
    """Run the interpreter once: its Python version and the versions of torch and transformers in it."""
    try:
        done = subprocess.run(
            [str(python), "-c", PROBE], capture_output=True, text=True, timeout=120, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise VerifyError(f"{label} cannot be run ({err}): check the path and that it is a python") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise VerifyError(f"{label} fails to start ({last}): repair or recreate that environment")
    try:
        versions: dict[str, str | None] = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise VerifyError(f"{label} does not behave like a python interpreter: check the path") from None
    if _version_tuple(versions.get("python")) < (3, 9):
        raise VerifyError(
            f"{label} is Python {versions.get('python')}: the verification worker needs Python >= 3.9"
        )
    return versions


def _require_packages(versions: Mapping[str, str | None], label: str, fix: str) -> None:
    absent = [name for name in ("torch", "transformers") if not versions.get(name)]
    if absent:
        raise VerifyError(f"{label} has no {' and no '.join(absent)} installed: {fix}")


def _version_tuple(version: str | None) -> tuple[int, ...]:
    parts = []
    for piece in (version or "0").split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


# ---------------------------------------------------------------------------------- requirements venvs


def cache_root() -> Path:
    """`$HUBSYNC_CACHE_DIR`, else `$XDG_CACHE_HOME/hubsync`, else `~/.cache/hubsync`."""
    explicit = os.environ.get("HUBSYNC_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "hubsync"


def runtime_key(requirements: Sequence[str]) -> str:
    """The same set of requirements on the same Python minor version shares one venv."""
    python = ".".join(platform.python_version_tuple()[:2])
    wanted = sorted({" ".join(r.split()) for r in requirements if r.strip()})
    blob = json.dumps({"python": python, "requirements": wanted}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def requirements_runtime(requirements: Sequence[str], *, progress: IO[str] | None = None) -> Runtime:
    """A venv holding exactly `requirements`, made once and reused; progress goes to `progress` (stderr)."""
    wanted = tuple(" ".join(r.split()) for r in requirements if r.strip())
    label = f"verify.requirements [{', '.join(wanted)}]"
    if not wanted:
        raise VerifyError(f"{label} is empty: list at least torch and transformers, or use verify.python")
    stream = progress if progress is not None else sys.stderr
    root = cache_root() / "runtimes"
    folder = root / runtime_key(wanted)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f"{folder.name}.lock", stream):
            versions = _cached_versions(folder, label, stream)
            if versions is None:
                versions = _create_venv(folder, wanted, label, stream)
    except OSError as err:
        raise VerifyError(
            f"cannot create {label} under {root} ({err}): set HUBSYNC_CACHE_DIR to a writable folder"
        ) from None
    return Runtime("requirements", venv_python(folder), versions, wanted)


def _cached_versions(folder: Path, label: str, stream: IO[str]) -> dict[str, str | None] | None:
    """The versions in a finished venv, or None when there is none (no marker) or it no longer starts (its
    base Python was upgraded or removed): then it is made again."""
    if not (folder / MARKER).is_file():
        return None
    try:
        return probe(venv_python(folder), label)
    except VerifyError as err:
        print(
            f"hubsync: the cached runtime in {folder} no longer starts ({err}); making it again", file=stream
        )
        return None


def venv_python(folder: Path) -> Path:
    return folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


@contextlib.contextmanager
def _locked(path: Path, stream: IO[str]) -> Iterator[None]:
    """One creator per venv at a time; a second hubsync waits, then finds it made."""
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): concurrent creation of one runtime is not guarded
        yield
        return
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"hubsync: waiting for another hubsync that is creating {path.stem} ...",
                file=stream,
                flush=True,
            )
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _create_venv(
    folder: Path, requirements: tuple[str, ...], label: str, stream: IO[str]
) -> dict[str, str | None]:
    """venv + install, then the marker, last: a creation killed half-way has no marker and is redone."""
    installer = _installer(label)
    shutil.rmtree(folder, ignore_errors=True)
    print(
        f"hubsync: creating the verification runtime for {label} with {installer} in {folder} "
        "(once; later runs reuse it)",
        file=stream,
        flush=True,
    )
    start = time.monotonic()
    commands, env = _install_commands(folder, requirements, installer)
    for name, command in commands:
        code, last = _stream(command, env, stream)
        if code != 0:
            shutil.rmtree(folder, ignore_errors=True)
            raise VerifyError(
                f"could not create the venv for {label}: {name} exited with {code} ({last}); fix the "
                "requirements (the installer's output is above) or set verify.python to an environment "
                "that has them"
            )
    versions = probe(venv_python(folder), label)
    try:
        _require_packages(
            versions, label, "add them to verify.requirements (e.g. torch==2.6.0, transformers==4.40.0)"
        )
    except VerifyError:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    marker = {"requirements": list(requirements), "installer": installer, "versions": versions}
    tmp = folder / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MARKER)
    print(f"hubsync: {label} ready in {time.monotonic() - start:.0f} s", file=stream, flush=True)
    return versions


def _install_commands(
    folder: Path, requirements: tuple[str, ...], installer: str
) -> tuple[list[tuple[str, list[str]]], dict[str, str]]:
    """The commands that make the venv and install into it, and their environment."""
    python = str(venv_python(folder))
    uv = shutil.which("uv")
    if installer == "uv" and uv:
        return [
            ("uv venv", [uv, "venv", "--python", sys.executable, str(folder)]),
            ("uv pip install", [uv, "pip", "install", "--python", python, *requirements]),
        ], _uv_environment()
    # pip reads its own PIP_* variables and configuration files from the inherited environment
    return [
        ("python -m venv", [sys.executable, "-m", "venv", str(folder)]),
        ("pip install", [python, "-m", "pip", "install", *requirements]),
    ], dict(os.environ)


def _installer(label: str) -> str:
    chosen = os.environ.get(INSTALLER_ENV, "").strip().lower()
    if chosen not in ("", "pip", "uv"):
        raise VerifyError(f"{INSTALLER_ENV}={chosen!r} is not an installer hubsync knows: use pip or uv")
    if chosen == "uv" and not shutil.which("uv"):
        raise VerifyError(f"{INSTALLER_ENV}=uv but uv is not on PATH: install uv or set {INSTALLER_ENV}=pip")
    if chosen:
        return chosen
    return "uv" if shutil.which("uv") else "pip"


def _uv_environment() -> dict[str, str]:
    env = dict(os.environ)
    for pip_name, uv_name in PIP_TO_UV.items():
        if pip_name in env and uv_name not in env:
            env[uv_name] = env[pip_name]
    return env


def _stream(command: list[str], env: Mapping[str, str], stream: IO[str]) -> tuple[int, str]:
    """Run a command, its output streamed line by line (pip's progress); returns its code and last line."""
    last = ""
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(env)
        )
    except OSError as err:
        return 127, str(err)
    assert process.stdout is not None
    for line in process.stdout:
        stream.write(f"  {line}")
        stream.flush()
        if line.strip():
            last = line.strip()
    return process.wait(), last


# --------------------------------------------------------------------------------------- running the worker


@dataclass
class WorkerResult:
    """What one worker run left: its result (partial after a crash), how it ended, its stderr's tail."""

    runtime: Runtime
    data: dict[str, Any]
    returncode: int | None
    timed_out: bool
    seconds: float
    workdir: Path
    stderr_tail: list[str]

    @property
    def steps(self) -> dict[str, dict[str, Any]]:
        steps = self.data.get("steps")
        return steps if isinstance(steps, dict) else {}

    def step(self, name: str) -> dict[str, Any]:
        return self.steps.get(name) or {"ok": None, "skipped": "the worker never reached this step"}

    @property
    def outputs_dir(self) -> Path:
        return self.workdir / "outputs"

    @property
    def finished(self) -> bool:
        return bool(self.data.get("finished")) and not self.timed_out

    @property
    def failure(self) -> str | None:
        """One line when the worker did not finish: how it ended and in which step; None when it did."""
        if self.finished:
            return None
        where = f" during {self.data['running']}" if self.data.get("running") else ""
        if self.timed_out:
            return f"the worker did not finish within {self.seconds:.0f} s{where} and was stopped"
        code = self.returncode
        if code is not None and code < 0:
            name = _signal_name(-code)
            frame = self.crash_frame
            at = f", in {frame}" if frame else ""
            return f"the worker {SIGNAL_MEANING.get(name, f'crashed ({name})')}{where}{at}"
        return f"the worker exited with status {code}{where}"

    @property
    def crash_frame(self) -> str | None:
        """Where a fatal signal hit, from the Python stack faulthandler printed: `file.py line N (function)`."""
        return _innermost_frame(self.workdir / "stderr.log")


def run_worker(
    runtime: Runtime,
    request: Mapping[str, Any],
    *,
    timeout: float,
    workdir: Path,
    echo: IO[str] | None = None,
) -> WorkerResult:
    """Run the worker on one request in `workdir` (a fresh folder that receives the request, the result, the
    arrays and the logs); `echo` gets the worker's stderr as it comes."""
    workdir.mkdir(parents=True, exist_ok=True)
    body = {"protocol": PROTOCOL, "outputs_dir": str(workdir / "outputs"), **request}
    (workdir / "request.json").write_text(json.dumps(body, indent=1), encoding="utf-8")
    # A copy beside the request, so that the worker's folder on sys.path is this one and not hubsync's package.
    script = workdir / "hubsync_worker.py"
    shutil.copyfile(WORKER, script)
    command = [str(runtime.python), str(script), "request.json", "result.json"]
    start = time.monotonic()
    try:
        with open(
            workdir / "stdout.log", "wb"
        ) as stdout:  # the model's prints; the child keeps its own handle
            process = subprocess.Popen(
                command,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group: a timeout stops the model's helpers too
                env=_worker_environment(),
            )
    except OSError as err:
        raise VerifyError(
            f"cannot start the verification worker with {runtime.describe()} ({err}): check that interpreter"
        ) from None
    tail = _collect_stderr(process, workdir / "stderr.log", echo)
    timed_out = _wait(process, timeout)
    tail.join(timeout=10)  # a helper that left the process group may hold the pipe open: do not wait on it
    result = WorkerResult(
        runtime,
        _read_result(workdir / "result.json"),
        process.returncode,
        timed_out,
        time.monotonic() - start,
        workdir,
        _tail(workdir / "stderr.log"),
    )
    _refuse_unstartable(result)
    return result


def _worker_environment() -> dict[str, str]:
    """The user's environment (CUDA_VISIBLE_DEVICES, HF_HOME, ...), offline: verification fetches nothing."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    return env


def _collect_stderr(process: subprocess.Popen[bytes], path: Path, echo: IO[str] | None) -> threading.Thread:
    def copy() -> None:
        assert process.stderr is not None
        with open(path, "wb") as log_file:
            for line in process.stderr:
                log_file.write(line)
                if echo is not None:
                    echo.write(line.decode("utf-8", "replace"))
                    echo.flush()

    thread = threading.Thread(target=copy, daemon=True)
    thread.start()
    return thread


def _wait(process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for the worker; past the timeout (or on Ctrl-C) its whole process group is killed."""
    try:
        process.wait(timeout=timeout)
        return False
    except subprocess.TimeoutExpired:
        _kill_group(process)
        return True
    except BaseException:
        _kill_group(process)
        raise


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _read_result(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # the worker died before writing anything (or while the first write was in flight)
    return data if isinstance(data, dict) else {}


def _tail(path: Path, lines: int = 20) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    kept = [line for line in text.splitlines() if line.strip() and not line.startswith("Extension modules:")]
    return kept[-lines:]


def _refuse_unstartable(result: WorkerResult) -> None:
    """A worker that never got to run a model is the runtime's fault: a VerifyError, not a failed check."""
    label = result.runtime.describe()
    if "error" in result.data:  # the worker refused the request: a bug on our side, not the user's
        raise RuntimeError(f"the verification worker refused its request: {result.data['error']}")
    runtime_step = result.steps.get("runtime")
    if runtime_step is None and (result.returncode or 0) > 0:
        last = result.stderr_tail[-1] if result.stderr_tail else f"exit status {result.returncode}"
        raise VerifyError(
            f"the verification worker could not start with {label} ({last}): check that interpreter"
        )
    if runtime_step is not None and runtime_step.get("ok") is False:
        raise VerifyError(
            f"{label} cannot import what the worker needs ({runtime_step.get('error')}): repair that environment"
        )


def _innermost_frame(stderr: Path) -> str | None:
    """The frame faulthandler printed where the model's own code was running (innermost such frame), else
    the innermost frame: `file.py line N (function)`."""
    try:
        lines = stderr.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    headers = [i for i, line in enumerate(lines) if "most recent call first" in line]
    if not headers:
        return None
    frames = []
    for line in lines[headers[-1] + 1 :]:
        match = re.match(r'\s*File "(?P<path>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)', line)
        if match is None:
            break
        frames.append(match)
    remote = [m for m in frames if "transformers_modules" in m["path"]]
    if not frames:
        return None
    chosen = (remote or frames)[0]
    return f"{Path(chosen['path']).name} line {chosen['line']} ({chosen['func']})"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
