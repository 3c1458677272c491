"""Progress: a bar per stage on a terminal, log lines without one, nothing with -q."""

from __future__ import annotations

import fcntl
import logging
import os
import re
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from hubsync import progress
from hubsync.testing.hub import LocalHub
from hubsync.testing.models import PublishedModel
from tests.cli import run_cli
from tests.test_build import REMOTE_TUNED, write_manifest


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_long_stage_logs_every_interval_and_once_at_the_end(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hubsync")
    clock = Clock()
    stage = progress.Stage("compare", 4_000_000_000, mode="log", clock=clock, interval=10)
    clock.now += 5
    stage.advance(1_000_000_000)
    stage.tick()
    assert caplog.messages == []  # not yet 10 s
    clock.now += 5
    stage.tick()
    assert caplog.messages == ["compare: 1.0 GB of 4.0 GB (25%) in 10 s, about 30 s left"]
    clock.now += 30
    stage.advance(3_000_000_000)
    stage.close()
    assert caplog.messages[-1] == "compare: 4.0 GB done in 40.0 s (100.0 MB/s)"


def test_an_inner_stage_is_named_by_its_parent_and_logs_nothing_itself(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="hubsync")
    clock = Clock()
    outer = progress.Stage("verify", None, unit="step", mode="log", clock=clock, interval=10)
    inner = progress.Stage("verify: model loads", None, unit="step", mode="log", nested=True, clock=clock)
    clock.now += 12
    inner.tick()
    outer.tick(inner)
    inner.close()
    outer.close()
    assert caplog.messages == [
        "verify: running for 12 s; now verify: model loads: running for 12 s",
        "verify: done in 12.0 s",
    ]


def test_mode_follows_quiet_the_terminal_and_huggingface_hubs_switch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Terminal:
        def isatty(self) -> bool:
            return True

    logger = logging.getLogger("hubsync")
    monkeypatch.setattr(sys, "stderr", Terminal())
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.delitem(sys.modules, "huggingface_hub.utils.tqdm", raising=False)
    level = logger.level
    try:
        logger.setLevel(logging.INFO)
        assert progress.choose_mode() == "bar"
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        assert progress.choose_mode() == "log"
        logger.setLevel(logging.WARNING)  # -q
        assert progress.choose_mode() == "off"
    finally:
        logger.setLevel(level)


def _build(tmp_path: Path, hub: LocalHub, base: PublishedModel, finetune: Path, *args: str) -> str:
    """stderr of `hubsync build --no-verify` in a pipe (as in CI)."""
    manifest = write_manifest(tmp_path, base, finetune, REMOTE_TUNED)
    env = {**os.environ, **hub.client_env(tmp_path / "hf")}
    result = run_cli("build", "--no-verify", *args, str(manifest), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return result.stderr


def test_without_a_terminal_each_stage_logs_one_line_and_q_silences_them(
    tmp_path: Path, hub: LocalHub, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    logged = _build(tmp_path, hub, published_remote_base, remote_trainer_output)
    lines = logged.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith(("compare:", "write:"))] == [
        "compare",
        "write",
    ]
    assert any(line.startswith("compare: ") and " kB done in " in line for line in lines), logged
    quiet = _build(tmp_path, hub, published_remote_base, remote_trainer_output, "-q")
    assert "compare" not in quiet and "write:" not in quiet


def test_on_a_terminal_each_stage_draws_a_bar_with_bytes_and_eta(
    tmp_path: Path, hub: LocalHub, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    manifest = write_manifest(tmp_path, published_remote_base, remote_trainer_output, REMOTE_TUNED)
    env = {**os.environ, **hub.client_env(tmp_path / "hf")}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS")
    env.pop("HUBSYNC_DEBUG", None)
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "hubsync", "build", "--no-verify", str(manifest)],
        stdout=subprocess.DEVNULL,
        stderr=terminal,
        env=env,
        cwd=tmp_path,
    )
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the terminal's last writer is gone
            break
        if not chunk:
            break
        shown += chunk
    os.close(main)
    assert process.wait(timeout=300) == 0, shown.decode(errors="replace")[-3000:]
    text = shown.decode("utf-8", errors="replace")
    compare = [part for part in text.split("\r") if part.lstrip("\n").startswith("compare: 100%|")]
    assert compare and re.search(r"[kMG]?B/s\]", compare[-1]) and "<00:00" in compare[-1], text[
        -2000:
    ]  # bytes, ETA
    assert "write: " in text and " done in " not in text  # bars, not log lines
