"""The family matrix: every (family, base layout, way of saving) builds, passes verification's weights checks,
and keeps every frozen tensor byte-identical to the base; one case per family (`LOADED_CASE`) also passes the
full verification, which loads the base and the build with transformers and runs them.

Bases come from `hubsync.testing.families` (one per family and layout per session, built on first use); each
case makes its own fine-tune (a fraction of a second). The bases are local folders (`base.path`): the Hub
emulator has its own tests, and these are about names, dtypes and file layouts.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from hubsync import tensors as T
from hubsync.build import build, prepare
from hubsync.errors import FinetuneError, PlanError
from hubsync.testing.families import FAMILIES, WAYS, make_family_base, make_family_finetune
from hubsync.verify import verify
from tests.test_build import assert_build_is_faithful

# one xdist worker runs this whole module, so its module- and session-scoped fixtures are made once
pytestmark = [pytest.mark.xdist_group("test_families")]

CASES = [
    (name, layout, way) for name, family in FAMILIES.items() for layout in family.layouts for way in WAYS
]
# Ways that write transformers 5's runtime names (the others write the checkpoint names back).
RAW_WAYS = ("accelerate", "bin", "fsdp", "deepspeed")
# transformers 5 builds no Qwen2-VL processor without torchvision (its video processor): verification says so.
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
NEEDS_TORCHVISION = {"qwen2_vl", "qwen2_5_vl"}

# The one case per family whose build is loaded and run by the full verification (seconds per family): the
# 4.x layout fine-tuned by a bf16 run saved by zero_to_fp32 (runtime names, float32), the furthest from the base.
LOADED_CASE = ("checkpoint", "deepspeed")

BaseFactory = Callable[[str, str], Path]


@pytest.fixture(scope="session")
def family_base(tmp_path_factory: pytest.TempPathFactory) -> BaseFactory:
    """`family_base(name, layout)`: the session's base folder of that family and layout, made on first use."""
    made: dict[tuple[str, str], Path] = {}

    def get(name: str, layout: str) -> Path:
        if (name, layout) not in made:
            folder = tmp_path_factory.mktemp(f"{name}-{layout}") / "base"
            made[(name, layout)] = make_family_base(name, folder, layout=layout)
        return made[(name, layout)]

    return get


def write_manifest(tmp_path: Path, base: Path, finetune: Path, tuned: tuple[str, ...], **extra: Any) -> Path:
    data: dict[str, Any] = {
        "base": {"path": str(base)},
        "finetune": {"path": str(finetune), "tuned": list(tuned), **extra},
        "output": {"dir": "out"},
        "verify": {"device": "cpu", "trust_remote_code": True},
    }
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def assert_weights_verified(out: Path, name: str) -> None:
    report = verify(out, run_models=False)
    failures = {c.name: c.detail for c in report.failures}
    if name in NEEDS_TORCHVISION and not HAS_TORCHVISION:
        assert set(failures) <= {"processor"}, failures
    else:
        assert not failures, failures
    passed = {c.name for c in report.checks if c.ok}
    assert {"tensor layout", "tuned tensors are the fine-tune's", "other tensors are the base's"} <= passed


@pytest.mark.parametrize(("name", "layout", "way"), CASES, ids=["-".join(c) for c in CASES])
def test_family_builds_and_keeps_frozen_tensors(
    name: str, layout: str, way: str, tmp_path: Path, family_base: BaseFactory
) -> None:
    family = FAMILIES[name]
    base = family_base(name, layout)
    ft = make_family_finetune(base, name, way, tmp_path / way)
    result = build(write_manifest(tmp_path, base, ft, family.tuned[layout]), record_last_build=False)
    assert_build_is_faithful(result.output, base, ft, list(family.tuned[layout]))
    # every vision tensor moved in the fine-tune, so every one is taken from it, and nothing else is
    vision = {n for n in T.list_checkpoint(base).tensors if n.startswith(family.tuned[layout])}
    assert {t.name for t in result.plan.tuned_tensors} == vision
    if (layout, way) == LOADED_CASE:
        assert_loads_and_runs(result.output, name)
    else:
        assert_weights_verified(result.output, name)
    inferred = [n for n in result.plan.notes if n.startswith("inferred rename:")]
    clip_flattened = name in ("llava", "llava_next", "paligemma", "gemma3")
    if layout == "checkpoint" and way in RAW_WAYS and clip_flattened:
        assert inferred == [
            f"inferred rename: model.vision_tower. -> vision_tower.vision_model. ({len(vision_tower(base))} tensors)"
        ]
    else:
        assert inferred == [], "transformers' table or the names themselves explain these"


def vision_tower(base: Path) -> list[str]:
    return [n for n in T.list_checkpoint(base).tensors if n.startswith("vision_tower.vision_model.")]


# --- the named cases -----------------------------------------------------------------------------------


def test_raw_llava_state_dict_builds_with_the_inferred_rename_in_the_plan(
    tmp_path: Path, family_base: BaseFactory
) -> None:
    """transformers 5 runtime names (`model.vision_tower.*` without CLIP's `vision_model.`) onto a base that
    llava-hf's 4.x layout names `vision_tower.vision_model.*`."""
    base = family_base("llava", "checkpoint")
    ft = make_family_finetune(base, "llava", "accelerate", tmp_path / "raw")
    assert any(n.startswith("model.vision_tower.embeddings.") for n in T.list_checkpoint(ft).tensors)
    plan = prepare(write_manifest(tmp_path, base, ft, FAMILIES["llava"].tuned["checkpoint"])).plan
    assert plan.problems == ()
    assert (
        f"inferred rename: model.vision_tower. -> vision_tower.vision_model. ({len(vision_tower(base))} tensors)"
        in plan.notes
    )
    tuned = {t.name: t.finetune_name for t in plan.tuned_tensors}
    assert (
        tuned["vision_tower.vision_model.embeddings.class_embedding"]
        == "model.vision_tower.embeddings.class_embedding"
    )


def test_raw_qwen2_vl_state_dict_maps_through_transformers_rules(
    tmp_path: Path, family_base: BaseFactory
) -> None:
    """`model.language_model.*` / `model.visual.*` onto Qwen2-VL's 4.4x `model.*` / `visual.*`: transformers'
    rules (a lookahead, a group) run backwards, no inference needed."""
    base = family_base("qwen2_vl", "checkpoint")
    ft = make_family_finetune(base, "qwen2_vl", "accelerate", tmp_path / "raw")
    names = set(T.list_checkpoint(ft).tensors)
    assert (
        "model.language_model.embed_tokens.weight" in names
        and "model.visual.patch_embed.proj.weight" in names
    )
    prep = prepare(write_manifest(tmp_path, base, ft, ("visual.",)))
    assert prep.plan.problems == ()
    assert prep.finetune.base_names["model.language_model.embed_tokens.weight"] == "model.embed_tokens.weight"
    assert (
        prep.finetune.base_names["model.visual.patch_embed.proj.weight"] == "visual.patch_embed.proj.weight"
    )
    assert not any(n.startswith("inferred rename") for n in prep.plan.notes)


def test_fp32_upcast_of_a_bf16_run_on_an_fp16_base_keeps_frozen_tensors(
    tmp_path: Path, family_base: BaseFactory
) -> None:
    """llava-1.5 is fp16; a bf16 run saved by zero_to_fp32 holds every frozen tensor as fp32(bf16(base))."""
    base = family_base("llava", "checkpoint")
    ft = make_family_finetune(base, "llava", "deepspeed", tmp_path / "ds")
    frozen = "language_model.model.layers.0.mlp.up_proj.weight"
    saved = T.load_tensor(T.list_checkpoint(ft).tensors["model.language_model.layers.0.mlp.up_proj.weight"])
    original = T.load_tensor(T.list_checkpoint(base).tensors[frozen])
    assert saved.dtype == torch.float32 and not torch.equal(saved, original.float())
    assert torch.equal(saved, original.to(torch.bfloat16).float())
    tuned = FAMILIES["llava"].tuned["checkpoint"]
    result = build(write_manifest(tmp_path, base, ft, tuned), record_last_build=False)
    # frozen tensors that bf16 cannot hold exactly (the others, 1.0 norms for example, are plain copies)
    rounded = [
        n
        for n, info in T.list_checkpoint(base).tensors.items()
        if not n.startswith(tuned)
        and not torch.equal(T.load_tensor(info).bfloat16().half(), T.load_tensor(info))
    ]
    assert rounded
    assert any(
        n.startswith(
            f"{len(rounded)} tensor(s) equal the base rounded through BF16 (saved as F32 after a BF16 run): "
            "not a change (language_model. "
        )
        for n in result.plan.notes
    ), result.plan.notes
    assert_build_is_faithful(result.output, base, ft, list(FAMILIES["llava"].tuned["checkpoint"]))


def test_a_frozen_change_below_bf16_resolution_is_still_a_change(
    tmp_path: Path, family_base: BaseFactory
) -> None:
    base = family_base("qwen2_vl", "checkpoint")
    ft = make_family_finetune(base, "qwen2_vl", "deepspeed", tmp_path / "ds")
    shard, state = _shard_holding(ft, "model.language_model.norm.weight")
    state["model.language_model.norm.weight"] = state["model.language_model.norm.weight"] * (1 + 1e-4)
    save_file(state, str(shard), metadata={"format": "pt"})
    found = prepare(write_manifest(tmp_path, base, ft, ("visual.",))).plan.problems
    assert any(
        p.startswith("1 tensor(s) outside `finetune.tuned` differ from the base (under model.norm.")
        and "that part was not frozen" in p
        for p in found
    ), found


def _shard_holding(folder: Path, name: str) -> tuple[Path, dict[str, torch.Tensor]]:
    shard = folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]
    return shard, load_file(str(shard))


# --- tied heads ---------------------------------------------------------------------------------------------


def test_a_tied_head_copy_is_compared_and_not_written(tmp_path: Path, family_base: BaseFactory) -> None:
    base = family_base("gemma3", "checkpoint")
    ft = make_family_finetune(base, "gemma3", "bin", tmp_path / "bin")
    result = build(
        write_manifest(tmp_path, base, ft, FAMILIES["gemma3"].tuned["checkpoint"]), record_last_build=False
    )
    assert (
        "lm_head.weight is a copy of the tied language_model.model.embed_tokens.weight (the base stores it once): "
        "compared, not written"
    ) in result.plan.notes
    assert "lm_head.weight" not in T.list_checkpoint(result.output).tensors


def test_an_untied_head_that_moved_is_not_hidden(tmp_path: Path, family_base: BaseFactory) -> None:
    base = family_base("gemma3", "checkpoint")
    ft = make_family_finetune(base, "gemma3", "bin", tmp_path / "bin")
    state = torch.load(ft / "pytorch_model.bin", weights_only=True)
    state["lm_head.weight"] = state["lm_head.weight"].clone() + 0.01  # trained apart from the embedding
    torch.save(state, ft / "pytorch_model.bin")
    found = prepare(write_manifest(tmp_path, base, ft, FAMILIES["gemma3"].tuned["checkpoint"])).plan.problems
    assert any(
        "outside `finetune.tuned` differ from the base (under language_model.model.embed_tokens." in p
        for p in found
    ), found


# --- what a family cannot do yet: refusals -------------------------------------------------------------------


def test_fsdp_sharded_checkpoint_is_refused_with_the_merge_command(
    tmp_path: Path, family_base: BaseFactory
) -> None:
    base = family_base("idefics3", "checkpoint")
    ft = tmp_path / "fsdp-sharded"
    (ft / "pytorch_model_fsdp_0").mkdir(parents=True)
    (ft / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"\0")
    (ft / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"\0")
    with pytest.raises(FinetuneError) as err:
        prepare(write_manifest(tmp_path, base, ft, ("model.vision_model.",)))
    sharded = ft / "pytorch_model_fsdp_0"
    assert err.value.one_line() == (
        f"{sharded} is an FSDP sharded checkpoint (torch.distributed.checkpoint), which hubsync cannot read: "
        f"merge it with `accelerate merge-weights {sharded} {ft / 'merged'}`, then set `finetune.path` to "
        f"{ft / 'merged'}"
    )


def test_ambiguous_names_are_refused_with_the_settling_rule(tmp_path: Path, family_base: BaseFactory) -> None:
    """A fine-tune whose vision tower is named so that it matches two base modules equally well."""
    base = family_base("llava", "runtime")
    ft = make_family_finetune(base, "llava", "accelerate", tmp_path / "raw")
    state = load_file(str(ft / "model.safetensors"))
    renamed = {k.replace("model.vision_tower.encoder.layers.1.", "tower.layer."): v for k, v in state.items()}
    renamed = {
        k.replace("model.vision_tower.encoder.layers.0.", "other.layer."): v for k, v in renamed.items()
    }
    save_file(renamed, str(ft / "model.safetensors"), metadata={"format": "pt"})
    found = prepare(write_manifest(tmp_path, base, ft, FAMILIES["llava"].tuned["runtime"])).plan.problems
    assert any(
        p.startswith("fine-tune tensors under other.layer. (")
        and "match base tensors under model.vision_tower.encoder.layers.0. and model.vision_tower.encoder.layers.1. "
        "equally well"
        in p
        and "{from: '^other\\.layer\\.', to: 'model.vision_tower.encoder.layers.0.'}" in p
        for p in found
    ), found
    with pytest.raises(PlanError, match="equally well"):
        build(write_manifest(tmp_path, base, ft, FAMILIES["llava"].tuned["runtime"]), record_last_build=False)


# --- each family loads and runs once ---------------------------------------------------------------------------


def assert_loads_and_runs(out: Path, name: str) -> None:
    """The full verification: model loading, text-only logits equal to the base's, tuned modules live,
    generation with an image."""
    report = verify(out)
    results = {c.name: (c.ok, c.detail) for c in report.checks}
    failures = {k: v[1] for k, v in results.items() if v[0] is False}
    if name in NEEDS_TORCHVISION and not HAS_TORCHVISION:
        # the processor cannot be built, so no image goes in; the weights, the load, the text path and a text-only
        # generation are proven
        assert set(failures) == {"processor", "tuned parts are live"}, failures
    else:
        assert not failures, failures
        assert results["tuned parts are live"][0] and results["generation"][0]
    ok, detail = results["model loads"]
    assert ok and detail.endswith("loads with no missing, unexpected or mismatched keys"), detail
    assert results["frozen parts untouched"][0], results["frozen parts untouched"]


# --- tuned prefixes: hygiene, regexes, what doctor proposes ----------------------------------------------------


def test_prefixes_without_their_dot_are_refused_by_the_plan(tmp_path: Path, family_base: BaseFactory) -> None:
    base = family_base("minicpmv26", "checkpoint")
    ft = make_family_finetune(base, "minicpmv26", "save_pretrained", tmp_path / "ft")
    manifest = write_manifest(tmp_path, base, ft, ("v", "r"))
    assert prepare(manifest).plan.problems == (
        (
            "tuned prefix 'v' stops inside a name (vpm.): did you mean `vpm.`? A prefix ends at a dot or is a whole "
            "tensor name; write `re:<pattern>` for a regex"
        ),
        (
            "tuned prefix 'r' stops inside a name (resampler.): did you mean `resampler.`? A prefix ends at a dot or "
            "is a whole tensor name; write `re:<pattern>` for a regex"
        ),
    )
    with pytest.raises(PlanError, match=r"did you mean `vpm\.`\?"):
        build(manifest, record_last_build=False)


def test_a_regex_tuned_entry_builds_and_its_modules_are_seen_live(
    tmp_path: Path, family_base: BaseFactory
) -> None:
    base = family_base("llava", "checkpoint")
    ft = make_family_finetune(base, "llava", "accelerate", tmp_path / "raw")
    pattern = r"re:(vision_tower|multi_modal_projector)\."
    result = build(write_manifest(tmp_path, base, ft, (pattern,)), record_last_build=False)
    assert result.plan.problems == ()
    assert {p.prefix: p.changed for p in result.plan.prefixes} == {pattern: len(result.plan.tuned_tensors)}
    assert_build_is_faithful(result.output, base, ft, ["vision_tower.", "multi_modal_projector."])
    live = next(c for c in verify(result.output).checks if c.name == "tuned parts are live")
    # the pattern found both modules, each ran and differs from the base's
    assert live.ok and {m.rsplit(".", 1)[-1] for m in live.figures["deltas"]} == {
        "vision_tower",
        "multi_modal_projector",
    }, live


def test_doctor_proposes_modules_and_lists_what_did_not_move(
    tmp_path: Path, family_base: BaseFactory
) -> None:
    """MiniCPM-V trained in bf16 at a small learning rate: the LayerNorm weights (1.0) never move."""
    from hubsync.doctor import diagnose

    base = family_base("minicpmv26", "checkpoint")
    ft = make_family_finetune(base, "minicpmv26", "save_pretrained", tmp_path / "ft")
    state, base_state = load_file(str(ft / "model.safetensors")), _base_state(base)
    norms = sorted(n for n in state if n.startswith(("vpm.", "resampler.")) and _is_norm_weight(n))
    for name in norms:
        state[name] = base_state[name]
    save_file(state, str(ft / "model.safetensors"), metadata={"format": "pt"})
    diagnosis = diagnose(ft, str(base), cwd=tmp_path)
    assert "changed parts (declare them as finetune.tuned): resampler., vpm." in diagnosis.findings
    vpm_norms = [n for n in norms if n.startswith("vpm.")]
    assert (
        f"{len(vpm_norms)} tensor(s) under vpm. did not move (the build keeps the base's): "
        + ", ".join(vpm_norms[:4])
        + f" and {len(vpm_norms) - 4} more"
    ) in diagnosis.findings
    assert "tuned:\n  - resampler.\n  - vpm.\n" in diagnosis.manifest_text


def _is_norm_weight(name: str) -> bool:
    module, leaf = name.split(".")[-2:]
    return leaf == "weight" and ("norm" in module or module.startswith("ln_"))


def _base_state(base: Path) -> dict[str, torch.Tensor]:
    return {n: T.load_tensor(info) for n, info in T.list_checkpoint(base).tensors.items()}
