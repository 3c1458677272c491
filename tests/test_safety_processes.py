"""Atomic, locked and not lossy, with real processes (issue 11): a `hubsync verify` killed mid-run leaves a
consistent card and record, a build that meets a running verify refuses in one line, a build that fails
verification keeps the previous output, and build + verify + push leave every input byte-identical."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from hubsync.build import build
from hubsync.errors import VerifyError
from hubsync.push import push
from hubsync.record import load, verification_gate
from hubsync.testing.hub import LocalHub
from hubsync.testing.models import PublishedModel
from hubsync.verify import verify
from tests.fixtures_hub import unique_repo_name
from tests.safety_helpers import hubsync_command, last_line, make_project, snapshot
from tests.test_safety import base_snapshot_folder, local_paths_in

# one xdist worker runs this whole module, so its module- and session-scoped fixtures are made once
pytestmark = [pytest.mark.xdist_group("test_safety_processes")]


@pytest.fixture
def verified(
    tmp_path: Path, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> tuple[Path, Path]:
    """(manifest, output) of a build that passed verification, in a throwaway project folder."""
    manifest = make_project(tmp_path, published_remote_base, remote_trainer_output, output="out")
    result = build(manifest, verify=True, record_last_build=False)
    assert result.report is not None and result.report.passed
    return manifest, result.output


@pytest.fixture(scope="module")
def unverified_once(
    tmp_path_factory: pytest.TempPathFactory,
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
) -> Path:
    """A build made with --no-verify, which tests copy: its first verification re-renders the card and
    rewrites the record, so a kill in between would show (a copy verifies the same way)."""
    root = tmp_path_factory.mktemp("unverified")
    manifest = make_project(root, published_remote_base, remote_trainer_output, output="out")
    return build(manifest, verify=False, record_last_build=False).output


# Fault injection at the OS-call level, for the one moment no real condition can single out: between two
# writes of the verification record. An audit hook sees every open(); the child kills itself with SIGKILL (no
# handler, no cleanup) when it opens one of the named files for writing.
KILL_AT_OPEN = """
import os, signal, sys
names = set(sys.argv[1].split(","))
def hook(event, args):
    if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    flags = args[2] if isinstance(args[2], int) else 0
    if os.path.basename(os.fsdecode(args[0])) in names and flags & (os.O_WRONLY | os.O_RDWR):
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
from hubsync.cli import main
main(sys.argv[2:])
"""


class VerifyProcess:
    """`hubsync -vv verify` in a child process, followed check by check through its debug log; with
    `kill_at_open`, it kills itself when it opens one of those file names for writing."""

    def __init__(self, folder: Path, *, kill_at_open: tuple[str, ...] = ()) -> None:
        args = ("-vv", "verify", "--trust-remote-code", str(folder))
        command = (
            [sys.executable, "-c", KILL_AT_OPEN, ",".join(kill_at_open), *args]
            if kill_at_open
            else hubsync_command(*args)
        )
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.seen: list[str] = []

    def wait_for_check(self, name: str) -> None:
        """Read the log until the check `name` has been reported (each check logs "pass NAME: ...")."""
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.seen.append(line)
            if line.split(" ", 1)[-1].startswith(f"{name}:"):
                return
        raise AssertionError(f"verify ended without reporting {name!r}:\n{''.join(self.seen[-20:])}")

    def finish(self) -> int:
        _, rest = self.process.communicate(timeout=300)
        self.seen.append(rest or "")
        return self.process.returncode

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no handler, no cleanup
        self.process.communicate(timeout=60)


@pytest.fixture
def verify_process() -> Iterator[list[VerifyProcess]]:
    started: list[VerifyProcess] = []
    yield started
    for proc in started:  # a failed assertion must not leave a child running (or stopped)
        if proc.process.poll() is None:
            proc.process.send_signal(signal.SIGCONT)
            proc.kill()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


KILLS = {
    "during the model run": (),  # a real SIGKILL from here once the log shows the model run has started
    "while writing the card": ("README.md",),
    "between the card and the record": ("hubsync.json", ".hubsync.json.hubsync-tmp"),
}


@pytest.mark.parametrize("when", list(KILLS))
def test_a_killed_verify_leaves_card_and_record_consistent(
    when: str, tmp_path: Path, unverified_once: Path, verify_process: list[VerifyProcess]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(unverified_once, out)
    card_before = sha256(out / "README.md")
    proc = VerifyProcess(out, kill_at_open=KILLS[when])
    verify_process.append(proc)
    if KILLS[when]:
        assert proc.finish() == -signal.SIGKILL, "".join(proc.seen[-20:])
    else:
        proc.wait_for_check("tokenizer")
        proc.kill()

    record = load(out)  # hubsync.json is whole: the old one or the new one
    assert record.files["README.md"].sha256 == sha256(out / "README.md"), "the card and the record differ"
    if record.verification is None:  # the old pair, untouched
        assert sha256(out / "README.md") == card_before
        with pytest.raises(VerifyError, match="was never verified: run `hubsync verify"):
            verification_gate(out)
    else:  # the new pair, complete
        verification_gate(out)
    assert verify(out, run_models=False).passed  # the next verify cleans up what the killed one left
    assert not list(out.parent.glob(".out.hubsync-staging-*"))


def test_a_build_meeting_a_running_verify_refuses_in_one_line(
    verified: tuple[Path, Path], verify_process: list[VerifyProcess]
) -> None:
    manifest, out = verified
    before = snapshot(out)
    proc = VerifyProcess(out)
    verify_process.append(proc)
    proc.wait_for_check("files match hubsync.json")  # the lock is held from before the first check
    os.kill(proc.process.pid, signal.SIGSTOP)  # hold it there, however slow this machine is
    try:
        built = subprocess.run(
            hubsync_command("-q", "build", str(manifest)), capture_output=True, text=True, timeout=300
        )
    finally:
        os.kill(proc.process.pid, signal.SIGCONT)
    assert built.returncode == 1
    assert built.stderr.strip().splitlines() == [
        (
            f"error: another hubsync build or verify is using {out} right now: wait for it to finish, "
            "or build into another output.dir"
        )
    ]
    assert proc.finish() == 0, "".join(proc.seen[-20:])
    # the refused build changed nothing; the verify that held the lock re-recorded only the card and record
    recorded = ("README.md", "hubsync.json")
    assert snapshot(out, skip=recorded) == {k: v for k, v in before.items() if k not in recorded}


def test_a_build_that_fails_verification_keeps_the_previous_output(verified: tuple[Path, Path]) -> None:
    manifest, out = verified
    before = snapshot(out)
    data = yaml.safe_load(manifest.read_text())
    data["verify"]["trust_remote_code"] = False  # the remote-code model cannot load: verification fails
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    built = subprocess.run(
        hubsync_command("-q", "build", str(manifest)), capture_output=True, text=True, timeout=300
    )
    failed = out.with_name("out.failed")
    assert built.returncode == 1 and "Traceback" not in built.stderr
    line = last_line(built.stderr)
    assert line.startswith("error: the build failed verification ("), line
    assert line.endswith(
        f"): {out} was left as it was; the failed build is in {failed}; fix the fine-tune or the manifest and "
        "build again"
    ), line
    assert snapshot(out) == before, "the previous verified output changed"
    assert json.loads((failed / "hubsync.json").read_text())["verification"]["passed"] is False
    verification_gate(out)  # still publishable, exactly as it was


def test_build_verify_and_push_leave_every_input_byte_identical(
    tmp_path: Path,
    hub: LocalHub,
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo_id = f"my-org/{unique_repo_name('inputs')}"
    manifest = make_project(
        tmp_path,
        published_remote_base,
        remote_trainer_output,
        output="build/model",
        extra={"push": {"repo": repo_id}},
    )
    manifest.write_text("# private: the run on the cluster's spare node\n" + manifest.read_text())
    project = manifest.parent
    monkeypatch.chdir(project)  # where a bare `hubsync push` finds the last build (.hubsync/)
    cache = base_snapshot_folder(published_remote_base)
    hubsync_own = ("build", ".hubsync")  # the output's folder (output, lock, local sidecar) and the pointer

    def inputs() -> tuple[object, ...]:
        return snapshot(project / "ft"), snapshot(project, skip=hubsync_own), snapshot(cache)

    before = inputs()
    result = build(manifest, verify=True)
    assert result.report is not None and result.report.passed
    assert verify(result.output).passed
    pushed = push(None)
    assert pushed.commit_sha == hub.branch_head(repo_id)
    assert inputs() == before
    assert sorted(p.name for p in (project / "build").iterdir()) == [
        ".model.hubsync-local.json",
        ".model.hubsync.lock",
        "model",
    ]
    assert local_paths_in(result.output, tmp_path) == []
    published = [p for p in result.output.rglob("*") if p.is_file()]
    assert not [p.name for p in published if b"spare node" in p.read_bytes()], (
        "a manifest comment was published"
    )
