"""Verify stage: a good build passes; each kind of broken build fails with its own clear message."""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from hubsync import tensors as T
from hubsync.build import build
from hubsync.errors import VerifyError
from hubsync.record import FileEntry, hash_files, load, save, verification_gate
from hubsync.testing.models import PublishedModel
from hubsync.verify import verify
from tests.cli import run_cli
from tests.test_build import REMOTE_TUNED, write_manifest

# one xdist worker runs this whole module, so its module- and session-scoped fixtures are made once
pytestmark = [pytest.mark.xdist_group("test_verify")]


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory,
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
) -> Path:
    root = tmp_path_factory.mktemp("verify")
    out = build(
        write_manifest(root, published_remote_base, remote_trainer_output, REMOTE_TUNED),
        record_last_build=False,
    ).output
    assert verify(out).passed
    return out


@pytest.fixture
def copy(built: Path, tmp_path: Path) -> Path:
    target = tmp_path / "build"
    shutil.copytree(built, target)
    return target


def failed(folder: Path) -> dict[str, str]:
    report = verify(folder, trust_remote_code=True)
    assert not report.passed
    return {c.name: c.detail for c in report.checks if c.ok is False}


def rerecord(folder: Path) -> None:
    """Make hubsync.json describe the folder as it is now: a build that came out this way (a broken build),
    rather than a good build edited afterwards (which the hash check catches before anything else runs)."""
    record = load(folder)
    current = hash_files(folder)
    files = {p: FileEntry(sha, (folder / p).stat().st_size, "base") for p, sha in current.items()}
    save(folder, replace(record, files=files, verification=None))


def overwrite_tensor(folder: Path, name: str, value: torch.Tensor) -> None:
    """Replace one tensor's bytes in place (same dtype and shape), as a bad tool might."""
    info = T.list_checkpoint(folder).tensors[name]
    assert isinstance(info, T.TensorInfo)
    data = value.to(T.torch_dtype(info.dtype)).contiguous().view(torch.uint8).numpy().tobytes()
    with open(info.file, "r+b") as f:
        f.seek(info.absolute_range[0])
        f.write(data)


def test_good_build_passes_and_is_recorded(built: Path) -> None:
    record = json.loads((built / "hubsync.json").read_text())
    verification = record["verification"]
    assert verification["passed"] is True
    assert {"torch", "transformers", "hubsync"} <= set(verification["versions"])
    assert set(verification["files_sha256"]) == {p.name for p in built.iterdir() if p.name != "hubsync.json"}
    assert "Verification **passed** on `cpu`" in (built / "README.md").read_text()
    verification_gate(built)


def test_a_copied_folder_verifies_the_same_way(copy: Path) -> None:
    assert verify(copy, trust_remote_code=True).passed


def test_a_copied_folder_runs_no_code_unless_told(copy: Path) -> None:
    report = verify(copy)  # no manifest beside it and no flag: the folder's own record never grants trust
    assert not report.passed
    check = report.check("model loads")
    assert check is not None and "trust_remote_code" in check.detail


def test_processor_config_removed(copy: Path) -> None:
    (copy / "preprocessor_config.json").unlink()
    rerecord(copy)
    found = failed(copy)
    assert found["files present"] == "1 file(s) of the base revision are missing: preprocessor_config.json"
    assert found["processor"].startswith(
        "AutoProcessor returns a bare MiniCPMVTokenizerFast, not a processor"
    )


def test_py_file_removed(copy: Path) -> None:
    (copy / "processing_minicpmv.py").unlink()
    found = failed(copy)
    assert found["files present"] == "1 file(s) of the base revision are missing: processing_minicpmv.py"
    assert found["auto_map is local"] == (
        "preprocessor_config.json: 'processing_minicpmv.MiniCPMVProcessor' needs processing_minicpmv.py, "
        "which is not in the folder"
    )


def test_repo_prefixed_auto_map_restored(copy: Path) -> None:
    config = json.loads((copy / "config.json").read_text())
    config["auto_map"]["AutoModel"] = "someone/else--modeling_minicpmv.MiniCPMV"
    (copy / "config.json").write_text(json.dumps(config, indent=2))
    found = failed(copy)
    assert found["auto_map is local"] == (
        "config.json: 'someone/else--modeling_minicpmv.MiniCPMV' runs code from another repo (the 'repo--' form), "
        "not the local files"
    )


def test_tuned_tensor_reverted_to_base(copy: Path, published_remote_base: PublishedModel) -> None:
    name = "resampler.query"
    base_value = T.load_tensor(T.list_checkpoint(published_remote_base.local_dir).tensors[name])
    overwrite_tensor(copy, name, base_value)
    found = failed(copy)
    assert found["tuned tensors are the fine-tune's"] == (
        f"{name} equals the base (the fine-tune's change is not in the build)"
    )


def test_llm_tensor_perturbed(copy: Path) -> None:
    name = "llm.model.norm.weight"
    info = T.list_checkpoint(copy).tensors[name]
    overwrite_tensor(copy, name, T.load_tensor(info) + 1)
    rerecord(copy)
    found = failed(copy)
    assert found["other tensors are the base's"] == (
        f"1 tensor(s) outside the tuned parts differ from the base: {name}"
    )
    assert found["frozen parts untouched"].startswith("text-only logits differ from the base's by ")


def test_vision_tensor_with_nan(copy: Path) -> None:
    name = "vpm.post_layernorm.weight"
    value = T.load_tensor(T.list_checkpoint(copy).tensors[name]).clone()
    value[0] = float("nan")
    overwrite_tensor(copy, name, value)
    found = failed(copy)
    assert found["no NaN or Inf"] == f"NaN or Inf in 1 tuned tensor(s): {name}"


def test_shard_truncated(copy: Path) -> None:
    shard = copy / "model-00001-of-00003.safetensors"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    found = failed(copy)
    assert found["weights readable"].startswith("model-00001-of-00003.safetensors is truncated")
    assert (
        "re-download or re-save it" in found["weights readable"] or "truncated" in found["weights readable"]
    )


def test_index_entry_points_at_the_wrong_shard(copy: Path) -> None:
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    index["weight_map"]["resampler.query"] = "model-00001-of-00003.safetensors"
    (copy / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    found = failed(copy)
    assert found["weights readable"] == (
        "model.safetensors.index.json maps resampler.query to model-00001-of-00003.safetensors, which does not "
        "hold it: regenerate the index"
    )


def test_file_edited_after_verification(copy: Path) -> None:
    generation = copy / "generation_config.json"
    generation.write_text(generation.read_text().replace("}", ', "temperature": 9.0}', 1))
    with pytest.raises(
        VerifyError, match="generation_config.json changed after verification: run `hubsync verify"
    ):
        verification_gate(copy)
    found = failed(copy)
    assert found["files match hubsync.json"] == "generation_config.json changed since the build"


def test_failed_verification_blocks_the_gate(copy: Path) -> None:
    (copy / "preprocessor_config.json").unlink()
    rerecord(copy)
    verify(copy, trust_remote_code=True)
    with pytest.raises(VerifyError, match=r"the verification of .* failed \(files present: "):
        verification_gate(copy)


def test_never_verified_blocks_the_gate(copy: Path) -> None:
    record = json.loads((copy / "hubsync.json").read_text())
    record["verification"] = None
    (copy / "hubsync.json").write_text(json.dumps(record))
    with pytest.raises(VerifyError, match="was never verified: run `hubsync verify"):
        verification_gate(copy)


def test_a_verification_that_never_loaded_the_model_blocks_the_gate(copy: Path) -> None:
    report = verify(copy, run_models=False)  # files and weights only: passes, and is recorded
    assert report.passed
    with pytest.raises(VerifyError, match="never loaded the model .*: run `hubsync verify"):
        verification_gate(copy)
    assert verify(copy, trust_remote_code=True).passed
    verification_gate(copy)


def test_verify_cli_json_and_exit_codes(copy: Path, hub: Any, tmp_path: Path) -> None:
    import os

    env = {**os.environ, **hub.client_env(tmp_path / "hf")}
    good = run_cli("verify", "--json", "--trust-remote-code", str(copy), env=env, timeout=300)
    assert good.returncode == 0, good.stderr
    assert json.loads(good.stdout)["passed"] is True
    (copy / "processing_minicpmv.py").unlink()
    bad = run_cli("verify", "--trust-remote-code", str(copy), env=env, timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: verification failed: files match hubsync.json: processing_minicpmv.py is missing"
    )
    assert "FAIL  files present" in bad.stdout


def test_header_bytes_of_truncated_shard_are_reported_not_crashed(copy: Path) -> None:
    shard = copy / "model-00002-of-00003.safetensors"
    shard.write_bytes(struct.pack("<Q", 10**12))
    assert "weights readable" in failed(copy)


def test_changed_code_is_never_run(copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    code = copy / "tokenization_minicpmv_fast.py"
    code.write_text(f"open({str(marker)!r}, 'w').close()\n" + code.read_text())
    found = failed(copy)  # the record no longer matches: nothing is imported
    assert found["files match hubsync.json"] == "tokenization_minicpmv_fast.py changed since the build"
    assert not marker.exists()
    rerecord(copy)  # even when the record says so, code that is not the pinned base's never runs
    found = failed(copy)
    assert found["code is the base's"] == (
        "tokenization_minicpmv_fast.py differs from the base revision's: only the pinned base's code may run; "
        "rebuild the folder"
    )
    assert not marker.exists()
