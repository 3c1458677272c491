"""The base's worker run is kept between verifications: reused only when the base's files, the runtime, the
request and the worker are the same, and only when it passed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from hubsync.build import build
from hubsync.testing.models import PublishedModel
from hubsync.verify import basecache, verify
from hubsync.verify.runtime import WorkerResult, current_runtime
from tests.test_build import REMOTE_TUNED, write_manifest

KEPT = "run base (kept from an earlier verify)"


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hubsync-cache"
    monkeypatch.setenv("HUBSYNC_CACHE_DIR", str(cache))
    return cache


def test_a_second_verify_reuses_the_base_run_and_still_judges_the_build(
    tmp_path: Path,
    own_cache: Path,
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = build(
        write_manifest(tmp_path, published_remote_base, remote_trainer_output, REMOTE_TUNED),
        record_last_build=False,
    ).output
    first = verify(out)
    assert first.passed and "run base" in first.timings and KEPT not in first.timings
    assert len(list((own_cache / "verify-base").iterdir())) == 1
    second = verify(out)
    assert second.passed and KEPT in second.timings and "run base" not in second.timings
    assert [(c.name, c.ok) for c in second.checks] == [(c.name, c.ok) for c in first.checks]
    assert second.timings.get("run build", 0) > 0  # the build itself is run every time
    monkeypatch.setenv(basecache.SWITCH, "0")
    off = verify(out, update_record=False)
    assert "run base" in off.timings and KEPT not in off.timings


def _result(tmp_path: Path, steps: dict[str, dict[str, object]], *, code: int = 0) -> WorkerResult:
    (tmp_path / "result.json").write_text(json.dumps({"finished": True, "steps": steps}))
    return WorkerResult(current_runtime(), {"finished": True, "steps": steps}, code, False, 1.0, tmp_path, [])


def test_only_a_passing_base_run_is_kept(tmp_path: Path, own_cache: Path) -> None:
    failed = _result(tmp_path, {"load": {"ok": False, "error": "AttributeError: x"}})
    assert not basecache.worth_keeping(failed)
    basecache.save("k-failed", failed)
    assert basecache.load(current_runtime(), "k-failed") is None
    crashed = _result(tmp_path, {"load": {"ok": True}}, code=-9)
    assert not basecache.worth_keeping(crashed)
    passed = _result(tmp_path, {"load": {"ok": True}, "generate": {"ok": None, "skipped": "not requested"}})
    basecache.save("k-passed", passed)
    kept = basecache.load(current_runtime(), "k-passed")
    assert kept is not None and kept.steps == passed.steps and kept.seconds == 1.0


def test_the_key_follows_the_base_files_the_runtime_and_the_request(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "modeling_x.py").write_text("x = 1\n")
    runtime = current_runtime()
    request = {"folder": str(base), "device": "cpu", "prompt": "hi", "tuned_prefixes": ["vpm."]}
    key = basecache.key(runtime, request)
    assert basecache.key(runtime, {**request, "outputs_dir": "/elsewhere"}) == key
    assert basecache.key(runtime, {**request, "prompt": "other"}) != key
    assert basecache.key(runtime, {**request, "tuned_prefixes": ["resampler."]}) != key
    other = type(runtime)(runtime.kind, runtime.python, {**runtime.versions, "transformers": "4.40.2"})
    assert basecache.key(other, request) != key
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)  # same bytes, another folder: other inodes, so another key (never read)
    assert basecache.key(runtime, {**request, "folder": str(copy)}) != key
    (base / "modeling_x.py").write_text("x = 22\n")  # remote code edited in place
    assert basecache.key(runtime, request) != key
    key = basecache.key(runtime, request)
    os.symlink("../blobs/abc", base / "model.safetensors")  # a file added
    assert basecache.key(runtime, request) != key
