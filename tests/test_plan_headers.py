"""`plan`, `validate --deep` and `doctor` without downloading the base's weights: headers and small samples
read over HTTP ranges from the emulator, whose request log counts every byte it served."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from hubsync.testing.hub import DEFAULT_TOKEN, LocalHub
from hubsync.testing.models import PublishedModel, publish_model
from tests.cli import run_cli
from tests.fixtures_hub import unique_repo_name
from tests.test_build import REMOTE_TUNED, write_manifest

# one xdist worker runs this whole module, so its module- and session-scoped fixtures are made once
pytestmark = [pytest.mark.xdist_group("test_plan_headers")]

PADDING = "llm.padding.weight"  # 32 MB of extra base weights: a base large enough to measure 1% of


@pytest.fixture(scope="module")
def big_base(
    hub: LocalHub, remote_base_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> PublishedModel:
    """The remote-code base with one more 32 MB shard, published on the session Hub."""
    folder = tmp_path_factory.mktemp("big-base") / "base"
    shutil.copytree(remote_base_dir, folder)
    generator = torch.Generator().manual_seed(7)
    padding = torch.randn(8192, 2048, generator=generator).to(torch.bfloat16)
    save_file({PADDING: padding}, str(folder / "model-padding.safetensors"), metadata={"format": "pt"})
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][PADDING] = "model-padding.safetensors"
    index_path.write_text(json.dumps(index, indent=2))
    repo_id = f"my-org/{unique_repo_name('big-base')}"
    return publish_model(folder, repo_id, endpoint=hub.endpoint, token=DEFAULT_TOKEN)


def cli_env(hub: LocalHub, hf_home: Path) -> dict[str, str]:
    return {**os.environ, **hub.client_env(hf_home)}


def weight_bytes_served(hub: LocalHub, base: PublishedModel) -> tuple[int, int]:
    """(bytes of the base's weight files the Hub sent, bytes those files hold)."""
    from hubsync.fsio import list_files
    from hubsync.tensors import sha256_file

    shards = [p for p in list_files(base.local_dir) if p.endswith(".safetensors")]
    marks = {p for p in shards} | {sha256_file(base.local_dir / p) for p in shards}
    served = sum(r.bytes_out for r in hub.requests(repo_id=base.repo_id) if any(m in r.path for m in marks))
    return served, sum((base.local_dir / p).stat().st_size for p in shards)


def snapshot(hf_home: Path, base: PublishedModel) -> Path:
    return hf_home / "hub" / f"models--{base.repo_id.replace('/', '--')}" / "snapshots" / base.sha


def test_plan_of_a_cold_cache_fetches_under_one_percent_of_the_weights(
    tmp_path: Path, hub: LocalHub, big_base: PublishedModel, remote_trainer_output: Path
) -> None:
    manifest = write_manifest(tmp_path, big_base, remote_trainer_output, REMOTE_TUNED)
    hub.clear_log()
    result = run_cli("plan", "--json", str(manifest), env=cli_env(hub, tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    served, total = weight_bytes_served(hub, big_base)
    assert 0 < served < total / 100, f"{served} of {total} weight bytes fetched"
    # the plan itself: what a build takes from where, and what it could not check
    assert plan["problems"] == [] and len([t for t in plan["tensors"] if t["source"] == "finetune"]) == 50
    assert {p["prefix"]: p["unchecked"] for p in plan["prefixes"]} == {"vpm.": 37, "resampler.": 13}
    assert any("NaN or Inf" in rule for rule in plan["unchecked"])
    assert any("compared on a sample" in rule for rule in plan["unchecked"]), "the frozen part was sampled"
    # non-weight files are in the cache, weights are not
    cached = snapshot(tmp_path / "hf", big_base)
    assert (cached / "config.json").is_file() and (cached / "modeling_minicpmv.py").is_file()
    assert not list(cached.glob("*.safetensors"))


def test_plan_compares_every_byte_when_the_weights_are_cached(
    tmp_path: Path, hub: LocalHub, big_base: PublishedModel, remote_trainer_output: Path
) -> None:
    from huggingface_hub import snapshot_download

    hf_home = tmp_path / "hf"
    env = cli_env(hub, hf_home)
    snapshot_download(big_base.repo_id, revision=big_base.sha, cache_dir=hf_home / "hub")
    manifest = write_manifest(tmp_path, big_base, remote_trainer_output, REMOTE_TUNED)
    hub.clear_log()
    result = run_cli("plan", "--json", str(manifest), env=env)
    plan = json.loads(result.stdout)
    assert result.returncode == 0 and plan["unchecked"] == []
    assert {p["prefix"]: p["changed"] for p in plan["prefixes"]} == {"vpm.": 37, "resampler.": 13}
    assert weight_bytes_served(hub, big_base)[0] == 0


def test_a_frozen_part_that_changed_is_found_by_the_sample(
    tmp_path: Path, hub: LocalHub, published_remote_base: PublishedModel, trainer_output_factory: Any
) -> None:
    leaky = trainer_output_factory("remote", also_perturb="llm.")
    manifest = write_manifest(tmp_path, published_remote_base, leaky, REMOTE_TUNED)
    result = run_cli("plan", str(manifest), env=cli_env(hub, tmp_path / "hf"))
    assert result.returncode == 1
    assert "tensor(s) outside `finetune.tuned` differ from the base (under llm." in result.stdout
    assert "error: " in result.stderr and "that part was not frozen" in result.stderr


def test_validate_deep_checks_the_inputs_without_the_weights(
    tmp_path: Path, hub: LocalHub, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    env = cli_env(hub, tmp_path / "hf")
    manifest = write_manifest(tmp_path, published_remote_base, remote_trainer_output, REMOTE_TUNED)
    plain = run_cli("validate", str(manifest), env=env)
    assert plain.returncode == 0 and not hub.requests(repo_id=published_remote_base.repo_id)
    deep = run_cli("validate", "--deep", str(manifest), env=env)
    assert deep.returncode == 0, deep.stderr
    assert deep.stdout.splitlines() == [
        f"{manifest}: valid",
        (
            f"{manifest}: inputs ok ({published_remote_base.repo_id}@{published_remote_base.sha}, "
            "50 tuned tensor(s))"
        ),
    ]
    assert "not checked without the base's weights" in deep.stderr
    wrong = write_manifest(
        tmp_path, published_remote_base, remote_trainer_output, [*REMOTE_TUNED, "nothing."], name="wrong.yaml"
    )
    refused = run_cli("validate", "--deep", "--json", str(wrong), env=env)
    data = json.loads(refused.stdout)
    assert refused.returncode == 1 and data["valid"] is True
    assert data["inputs"]["problems"] == [
        "tuned prefix 'nothing.' matches no tensor of the base: check `finetune.tuned`"
    ]
    assert data["inputs"]["base_weights"] == "headers only"


@pytest.mark.parametrize("broken", ["finetune", "keep_files"])
def test_local_paths_are_checked_before_anything_is_fetched(
    broken: str,
    tmp_path: Path,
    hub: LocalHub,
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
) -> None:
    finetune = tmp_path / "missing" if broken == "finetune" else remote_trainer_output
    extra = {"finetune": {"keep_files": ["notes.md"]}} if broken == "keep_files" else None
    manifest = write_manifest(tmp_path, published_remote_base, finetune, REMOTE_TUNED, extra=extra)
    hub.clear_log()
    for command in ("plan", "build"):
        result = run_cli(command, str(manifest), env=cli_env(hub, tmp_path / "hf"))
        assert result.returncode == 1
        expected = (
            f"error: fine-tune folder {finetune} does not exist: check `finetune.path`"
            if broken == "finetune"
            else f"error: finetune.keep_files names notes.md, which {finetune} does not have: "
            "check `finetune.keep_files`"
        )
        assert result.stderr.strip().splitlines()[-1] == expected
    assert hub.requests(repo_id=published_remote_base.repo_id) == []


def test_doctor_reads_a_sample_not_the_base(
    tmp_path: Path, hub: LocalHub, big_base: PublishedModel, remote_trainer_output: Path
) -> None:
    hub.clear_log()
    result = run_cli(
        "doctor",
        str(remote_trainer_output),
        "--base",
        f"{big_base.repo_id}@{big_base.sha}",
        env=cli_env(hub, tmp_path / "hf"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "changed parts (declare them as finetune.tuned): resampler., vpm." in result.stderr
    assert "compared on a sample of each tensor's values" in result.stderr
    served, total = weight_bytes_served(hub, big_base)
    assert served < total / 100, f"{served} of {total} weight bytes fetched"
    assert "tuned:\n  - resampler.\n  - vpm." in result.stdout


# ------------------------------------------------------------------------------------- the range reader's guards


class _Server:
    """A file server that answers range requests well or badly (a misconfigured proxy or mirror)."""

    def __init__(self, body: bytes, *, honour_range: bool = True, short: bool = False) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _head(self, status: int, length: int) -> None:
                self.send_response(status)
                self.send_header("X-Repo-Commit", "a" * 40)
                self.send_header("ETag", '"etag"')
                self.send_header("Content-Length", str(length))
                self.end_headers()

            def do_HEAD(self) -> None:
                self._head(200, len(outer.body))

            def do_GET(self) -> None:
                wanted = self.headers.get("Range", "")
                if not (outer.honour_range and wanted.startswith("bytes=")):
                    self._head(200, len(outer.body))
                    self.wfile.write(outer.body)
                    return
                start, end = (int(x) for x in wanted[len("bytes=") :].split("-"))
                part = outer.body[start : end + 1][: 3 if outer.short else None]
                self._head(206, len(part))
                self.wfile.write(part)

        self.body, self.honour_range, self.short = body, honour_range, short
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _header_via(server: _Server, size: int | None = None) -> str:
    from hubsync.errors import BaseResolutionError
    from hubsync.remote import RemoteFiles

    name = "model.safetensors"
    remote = RemoteFiles("my-org/x", "a" * 40, {name: size or len(server.body)}, endpoint=server.endpoint)
    try:
        with pytest.raises(BaseResolutionError) as raised:
            remote.header(Path("/nowhere") / name)
    finally:
        server.close()
    return raised.value.one_line()


def test_a_server_that_ignores_the_range_is_refused_not_read_to_the_end() -> None:
    message = _header_via(_Server(b"\x10" + b"\0" * 7 + b"x" * 1_000_000, honour_range=False))
    assert message.startswith(
        "the Hub answered a range request for model.safetensors of my-org/x with the whole file: "
    )


def test_a_short_answer_to_a_range_request_is_refused() -> None:
    message = _header_via(_Server(b"\x10" + b"\0" * 7 + b"{}" + b" " * 14, short=True))
    assert message.startswith("the Hub sent 3 bytes of model.safetensors where 8 were asked for")


def test_a_corrupt_length_prefix_is_refused_before_it_is_read() -> None:
    message = _header_via(_Server(b"\xff" * 8 + b"x" * 100))
    assert message.startswith("model.safetensors of my-org/x has a corrupt header (length prefix ")


def test_plan_offline_without_the_weights_in_the_cache_says_what_to_do(
    tmp_path: Path, hub: LocalHub, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    manifest = write_manifest(tmp_path, published_remote_base, remote_trainer_output, REMOTE_TUNED)
    env = cli_env(hub, tmp_path / "hf")
    assert run_cli("plan", str(manifest), env=env).returncode == 0  # caches the non-weight files only
    offline = run_cli("plan", str(manifest), env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 1
    assert offline.stderr.strip().splitlines()[-1] == (
        f"error: the weights of {published_remote_base.repo_id}@{published_remote_base.sha[:12]} are not in the "
        "local cache and HF_HUB_OFFLINE=1: their headers are read from the Hub: unset HF_HUB_OFFLINE, or "
        "download the base once online"
    )
