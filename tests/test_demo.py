"""`hubsync demo`, the README's first command: the whole story, offline, as a user runs it."""

from __future__ import annotations

import os
from pathlib import Path

from tests.cli import run_cli


def test_demo_runs_the_whole_story_offline(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HUB_OFFLINE"] = "0"
    result = run_cli("demo", "--workdir", str(tmp_path / "demo"), env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "MiniCPMVTokenizerFast has no attribute tokenizer" in out and "<- the seed error" in out
    assert "ok: the plan breaks no rule" in out and "PASSED" in out
    # the demo's Hub serves LFS-only files, as for repos from before the Xet migration: no server-side copies
    assert "0 shard(s) copied server-side from the base" in out
    assert "note: 2 shard(s) identical to the base are uploaded: the base serves them without a xetHash" in out
    assert "pushing again: already up to date" in out
    assert "base_model: my-org/tiny-minicpmv" in out and "base_model_relation: finetune" in out
    assert "chat() answered" in out and "done in" in out
    again = run_cli("demo", "--workdir", str(tmp_path / "demo"), env=env, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, "a second run replaces the demo folder"
    other = tmp_path / "not-a-demo"
    other.mkdir()
    refused = run_cli("demo", "--workdir", str(other), env=env, timeout=600, cwd=tmp_path)
    assert refused.returncode == 1
    assert (
        refused.stderr.strip()
        == f"error: {other} exists and is not a hubsync demo folder: pass another --workdir"
    )
