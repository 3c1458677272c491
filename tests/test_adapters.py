"""LoRA adapters and other trainer outputs as fine-tune sources (issue 7), on real PEFT files.

The merged tensors are compared with PEFT's own `merge_and_unload()` bit for bit: hubsync computes W + s·B·A in
float32 with the operations PEFT uses, in the same order, and rounds once to bf16, as PEFT's in-place add does.
The tolerance is therefore zero (0 ULP); any difference is a bug, not noise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

pytest.importorskip("peft")

from hubsync import tensors as T  # noqa: E402
from hubsync.adapters import is_adapter_folder, read_adapter  # noqa: E402
from hubsync.build import build, prepare  # noqa: E402
from hubsync.errors import FinetuneError, PlanError  # noqa: E402
from hubsync.finetune import locate  # noqa: E402
from hubsync.manifest import FinetuneSpec  # noqa: E402
from hubsync.testing.lora import (  # noqa: E402
    make_deepspeed_checkpoint,
    make_gpt2_base,
    make_lora_output,
    peft_merged_state,
)
from hubsync.testing.models import PublishedModel  # noqa: E402
from hubsync.verify import render_report, verify  # noqa: E402

# one xdist worker runs this whole module, so its module- and session-scoped fixtures are made once
pytestmark = [pytest.mark.xdist_group("test_adapters")]

NATIVE_PARTS = ("language_model.", "multi_modal_projector.", "vision_tower.")
REMOTE_PARTS = ("llm.", "resampler.", "vpm.")


def write_manifest(
    tmp_path: Path,
    base: PublishedModel | Path,
    finetune: Path,
    *,
    name: str = "manifest.yaml",
    **finetune_keys: Any,
) -> Path:
    base_section = (
        {"path": str(base)} if isinstance(base, Path) else {"repo": base.repo_id, "revision": base.sha}
    )
    data = {
        "base": base_section,
        "finetune": {"path": str(finetune), **finetune_keys},
        "output": {"dir": f"out-{Path(name).stem}"},
        "verify": {"device": "cpu", "trust_remote_code": True},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def config_of(base_dir: Path) -> dict[str, Any]:
    return json.loads((base_dir / "config.json").read_text())


def adapter(folder: Path, base_dir: Path, **kwargs: Any) -> Any:
    return read_adapter(folder, T.list_checkpoint(base_dir).tensors, config_of(base_dir), **kwargs)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def assert_equals_peft(
    built: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], base_dir: Path
) -> int:
    """Every tensor bit-identical to PEFT's merge; returns how many differ from the base (the merged ones)."""
    base = T.list_checkpoint(base_dir)
    assert set(built) == set(reference) == set(base.tensors)
    changed = 0
    for name, tensor in built.items():
        assert tensor.dtype == reference[name].dtype, name
        assert torch.equal(bits(tensor), bits(reference[name])), f"{name} differs from PEFT's merge"
        changed += not torch.equal(bits(tensor), bits(T.load_tensor(base.tensors[name])))
    return changed


@pytest.fixture(scope="module")
def native_lora(
    tmp_path_factory: pytest.TempPathFactory, native_base_dir: Path, published_native_base: PublishedModel
) -> Path:
    return make_lora_output(
        native_base_dir,
        tmp_path_factory.mktemp("native-lora") / "lora",
        base_name=published_native_base.repo_id,
    )


@pytest.fixture(scope="module")
def remote_lora(
    tmp_path_factory: pytest.TempPathFactory, remote_base_dir: Path, published_remote_base: PublishedModel
) -> Path:
    return make_lora_output(
        remote_base_dir,
        tmp_path_factory.mktemp("remote-lora") / "lora",
        base_name=published_remote_base.repo_id,
    )


# --------------------------------------------------------------------------------------------- end to end


def test_native_lora_builds_verifies_and_equals_peft_merge(
    tmp_path: Path, native_lora: Path, native_base_dir: Path, published_native_base: PublishedModel
) -> None:
    manifest = write_manifest(tmp_path, published_native_base, native_lora)
    result = build(manifest, record_last_build=False)
    out = result.output
    # tuned prefixes come from the adapter: LoRA targets in the LLM and the vision tower, the projector whole
    assert tuple(p.prefix for p in result.plan.prefixes) == NATIVE_PARTS
    assert not any("trained on" in n for n in result.plan.notes)  # the adapter names this very base
    assert not any(is_adapter_folder(out) or p.name.startswith("adapter_") for p in out.iterdir())

    reference = peft_merged_state(native_base_dir, native_lora, tmp_path)
    built = {n: T.load_tensor(i) for n, i in T.list_checkpoint(out).tensors.items()}
    assert (
        assert_equals_peft(built, reference, native_base_dir) == 26 + 4
    )  # 26 merged weights, 4 projector tensors

    report = verify(out)
    assert report.passed, render_report(report)
    assert next(c for c in report.checks if c.name == "tuned parts are live").ok

    # The folder loads with plain transformers: PEFT is never imported.
    probe = (
        "import sys, torch; from transformers import LlavaForConditionalGeneration as M; "
        f"m = M.from_pretrained({str(out)!r}); assert 'peft' not in sys.modules, 'peft was imported'; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_remote_code_lora_builds_verifies_and_equals_peft_merge(
    tmp_path: Path, remote_lora: Path, remote_base_dir: Path, published_remote_base: PublishedModel
) -> None:
    manifest = write_manifest(tmp_path, published_remote_base, remote_lora, tuned=list(REMOTE_PARTS))
    out = build(manifest, record_last_build=False).output
    reference = peft_merged_state(remote_base_dir, remote_lora, tmp_path)
    built = {n: T.load_tensor(i) for n, i in T.list_checkpoint(out).tensors.items()}
    assert assert_equals_peft(built, reference, remote_base_dir) == 24 + 13  # merges + the whole resampler
    assert not (out / "adapter_config.json").exists()
    for restored in ("preprocessor_config.json", "processing_minicpmv.py", "modeling_minicpmv.py"):
        assert (out / restored).is_file(), restored

    report = verify(out)
    assert report.passed, render_report(report)
    live = next(c for c in report.checks if c.name == "tuned parts are live")
    assert live.ok, live.detail


# --------------------------------------------------------------------------------------------- scaling rules


def test_rslora_rank_and_alpha_patterns_equal_peft(tmp_path: Path, native_base_dir: Path) -> None:
    folder = make_lora_output(
        native_base_dir,
        tmp_path / "lora",
        target_modules=("q_proj", "v_proj", "fc1"),
        modules_to_save=(),
        r=4,
        lora_alpha=8,
        use_rslora=True,
        # PEFT matches pattern keys as name suffixes; the first key that matches wins
        rank_pattern={"language_model.layers.0.self_attn.q_proj": 8, "fc1": 2},
        alpha_pattern={"v_proj": 32},
    )
    read = adapter(folder, native_base_dir)
    s = read.settings
    assert s.rank("model.language_model.layers.0.self_attn.q_proj") == 8
    assert s.rank("model.language_model.layers.1.self_attn.q_proj") == 4
    assert s.scaling("model.vision_tower.encoder.layers.0.mlp.fc1") == pytest.approx(8 / 2**0.5)
    assert s.scaling("model.language_model.layers.1.self_attn.v_proj") == pytest.approx(32 / 2)
    reference = peft_merged_state(native_base_dir, folder, tmp_path)
    _assert_adapter_equals(read, reference, native_base_dir)


def test_regex_target_modules_select_like_peft(tmp_path: Path, native_base_dir: Path) -> None:
    folder = make_lora_output(
        native_base_dir,
        tmp_path / "lora",
        modules_to_save=(),
        target_modules=r".*language_model.*\.(q_proj|down_proj)",
    )
    read = adapter(folder, native_base_dir)
    assert sorted(read.merged) == sorted(
        f"language_model.model.layers.{i}.{m}.weight"
        for i in (0, 1)
        for m in ("self_attn.q_proj", "mlp.down_proj")
    )
    assert read.tuned_prefixes == ("language_model.",)
    _assert_adapter_equals(read, peft_merged_state(native_base_dir, folder, tmp_path), native_base_dir)


def test_fan_in_fan_out_conv1d_equals_peft(tmp_path: Path) -> None:
    base = make_gpt2_base(tmp_path / "gpt2")
    folder = make_lora_output(
        base,
        tmp_path / "lora",
        target_modules=("c_attn", "c_fc"),
        modules_to_save=(),
        fan_in_fan_out=True,
        lora_bias=True,
    )
    read = adapter(folder, base)
    assert "transformer.h.0.attn.c_attn.bias" in read.merged  # lora_bias adds into the layer's bias
    _assert_adapter_equals(read, peft_merged_state(base, folder, tmp_path), base)


def _assert_adapter_equals(read: Any, reference: dict[str, torch.Tensor], base_dir: Path) -> None:
    base = T.list_checkpoint(base_dir).tensors
    assert not read.problems
    from hubsync.adapters import _base_name

    merged = 0
    for key, info in read.checkpoint.tensors.items():
        name = _base_name(key, base, None, config_of(base_dir))
        assert name is not None, key
        value = T.load_tensor(info).to(T.torch_dtype(base[name].dtype))
        assert torch.equal(bits(value), bits(reference[name])), f"{name} differs from PEFT's merge"
        merged += 1
    assert merged == len(read.merged) + len(read.copied)


# --------------------------------------------------------------------------------------------- findings


def test_delta_below_bf16_resolution_is_reported_by_prefix(tmp_path: Path, native_base_dir: Path) -> None:
    folder = make_lora_output(
        native_base_dir, tmp_path / "lora", target_modules=("q_proj", "v_proj"), b_scale=1e-9
    )
    plan = prepare(write_manifest(tmp_path, native_base_dir, folder)).plan
    vanished = [p for p in plan.problems if "vanished" in p]
    assert any(
        p.startswith(
            "tuned prefix 'language_model.' is identical to the base (4 tensor(s) changed only "
            "below bfloat16 resolution)"
        )
        for p in vanished
    ), plan.problems
    assert any(p.startswith("tuned prefix 'vision_tower.' is identical") for p in vanished), plan.problems
    assert not any("multi_modal_projector" in p for p in plan.problems)  # its whole copy did change
    with pytest.raises(PlanError, match="identical to the base"):
        build(write_manifest(tmp_path, native_base_dir, folder, name="b.yaml"), record_last_build=False)


def test_adapter_for_another_base_is_named(
    tmp_path: Path, native_lora: Path, remote_base_dir: Path, native_base_dir: Path
) -> None:
    expected = (
        r"none of the 26 LoRA module\(s\) in .* lands on the base: check that `base` is the model the "
        r"adapter was trained on: .*the base has no model\.language_model\.layers\.0\.mlp\.down_proj\.weight"
    )
    with pytest.raises(FinetuneError, match=expected):
        prepare(write_manifest(tmp_path, remote_base_dir, native_lora))
    read = adapter(native_lora, native_base_dir, base_repo="other-org/other-model", base_revision="a" * 40)
    assert any(
        "trained on 'my-org/" in n and "but the manifest's base is 'other-org/other-model'" in n
        for n in read.notes
    ), read.notes
    shutil.copytree(native_lora, tmp_path / "pinned")
    cfg = json.loads((tmp_path / "pinned" / "adapter_config.json").read_text())
    (tmp_path / "pinned" / "adapter_config.json").write_text(json.dumps({**cfg, "revision": "v1.0"}))
    read = adapter(
        tmp_path / "pinned", native_base_dir, base_repo=cfg["base_model_name_or_path"], base_revision="b" * 40
    )
    assert any("trained on revision 'v1.0'" in n for n in read.notes), read.notes


def test_lora_keys_for_missing_modules_and_wrong_rank_are_problems(
    tmp_path: Path, native_lora: Path, native_base_dir: Path
) -> None:
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(native_lora, tmp_path / "lora")
    state = load_file(folder / "adapter_model.safetensors")
    ghost = "base_model.model.model.language_model.layers.0.self_attn.ghost_proj"
    state[f"{ghost}.lora_A.weight"] = torch.ones(4, 64)
    state[f"{ghost}.lora_B.weight"] = torch.ones(64, 4)
    save_file(state, str(folder / "adapter_model.safetensors"))
    problems = prepare(write_manifest(tmp_path, native_base_dir, folder)).plan.problems
    assert any(
        "model.language_model.layers.0.self_attn.ghost_proj has LoRA weights, but the base has no "
        "model.language_model.layers.0.self_attn.ghost_proj.weight" in p
        for p in problems
    ), problems

    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"fc1": 8}}))
    problems = prepare(write_manifest(tmp_path, native_base_dir, folder, name="r.yaml")).plan.problems
    assert any("lora_A/lora_B have rank 4/4, but adapter_config.json gives r=8" in p for p in problems), (
        problems
    )

    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj"]}))
    problems = prepare(write_manifest(tmp_path, native_base_dir, folder, name="t.yaml")).plan.problems
    assert any(
        "which target_modules ('q_proj',) does not select: PEFT would ignore them" in p for p in problems
    ), problems


def _config_only(tmp_path: Path, config: Any, native_lora: Path) -> Path:
    folder = tmp_path / type(config).__name__
    config.save_pretrained(str(folder))
    shutil.copyfile(native_lora / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    return folder


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda p: p.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
            r"is a prompt tuning adapter \(peft_type PROMPT_TUNING\): it adds virtual tokens and has no weights",
        ),
        (
            lambda p: p.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
            r"is a prefix tuning adapter \(peft_type PREFIX_TUNING\)",
        ),
        (
            lambda p: p.IA3Config(target_modules=["k_proj"], feedforward_modules=[]),
            r"is a IA3 adapter \(peft_type IA3\): hubsync merges only LoRA",
        ),
        (lambda p: p.LoHaConfig(target_modules=["q_proj"]), r"is a LoHa adapter \(peft_type LOHA\)"),
        (
            lambda p: p.LoraConfig(target_modules=["q_proj"], use_dora=True),
            r"is a DoRA \(use_dora: true\) adapter: hubsync merges plain LoRA only",
        ),
        (
            lambda p: p.LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa"),
            r"initialised with 'pissa': its factors apply to a modified base",
        ),
    ],
    ids=["prompt-tuning", "prefix-tuning", "ia3", "loha", "dora", "pissa"],
)
def test_unsupported_adapters_are_refused_by_name(
    tmp_path: Path, native_lora: Path, native_base_dir: Path, make: Any, message: str
) -> None:
    import peft

    folder = _config_only(tmp_path, make(peft), native_lora)
    with pytest.raises(FinetuneError, match=message):
        prepare(write_manifest(tmp_path, native_base_dir, folder))


def test_corrupt_adapter_config_is_named(tmp_path: Path, native_lora: Path, native_base_dir: Path) -> None:
    folder = shutil.copytree(native_lora, tmp_path / "lora")
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    with pytest.raises(FinetuneError, match=r"adapter_config.json is not valid JSON .*re-save the adapter"):
        prepare(write_manifest(tmp_path, native_base_dir, folder))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 0, "lora_alpha": 8}))
    with pytest.raises(FinetuneError, match=r"has an invalid r 0: expected a positive integer"):
        prepare(write_manifest(tmp_path, native_base_dir, folder, name="r.yaml"))
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_config.json").write_text((native_lora / "adapter_config.json").read_text())
    with pytest.raises(FinetuneError, match=r"neither adapter_model.safetensors nor adapter_model.bin"):
        prepare(write_manifest(tmp_path, native_base_dir, folder, name="w.yaml"))


def test_bin_adapter_reads_like_safetensors(tmp_path: Path, native_base_dir: Path, native_lora: Path) -> None:
    from safetensors.torch import load_file

    folder = shutil.copytree(native_lora, tmp_path / "lora")
    state = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(state, folder / "adapter_model.bin")
    from_bin = adapter(folder, native_base_dir)
    from_st = adapter(native_lora, native_base_dir)
    assert from_bin.checkpoint.format == "bin" and set(from_bin.checkpoint.tensors) == set(
        from_st.checkpoint.tensors
    )
    key = next(k for k, v in from_st.checkpoint.tensors.items() if isinstance(v, T.ComputedTensor))
    assert torch.equal(
        T.load_tensor(from_bin.checkpoint.tensors[key]), T.load_tensor(from_st.checkpoint.tensors[key])
    )


# --------------------------------------------------------------------------------------------- trainer outputs


def _spec(path: Path, **keys: Any) -> FinetuneSpec:
    return FinetuneSpec(path=path, **keys)


def test_newest_or_named_checkpoint_is_taken(tmp_path: Path, native_lora: Path) -> None:
    run = tmp_path / "run"
    for step in (2, 10):
        shutil.copytree(native_lora, run / f"checkpoint-{step}")
    (run / "runs").mkdir()
    assert locate(_spec(run)) == run / "checkpoint-10"  # by step number, not by name
    assert locate(_spec(run, checkpoint="checkpoint-2")) == run / "checkpoint-2"
    with pytest.raises(FinetuneError, match=r"checkpoint-7 does not exist: check `finetune.checkpoint`"):
        locate(_spec(run, checkpoint="checkpoint-7"))


def test_folder_with_weights_and_adapter_asks_to_choose(tmp_path: Path, native_lora: Path) -> None:
    folder = shutil.copytree(native_lora, tmp_path / "both")
    shutil.copyfile(native_lora / "adapter_model.safetensors", folder / "model.safetensors")
    with pytest.raises(
        FinetuneError,
        match=r"both full model weights and a PEFT adapter .*`finetune.format: full` "
        r"or `finetune.format: peft`",
    ):
        locate(_spec(folder))
    assert locate(_spec(folder, format="peft")) == folder
    assert locate(_spec(folder, format="full")) == folder


def test_deepspeed_checkpoint_without_deepspeed_gives_the_command(tmp_path: Path) -> None:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("deepspeed is installed: the checkpoint would be converted")
    run = tmp_path / "run"
    ckpt = make_deepspeed_checkpoint(run / "checkpoint-4")
    out = ckpt.parent / "checkpoint-4-fp32"
    with pytest.raises(FinetuneError) as err:
        locate(_spec(run))
    assert f"run `python {ckpt}/zero_to_fp32.py {ckpt} {out} --safe_serialization`" in err.value.one_line()
    assert "DeepSpeed ZeRO checkpoint (global_step4/) without consolidated weights" in err.value.one_line()
    (ckpt / "zero_to_fp32.py").unlink()
    with pytest.raises(FinetuneError, match=r"python -m deepspeed\.utils\.zero_to_fp32 "):
        locate(_spec(ckpt))
