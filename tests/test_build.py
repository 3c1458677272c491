"""Build stage, end to end on the tiny fixtures: the output loads, tuned tensors come from the fine-tune, every
other byte from the pinned base; and every building entry of the failure catalogue (1-11) has its message."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from hubsync import tensors as T
from hubsync.build import build, prepare
from hubsync.errors import BuildError, HubsyncError, PlanError
from hubsync.testing.models import PublishedModel
from hubsync.verify import verify
from hubsync.write import OutputLock
from tests.cli import run_cli

REMOTE_TUNED = ["vpm.", "resampler."]
NATIVE_TUNED = ["vision_tower.", "multi_modal_projector."]


def write_manifest(
    tmp_path: Path,
    base: PublishedModel,
    finetune: Path,
    tuned: list[str] | None,
    *,
    revision: str | None = None,
    trust: bool = True,
    extra: dict[str, Any] | None = None,
    name: str = "manifest.yaml",
) -> Path:
    import yaml

    data: dict[str, Any] = {
        "base": {"repo": base.repo_id, "revision": revision or base.sha},
        "finetune": {"path": str(finetune)},
        "output": {"dir": "out"},
        "verify": {"device": "cpu", "trust_remote_code": trust},
    }
    if tuned is not None:
        data["finetune"]["tuned"] = tuned
    for section, values in (extra or {}).items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def problems(manifest: Path, **kwargs: Any) -> list[str]:
    return list(prepare(manifest, **kwargs).plan.problems)


def notes(manifest: Path) -> list[str]:
    return list(prepare(manifest).plan.notes)


def assert_build_is_faithful(out: Path, base_dir: Path, finetune_dir: Path, prefixes: list[str]) -> None:
    """Tuned tensors equal the fine-tune cast to the base dtype; all else byte-identical; untouched shards too."""
    base = T.list_checkpoint(base_dir)
    built = T.list_checkpoint(out)
    record = json.loads((out / "hubsync.json").read_text())
    tuned = record["tuned_tensors"]
    assert tuned, "no tensor was taken from the fine-tune"
    ft = T.list_checkpoint(finetune_dir)
    for name, info in built.tensors.items():
        b = base.tensors[name]
        assert (info.dtype, info.shape) == (b.dtype, b.shape)
        if name in tuned:
            assert any(name.startswith(p) for p in prefixes)
            expected = T.load_tensor(ft.tensors[tuned[name]["from"]]).to(T.torch_dtype(b.dtype))
            assert torch.equal(T.load_tensor(info), expected), name
        else:
            assert T.tensor_bytes_equal(b, info), name
    tuned_shards = {v["shard"] for v in tuned.values()}
    for shard in base.files:
        if shard.name not in tuned_shards:
            assert T.sha256_file(out / shard.name) == T.sha256_file(shard), (
                f"{shard.name} is not byte-identical"
            )


# --- the fixtures build, load and verify ---------------------------------------------------------------------

REMOTE_VARIANTS = {
    "fp32 single file": {},
    "bf16": {"dtype": "bfloat16"},
    "DDP module. prefix": {"key_prefix": "module."},
    "torch.compile _orig_mod. prefix, sharded": {"key_prefix": "_orig_mod.", "sharded": True},
    "stray shard": {"sharded": True, "stray_shard": True},
}


@pytest.mark.parametrize("variant", sorted(REMOTE_VARIANTS))
def test_remote_code_fixture_builds_loads_and_verifies(
    variant: str, tmp_path: Path, published_remote_base: PublishedModel, trainer_output_factory: Any
) -> None:
    ft = trainer_output_factory("remote", **REMOTE_VARIANTS[variant])
    manifest = write_manifest(tmp_path, published_remote_base, ft, REMOTE_TUNED)
    result = build(manifest, record_last_build=False)
    out = result.output
    assert_build_is_faithful(out, published_remote_base.local_dir, ft, REMOTE_TUNED)
    report = verify(out)
    assert report.passed, [(c.name, c.detail) for c in report.failures]
    names = {c.name for c in report.checks if c.ok}
    assert {"processor", "tuned parts are live", "frozen parts untouched", "generation"} <= names
    if REMOTE_VARIANTS[variant].get("stray_shard"):
        assert any("stray shard" in n for n in result.plan.notes)


def test_seed_error_is_gone_after_build(
    tmp_path: Path, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    """The foundation's seed error (chat() -> processor.tokenizer) does not happen on the built folder."""
    from transformers import AutoModel, AutoProcessor, AutoTokenizer

    from hubsync.testing.models import make_test_image

    out = build(
        write_manifest(tmp_path, published_remote_base, remote_trainer_output, REMOTE_TUNED),
        record_last_build=False,
    ).output
    processor = AutoProcessor.from_pretrained(str(out), trust_remote_code=True)
    assert type(processor).__name__ == "MiniCPMVProcessor"
    model = AutoModel.from_pretrained(str(out), trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    text = model.chat(
        image=make_test_image(),
        msgs=[{"role": "user", "content": "Describe the image."}],
        tokenizer=tokenizer,
    )
    assert isinstance(text, str)
    config = json.loads((out / "config.json").read_text())
    assert all("--" not in v for v in config["auto_map"].values())
    assert "torch_dtype" in config and "dtype" not in config, (
        "config.json must keep the base's dtype key form"
    )


@pytest.mark.parametrize(
    "options", [{}, {"sharded": True}, {"key_style": "runtime"}], ids=["single", "sharded", "runtime-names"]
)
def test_native_fixture_builds_loads_and_verifies(
    options: dict[str, Any],
    tmp_path: Path,
    published_native_base: PublishedModel,
    trainer_output_factory: Any,
) -> None:
    ft = trainer_output_factory("native", **options)
    manifest = write_manifest(tmp_path, published_native_base, ft, NATIVE_TUNED, trust=False)
    out = build(manifest, record_last_build=False).output
    assert_build_is_faithful(out, published_native_base.local_dir, ft, NATIVE_TUNED)
    report = verify(out)
    assert report.passed, [(c.name, c.detail) for c in report.failures]
    assert not (out / "training_args.bin").exists() and not (out / "trainer_state.json").exists()


def test_rebuild_is_byte_identical_and_hardlink_mode(
    tmp_path: Path, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    manifest = write_manifest(tmp_path, published_remote_base, remote_trainer_output, REMOTE_TUNED)
    first = {w.path: w.sha256 for w in build(manifest, record_last_build=False).files}
    first["hubsync.json"] = T.sha256_file(tmp_path / "out" / "hubsync.json")
    second = {w.path: w.sha256 for w in build(manifest, record_last_build=False).files}
    second["hubsync.json"] = T.sha256_file(tmp_path / "out" / "hubsync.json")
    assert first == second

    linked = write_manifest(
        tmp_path,
        published_remote_base,
        remote_trainer_output,
        REMOTE_TUNED,
        extra={"output": {"dir": "linked", "link": "hardlink"}},
        name="linked.yaml",
    )
    result = build(linked, record_last_build=False)
    untouched = [f for f in result.plan.files if f.action == "copy" and f.path.endswith(".safetensors")]
    assert untouched
    for f in untouched:
        cached = (Path(prepare(linked).base.folder) / f.path).resolve()
        assert os.stat(result.output / f.path).st_ino == os.stat(cached).st_ino


# --- failure catalogue, building entries 1-11 ---------------------------------------------------------------


def test_catalogue_1_2_3_missing_processor_code_tokenizer_files_are_restored(
    tmp_path: Path, published_remote_base: PublishedModel, trainer_output_factory: Any
) -> None:
    ft = trainer_output_factory("remote")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (ft / name).unlink(missing_ok=True)
    manifest = write_manifest(tmp_path, published_remote_base, ft, REMOTE_TUNED)
    found = notes(manifest)
    assert any(
        n.startswith("processor file(s) missing from the fine-tune, restored from the base:")
        and "preprocessor_config.json" in n
        and "processing_minicpmv.py" in n
        for n in found
    ), found
    assert any(
        n.startswith("remote code file(s) missing from the fine-tune, restored from the base:")
        and "modeling_minicpmv.py" in n
        for n in found
    ), found
    assert any(
        n.startswith("tokenizer file(s) missing from the fine-tune, restored from the base:")
        and "tokenizer.json" in n
        for n in found
    ), found
    assert any("auto_map points at another repo's code ('repo--' prefix" in n for n in found), found
    out = build(manifest, record_last_build=False).output
    for name in (
        "preprocessor_config.json",
        "processing_minicpmv.py",
        "modeling_minicpmv.py",
        "tokenizer.json",
    ):
        assert (out / name).read_bytes() == (published_remote_base.local_dir / name).read_bytes()


def test_catalogue_2_base_auto_map_with_foreign_code_is_refused(
    tmp_path: Path, remote_base_dir: Path, trainer_output_factory: Any
) -> None:
    base = tmp_path / "base"
    shutil.copytree(remote_base_dir, base)
    (base / "processing_minicpmv.py").unlink()
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"base: {{path: {base}}}\nfinetune: {{path: {trainer_output_factory('remote')}, tuned: [vpm., resampler.]}}\noutput: {{dir: out}}\n"
    )
    found = problems(manifest)
    assert any(
        "preprocessor_config.json: auto_map entry 'processing_minicpmv.MiniCPMVProcessor' needs "
        "processing_minicpmv.py, which the base does not ship" in p
        for p in found
    ), found


def test_catalogue_4_fp32_tuned_tensors_are_cast_to_the_base_dtype(
    tmp_path: Path, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    manifest = write_manifest(tmp_path, published_remote_base, remote_trainer_output, REMOTE_TUNED)
    assert any(
        n.endswith("tuned tensor(s) saved as F32, cast to BF16 (the base's dtype)") for n in notes(manifest)
    )
    out = build(manifest, record_last_build=False).output
    assert {i.dtype for i in T.list_checkpoint(out).tensors.values()} == {"BF16"}


def test_catalogue_4_output_dtype_casts_the_whole_model(
    tmp_path: Path, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    manifest = write_manifest(
        tmp_path,
        published_remote_base,
        remote_trainer_output,
        REMOTE_TUNED,
        extra={"output": {"dtype": "float16"}},
    )
    result = build(manifest, record_last_build=False)
    assert {i.dtype for i in T.list_checkpoint(result.output).tensors.values()} == {"F16"}
    assert any("cast from BF16 to F16 (output.dtype: float16)" in n for n in result.plan.notes)
    index = json.loads((result.output / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(
        i.nbytes for i in T.list_checkpoint(result.output).tensors.values()
    )


def test_catalogue_5_wrapper_prefixes_and_renames_are_normalised(
    tmp_path: Path, published_remote_base: PublishedModel, trainer_output_factory: Any
) -> None:
    ft = trainer_output_factory("remote", key_prefix="module._orig_mod.")
    manifest = write_manifest(tmp_path, published_remote_base, ft, REMOTE_TUNED)
    found = notes(manifest)
    assert any(
        "fine-tune tensor name(s) normalised onto the base's names (stripped or renamed: module.)" in n
        for n in found
    ), found


def test_catalogue_5_manifest_rename_rules(
    tmp_path: Path, published_remote_base: PublishedModel, trainer_output_factory: Any
) -> None:
    ft = trainer_output_factory("remote")
    state = load_file(str(ft / "model.safetensors"))
    save_file(
        {k.replace("vpm.", "vision_model.", 1) if k.startswith("vpm.") else k: v for k, v in state.items()},
        str(ft / "model.safetensors"),
    )
    # Without a rule the rename is inferred from names and shapes, and the plan says so.
    bare = prepare(write_manifest(tmp_path, published_remote_base, ft, REMOTE_TUNED)).plan
    assert bare.problems == ()
    assert "inferred rename: vision_model. -> vpm. (37 tensors)" in bare.notes
    ruled = write_manifest(
        tmp_path,
        published_remote_base,
        ft,
        REMOTE_TUNED,
        extra={"finetune": {"rename": [{"from": "^vision_model\\.", "to": "vpm."}]}},
        name="r.yaml",
    )
    assert problems(ruled) == []
    assert not any(n.startswith("inferred rename") for n in notes(ruled))


def test_catalogue_6_unknown_tensor_and_wrong_shape(
    tmp_path: Path, published_remote_base: PublishedModel, trainer_output_factory: Any
) -> None:
    ft = trainer_output_factory("remote")
    state = load_file(str(ft / "model.safetensors"))
    state["vpm.extra_head.weight"] = torch.zeros(2, 2)
    name = next(k for k in state if k.startswith("resampler.") and state[k].dim() == 2)
    state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
    save_file(state, str(ft / "model.safetensors"))
    manifest = write_manifest(tmp_path, published_remote_base, ft, REMOTE_TUNED)
    found = problems(manifest)
    assert (
        "fine-tune tensor vpm.extra_head.weight does not map onto the base: no tensor of that name in the base"
        in found
    )
    assert any(p.startswith(f"fine-tune tensor {name} does not map onto the base: shape [") for p in found), (
        found
    )
    with pytest.raises(PlanError, match="does not map onto the base"):
        build(manifest, record_last_build=False)


def test_catalogue_7_untuned_change_stops_unless_allowed(
    tmp_path: Path, published_remote_base: PublishedModel, trainer_output_factory: Any
) -> None:
    ft = trainer_output_factory("remote", also_perturb="llm.")
    manifest = write_manifest(tmp_path, published_remote_base, ft, REMOTE_TUNED)
    found = problems(manifest)
    assert any(
        "outside `finetune.tuned` differ from the base (under llm." in p and "that part was not frozen" in p
        for p in found
    ), found
    result = build(manifest, allow_untuned_changes=True, record_last_build=False)
    assert any("taken from the base (--allow-untuned-changes)" in n for n in result.plan.notes)
    base = T.list_checkpoint(published_remote_base.local_dir)
    built = T.list_checkpoint(result.output)
    assert all(
        T.tensor_bytes_equal(base.tensors[n], built.tensors[n]) for n in built.tensors if n.startswith("llm.")
    )


def test_catalogue_7_fp16_round_trip_is_not_a_change(
    tmp_path: Path, remote_base_dir: Path, trainer_output_factory: Any
) -> None:
    """A frozen tensor whose only difference is the trip through the training dtype counts as unchanged."""
    ft = trainer_output_factory("remote", dtype="float16")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"base: {{path: {remote_base_dir}}}\nfinetune: {{path: {ft}, tuned: [vpm., resampler.]}}\noutput: {{dir: out}}\n"
    )
    assert problems(manifest) == []


def test_catalogue_8_tuned_part_identical_to_the_base(
    tmp_path: Path, published_remote_base: PublishedModel, trainer_output_factory: Any
) -> None:
    ft = trainer_output_factory("remote", tune=("vpm.",))
    manifest = write_manifest(tmp_path, published_remote_base, ft, REMOTE_TUNED)
    assert (
        "tuned prefix 'resampler.' is identical to the base (no tensor differs): wrong checkpoint, "
        "or the change vanished in bfloat16"
    ) in problems(manifest)


def test_catalogue_8_change_that_vanished_in_bf16(
    tmp_path: Path, published_remote_base: PublishedModel, trainer_output_factory: Any
) -> None:
    ft = trainer_output_factory("remote", tune=("vpm.",))
    state = load_file(str(ft / "model.safetensors"))
    for key in [k for k in state if k.startswith("resampler.")]:
        state[key] = state[key] * (1 + 1e-5)  # far below bf16's 8 bits of mantissa
    save_file(state, str(ft / "model.safetensors"))
    manifest = write_manifest(tmp_path, published_remote_base, ft, REMOTE_TUNED)
    assert any(
        p.startswith("tuned prefix 'resampler.' is identical to the base (")
        and "changed only below bfloat16 resolution): wrong checkpoint, or the change vanished in bfloat16"
        in p
        for p in problems(manifest)
    )


def test_catalogue_9_nan_in_a_tuned_tensor(
    tmp_path: Path, published_remote_base: PublishedModel, trainer_output_factory: Any
) -> None:
    ft = trainer_output_factory("remote")
    state = load_file(str(ft / "model.safetensors"))
    name = sorted(k for k in state if k.startswith("vpm.") and state[k].is_floating_point())[0]
    state[name][..., 0] = float("nan")
    save_file(state, str(ft / "model.safetensors"))
    manifest = write_manifest(tmp_path, published_remote_base, ft, REMOTE_TUNED)
    assert (
        f"tuned tensor {name} contains NaN or Inf: the training diverged; use an earlier checkpoint"
        in problems(manifest)
    )


def test_catalogue_10_config_drift(
    tmp_path: Path, published_remote_base: PublishedModel, trainer_output_factory: Any
) -> None:
    ft = trainer_output_factory("remote", config_updates={"slice_config": {"max_slice_nums": 2}})
    base_value = json.loads((published_remote_base.local_dir / "config.json").read_text())["slice_config"][
        "max_slice_nums"
    ]
    manifest = write_manifest(tmp_path, published_remote_base, ft, REMOTE_TUNED)
    plan = prepare(manifest).plan
    diff = {d.key: d for d in plan.config_diff}["slice_config.max_slice_nums"]
    assert (diff.base, diff.finetune) == (base_value, 2)
    assert diff.decision == "base value kept (add to finetune.keep_config to keep the fine-tune's)"

    keep = write_manifest(
        tmp_path,
        published_remote_base,
        ft,
        REMOTE_TUNED,
        name="keep.yaml",
        extra={"finetune": {"keep_config": ["slice_config.max_slice_nums"]}},
    )
    out = build(keep, record_last_build=False).output
    assert json.loads((out / "config.json").read_text())["slice_config"]["max_slice_nums"] == 2
    assert json.loads((out / "preprocessor_config.json").read_text())["max_slice_nums"] == 2
    assert verify(out).passed

    pair = write_manifest(
        tmp_path,
        published_remote_base,
        ft,
        REMOTE_TUNED,
        name="pair.yaml",
        extra={"finetune": {"keep_files": ["config.json"]}},
    )
    assert any(
        p.startswith("config.json slice_config.max_slice_nums=2 but preprocessor_config.json max_slice_nums=")
        and "they must agree" in p
        for p in problems(pair)
    )


def test_catalogue_11_branch_is_resolved_once_to_a_sha(
    tmp_path: Path, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    manifest = write_manifest(
        tmp_path, published_remote_base, remote_trainer_output, REMOTE_TUNED, revision="main"
    )
    result = build(manifest, record_last_build=False)
    assert (
        f"base revision 'main' resolved to commit {published_remote_base.sha}; the build uses and records the sha"
        in result.plan.notes
    )
    record = json.loads((result.output / "hubsync.json").read_text())
    assert record["base"] == {
        "repo": published_remote_base.repo_id,
        "revision": "main",
        "sha": published_remote_base.sha,
        "path": None,
    }


def test_undeclared_tuned_lists_changed_prefixes(
    tmp_path: Path, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    manifest = write_manifest(tmp_path, published_remote_base, remote_trainer_output, None)
    assert (
        "`finetune.tuned` is not declared; these prefixes changed: resampler., vpm.. Declare them: "
        "`tuned: ['resampler.', 'vpm.']`"
    ) in problems(manifest)


# --- resolve errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("repo", "revision", "message"),
    [
        ("my-org/does-not-exist", "main", "base repo my-org/does-not-exist was not found: check `base.repo`"),
        (None, "no-such-branch", "revision 'no-such-branch' does not exist in"),
    ],
)
def test_resolve_errors(
    tmp_path: Path,
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
    repo: str | None,
    revision: str,
    message: str,
) -> None:
    manifest = write_manifest(
        tmp_path, published_remote_base, remote_trainer_output, REMOTE_TUNED, revision=revision
    )
    if repo:
        manifest.write_text(manifest.read_text().replace(published_remote_base.repo_id, repo))
    with pytest.raises(HubsyncError, match=message.replace("(", r"\(").replace("`", "`")):
        prepare(manifest)


def test_gated_base(
    tmp_path: Path, hub: Any, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:

    from hubsync.testing.hub import OTHER_TOKEN

    manifest = write_manifest(tmp_path, published_remote_base, remote_trainer_output, REMOTE_TUNED)
    hub.set_gated(published_remote_base.repo_id, True)
    try:
        result = run_cli(
            "plan",
            str(manifest),
            env={**os.environ, **hub.client_env(tmp_path / "hf", token=OTHER_TOKEN)},
            timeout=300,
        )
    finally:
        hub.set_gated(published_remote_base.repo_id, False)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: {published_remote_base.repo_id} is gated: accept its terms on the Hub "
        "with your account, then set HF_TOKEN"
    )


def test_offline_build_from_cache_and_no_network(
    tmp_path: Path, hub: Any, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:

    manifest = write_manifest(
        tmp_path, published_remote_base, remote_trainer_output, REMOTE_TUNED, revision="main"
    )
    env = {**os.environ, **hub.client_env(tmp_path / "hf")}
    run = lambda extra: run_cli(  # noqa: E731
        "-q", "build", "--no-verify", str(manifest), env={**env, **extra}, cwd=tmp_path
    )
    cold_offline = run({"HF_HUB_OFFLINE": "1"})
    assert cold_offline.returncode == 1
    assert "is not in the local cache and HF_HUB_OFFLINE=1: build once online" in cold_offline.stderr
    assert run({}).returncode == 0
    warm_offline = run({"HF_HUB_OFFLINE": "1"})
    assert warm_offline.returncode == 0, warm_offline.stderr
    cold = {"HF_HOME": str(tmp_path / "cold"), "HF_HUB_CACHE": str(tmp_path / "cold" / "hub")}
    unreachable = run({"HF_ENDPOINT": "http://127.0.0.1:9", **cold})
    assert unreachable.returncode == 1
    assert (
        unreachable.stderr.startswith("error: cannot reach the Hub to fetch")
        and "Traceback" not in unreachable.stderr
    )


# --- writing is atomic, locked, and survives failures --------------------------------------------------------


def test_failed_build_leaves_previous_output_untouched(
    tmp_path: Path,
    published_remote_base: PublishedModel,
    remote_trainer_output: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    manifest = write_manifest(tmp_path, published_remote_base, remote_trainer_output, REMOTE_TUNED)
    out = build(manifest, record_last_build=False).output
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    import errno

    real_write = os.write
    calls = {"n": 0}

    def full_disk(fd: int, data: Any) -> int:
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(BuildError, match="no space left on device writing"):
        build(manifest, record_last_build=False)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []


def test_stale_staging_from_a_killed_build_is_cleaned(
    tmp_path: Path, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    stale = tmp_path / ".out.hubsync-staging-99999"
    stale.mkdir()
    (stale / "model-00001-of-00003.safetensors").write_bytes(b"half")
    build(
        write_manifest(tmp_path, published_remote_base, remote_trainer_output, REMOTE_TUNED),
        record_last_build=False,
    )
    assert not stale.exists()


def test_concurrent_build_into_the_same_output_refuses(
    tmp_path: Path, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    manifest = write_manifest(tmp_path, published_remote_base, remote_trainer_output, REMOTE_TUNED)
    with OutputLock(tmp_path / "out"):
        with pytest.raises(BuildError, match=r"another hubsync build or verify is using .*out right now"):
            build(manifest, record_last_build=False)


def test_doctor_diagnoses_and_prints_a_manifest_that_builds(
    tmp_path: Path, hub: Any, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:
    import subprocess
    import sys

    env = {**os.environ, **hub.client_env(tmp_path / "hf")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hubsync",
            "doctor",
            str(remote_trainer_output),
            "--base",
            published_remote_base.repo_id,
        ],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for expected in (
        "processor file preprocessor_config.json is missing from the fine-tune",
        "remote code file modeling_minicpmv.py is missing from the fine-tune",
        "auto_map points at another repo's code",
        "saved as F32 while the base is BF16",
        "trainer leftovers that must not be published: trainer_state.json, training_args.bin",
        "changed parts (declare them as finetune.tuned): resampler., vpm.",
        "no revision given for",
    ):
        assert expected in result.stderr, expected
    (tmp_path / "manifest.yaml").write_text(result.stdout)
    built = run_cli("-q", "build", "manifest.yaml", env=env, cwd=tmp_path, timeout=300)
    assert built.returncode == 0, built.stderr


def test_pytorch_bin_fine_tune_builds(
    tmp_path: Path, published_remote_base: PublishedModel, trainer_output_factory: Any
) -> None:
    ft = trainer_output_factory("remote")
    state = load_file(str(ft / "model.safetensors"))
    torch.save(state, ft / "pytorch_model.bin")
    (ft / "model.safetensors").unlink()
    manifest = write_manifest(tmp_path, published_remote_base, ft, REMOTE_TUNED)
    out = build(manifest, record_last_build=False).output
    assert_build_is_faithful(out, published_remote_base.local_dir, ft, REMOTE_TUNED)
    assert not (out / "pytorch_model.bin").exists()


def test_plan_cli_table_and_json(
    tmp_path: Path, hub: Any, published_remote_base: PublishedModel, remote_trainer_output: Path
) -> None:

    manifest = write_manifest(tmp_path, published_remote_base, remote_trainer_output, REMOTE_TUNED)
    env = {**os.environ, **hub.client_env(tmp_path / "hf")}
    table = run_cli("plan", str(manifest), env=env, timeout=300)
    assert table.returncode == 0, table.stderr
    assert (
        "model-00003-of-00003.safetensors  base       rewrite-shard  50 tuned tensor(s) from the fine-tune"
        in table.stdout
    )
    assert table.stdout.rstrip().endswith("ok: the plan breaks no rule")
    as_json = run_cli("plan", "--json", str(manifest), env=env, timeout=300)
    plan = json.loads(as_json.stdout)
    assert plan["base_sha"] == published_remote_base.sha and plan["problems"] == []
    assert {p["prefix"] for p in plan["prefixes"]} == set(REMOTE_TUNED)
    assert len([t for t in plan["tensors"] if t["source"] == "finetune"]) == 50
    assert not (tmp_path / "out").exists(), "plan must not write anything"
    broken = write_manifest(tmp_path, published_remote_base, remote_trainer_output, None, name="broken.yaml")
    refused = run_cli("plan", str(broken), env=env, timeout=300)
    assert refused.returncode == 1 and "! `finetune.tuned` is not declared" in refused.stdout
