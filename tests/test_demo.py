"""`hubsync demo`, the README's first command: the whole story, offline, as a user runs it; and what a newcomer
does next, following only what it prints."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hubsync.demo import MARKER, TARGET_REPO, USERS_ERROR, _prepare_workdir
from hubsync.errors import HubsyncError
from tests.cli import run_cli


def clean_env() -> dict[str, str]:
    """A newcomer's shell: no HF_* settings (the demo brings its own Hub), `hubsync` on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "HUBSYNC_DEBUG"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def read_until_next_steps(demo: subprocess.Popen[str]) -> str:
    """The demo's stdout up to the end of its next steps (it then keeps serving)."""
    assert demo.stdout is not None
    lines = []
    while True:
        line = demo.stdout.readline()
        assert line, "the demo ended before printing its next steps:\n" + "".join(lines)[-3000:]
        lines.append(line)
        if line.startswith("  Later, "):
            return "".join(lines)


def printed_commands(out: str) -> list[str]:
    return [
        line[len("    $ ") :] for line in out.split("\n[8] ", 1)[1].splitlines() if line.startswith("    $ ")
    ]


def follow(
    command: str, cwd: Path, env: dict[str, str]
) -> tuple[Path, subprocess.CompletedProcess[str] | None]:
    """One printed command, in a shell that remembers `cd` and `export` as a terminal does."""
    if command.startswith("cd "):
        return Path(command[3:]), None
    if command.startswith("export "):
        env.update(item.split("=", 1) for item in shlex.split(command[len("export ") :]))
        return cwd, None
    result = subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"$ {command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return cwd, result


def edit_the_card(manifest: Path) -> None:
    """The edit the demo suggests: the card's description, in the user's own words."""
    data = yaml.safe_load(manifest.read_text())
    data["card"]["description"] = "My own words about my first hubsync model."
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))


def test_a_newcomer_goes_from_the_demo_to_a_second_push_of_their_own_edit(tmp_path: Path) -> None:
    env = clean_env()
    demo = subprocess.Popen(
        [sys.executable, "-m", "hubsync", "demo", "--serve", "--workdir", str(tmp_path / "demo")],
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "demo.err").open("w"),
        text=True,
        env=env,
        cwd=tmp_path,
        # started with SIGINT ignored, as a script's background job (or a test worker) starts it: Ctrl-C must
        # still stop it
        preexec_fn=_ignore_sigint,
    )
    try:
        out = read_until_next_steps(demo)
        assert_the_story(out, (tmp_path / "demo.err").read_text())
        commands = printed_commands(out)
        assert commands[2:] == [
            "hubsync push",
            "hubsync build manifest.yaml",
            "hubsync push",
            "hubsync status manifest.yaml",
        ]
        shell_env, cwd, results = dict(env), tmp_path, []
        for command in commands:
            if command.startswith("hubsync build"):
                edit_the_card(cwd / "manifest.yaml")
            cwd, result = follow(command, cwd, shell_env)
            results.append(result)
        first_push, _, second_push, state = (r.stdout for r in results[2:] if r is not None)
        assert "is already up to date" in first_push
        assert second_push.startswith(f"pushed {TARGET_REPO}@main: ") and "2 file(s) uploaded" in second_push
        assert "matches the build" in state
        assert_a_second_commit(shell_env)
    finally:
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 0, "Ctrl-C is the normal way to stop `--serve`"


def assert_the_story(out: str, err: str) -> None:
    assert USERS_ERROR in out and "transformers 4.x's words" in out
    assert "That is the hazard hubsync removes" in out and "modeling_minicpmv.py" in out
    assert "A new version of the following files was downloaded" not in err  # explained, not shown raw
    assert "huggingface.co" not in out + err
    assert "ok: the plan breaks no rule" in out and "PASSED" in out
    # the demo's Hub serves LFS-only files, as for repos from before the Xet migration: no server-side copies
    assert "0 shard(s) copied server-side from the base" in out
    assert (
        "note: 2 shard(s) identical to the base are uploaded: the base serves them without a xetHash" in out
    )
    assert "pushing again: already up to date" in out
    assert "base_model: my-org/tiny-minicpmv" in out and "base_model_relation: finetune" in out
    assert "chat() answered" in out and "done in" in out


def assert_a_second_commit(shell_env: dict[str, str]) -> None:
    """On the served Hub, through the client as the newcomer's shell has it set up."""
    code = (
        "import json, sys; from huggingface_hub import HfApi\n"
        f"commits = HfApi().list_repo_commits({TARGET_REPO!r})\n"
        "print(json.dumps([c.title for c in commits]))\n"
    )
    listed = subprocess.run(
        [sys.executable, "-c", code], env=shell_env, capture_output=True, text=True, timeout=60, check=True
    )
    titles = json.loads(listed.stdout)
    assert len([t for t in titles if t.startswith("hubsync: build")]) == 2, titles


def test_demo_json_names_the_next_commands_and_errors_are_json_too(tmp_path: Path) -> None:
    result = run_cli(
        "demo", "--json", "--workdir", str(tmp_path / "demo"), env=clean_env(), timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout)
    assert (
        data["ok"] is True and data["repo"] == TARGET_REPO and re.fullmatch(r"[0-9a-f]{40}", data["commit"])
    )
    assert data["next"][0] == f"cd {tmp_path / 'demo'}" and data["next"][-1] == "hubsync status manifest.yaml"
    assert data["hub"]["serving"] is False and data["hub"]["serve_command"].startswith(
        f"python -m hubsync.testing.hub serve --root {tmp_path / 'demo' / 'hub'} --port "
    )
    assert set(data["env"]) == {
        "HF_ENDPOINT",
        "HF_HUB_DISABLE_XET",
        "HF_HUB_DISABLE_TELEMETRY",
        "HF_TOKEN",
        "HF_HOME",
    }
    assert "[8] Your turn" in result.stderr, "with --json, the story goes to stderr"
    # the build is recorded where the next steps run
    recorded = json.loads((tmp_path / "demo" / ".hubsync" / "last-build.json").read_text())
    assert recorded["output"] == data["output"]
    other = tmp_path / "not-a-demo"
    other.mkdir()
    refused = run_cli("demo", "--json", "--workdir", str(other), env=clean_env(), cwd=tmp_path)
    assert refused.returncode == 1
    error = json.loads(refused.stdout)["error"]
    assert error["message"] == f"{other} exists and is not a hubsync demo folder: pass another --workdir"
    assert refused.stderr.strip().splitlines()[-1] == f"error: {error['message']}"


def test_a_demo_folder_is_replaced_and_any_other_folder_refused(tmp_path: Path) -> None:
    demo = _prepare_workdir(tmp_path / "demo")
    (demo / "left-over").write_text("x")
    again = _prepare_workdir(tmp_path / "demo")
    assert (again / MARKER).is_file() and not (again / "left-over").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(HubsyncError, match="is not a hubsync demo folder"):
        _prepare_workdir(tmp_path / "mine")
