"""Name mapping on small hand-made name/shape inventories: wrappers, transformers' rules run backwards, tied
copies, and renames inferred from the checkpoints when no table explains the names."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from hubsync.manifest import RenameRule
from hubsync.names import (
    MAX_INFERRED_RENAMES,
    Renaming,
    _backwards,
    candidate_names,
    infer_renames,
    resolve_names,
    strip_wrappers,
    tied_copies,
)

Shapes = dict[str, tuple[int, ...]]

# A CLIP tower as llava-hf stores it (4.x) and as transformers 5 holds it in memory (`state_dict()`)
CLIP_PARTS: Shapes = {
    "embeddings.class_embedding": (32,),
    "embeddings.patch_embedding.weight": (32, 3, 8, 8),
    "embeddings.position_embedding.weight": (17, 32),
    "pre_layrnorm.weight": (32,),
    "encoder.layers.0.self_attn.q_proj.weight": (32, 32),
    "encoder.layers.0.self_attn.k_proj.weight": (32, 32),
    "encoder.layers.0.mlp.fc1.weight": (64, 32),
    "encoder.layers.1.self_attn.q_proj.weight": (32, 32),
    "encoder.layers.1.self_attn.k_proj.weight": (32, 32),
    "encoder.layers.1.mlp.fc1.weight": (64, 32),
    "post_layernorm.weight": (32,),
}
LLM_PARTS: Shapes = {
    "embed_tokens.weight": (300, 32),
    "layers.0.self_attn.q_proj.weight": (32, 32),
    "layers.0.mlp.up_proj.weight": (64, 32),
    "norm.weight": (32,),
}


def under(prefix: str, parts: Mapping[str, tuple[int, ...]]) -> Shapes:
    return {prefix + name: shape for name, shape in parts.items()}


def identity(names: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
    return {n: n for n in names}


# --- wrappers and transformers' rules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("saved", "expected"),
    [
        ("module._orig_mod.vpm.x", "vpm.x"),
        ("base_model.model.llm.w", "llm.w"),
        ("model._fsdp_wrapped_module.layers.0._fsdp_wrapped_module.mlp.w", "model.layers.0.mlp.w"),
        ("llm.layers.3._checkpoint_wrapped_module.attn.w", "llm.layers.3.attn.w"),
        ("vpm._orig_mod.encoder.w", "vpm.encoder.w"),
        ("my_module.x", "my_module.x"),
    ],
)
def test_wrappers_are_stripped_wherever_they_sit(saved: str, expected: str) -> None:
    assert strip_wrappers(saved) == expected


# transformers 5's rules for Qwen2-VL: a lookahead, and a prefix change with a group
QWEN_RULES = (
    Renaming(r"^visual", "model.visual"),
    Renaming(r"^model(?!\.(language_model|visual))", "model.language_model"),
    Renaming(r"^model\.(?:(?!language_model\.))(.+)", r"model.language_model.\1"),
)


def test_lookahead_rules_run_backwards() -> None:
    assert _backwards(QWEN_RULES[1], "model.language_model.layers.0.w") == "model.layers.0.w"
    assert _backwards(QWEN_RULES[2], "model.language_model.norm.weight") == "model.norm.weight"
    assert _backwards(QWEN_RULES[0], "model.visual.blocks.0.w") == "visual.blocks.0.w"
    # the rule, run forwards, must give the name back: `model.visual` is excluded by the lookahead
    assert _backwards(QWEN_RULES[1], "model.visual.blocks.0.w") is None
    # a replacement with a group in the middle cannot be reversed by its literal parts
    assert _backwards(Renaming(r"^a\.(\d+)\.b", r"a.\1.c"), "a.3.c") is None


def test_raw_qwen2_vl_names_map_through_the_table() -> None:
    base: Shapes = {
        "model.layers.0.w": (4,),
        "model.norm.weight": (4,),
        "visual.blocks.0.w": (4,),
        "lm_head.weight": (9, 4),
    }
    raw: Shapes = {
        "model.language_model.layers.0.w": (4,),
        "model.language_model.norm.weight": (4,),
        "model.visual.blocks.0.w": (4,),
        "lm_head.weight": (9, 4),
    }
    names = resolve_names(raw, base, (), lambda: QWEN_RULES)
    assert names.mapping == {
        "model.language_model.layers.0.w": "model.layers.0.w",
        "model.language_model.norm.weight": "model.norm.weight",
        "model.visual.blocks.0.w": "visual.blocks.0.w",
        "lm_head.weight": "lm_head.weight",
    }
    assert (names.unmapped, names.inferred, names.problems) == ((), (), ())


def test_the_table_is_not_read_when_names_match() -> None:
    def table() -> tuple[Renaming, ...]:
        raise AssertionError("transformers' table was read although every name matched")

    names = resolve_names({"module.vpm.w": (2,)}, {"vpm.w": (2,)}, (), table)
    assert names.mapping == {"module.vpm.w": "vpm.w"} and names.renamed == 1


def test_candidates_follow_manifest_rules_first() -> None:
    rules = (RenameRule.model_validate({"from": r"^vision_model\.", "to": "vpm."}),)
    assert candidate_names("module.vision_model.x", rules, ())[0] == "vpm.x"


# --- inferred renames ---------------------------------------------------------------------------------------


def test_clip_flattening_is_inferred_as_one_module_rename() -> None:
    """transformers 5's raw LLaVA state dict drops CLIP's `vision_model.` level: no table says so."""
    base: Shapes = {
        **under("vision_tower.vision_model.", CLIP_PARTS),
        **under("language_model.model.", LLM_PARTS),
    }
    raw = under("model.vision_tower.", CLIP_PARTS)
    inference = infer_renames(identity(raw), raw, base)
    assert [r.note for r in inference.renames] == [
        f"inferred rename: model.vision_tower. -> vision_tower.vision_model. ({len(CLIP_PARTS)} tensors)"
    ]
    assert inference.mapping == {
        f"model.vision_tower.{n}": f"vision_tower.vision_model.{n}" for n in CLIP_PARTS
    }
    assert inference.problems == ()


def test_a_rename_reads_as_the_module_it_moves() -> None:
    """`model.visual.x` <-> `visual.x` shares `visual.x`, which alone would give `model.` -> ``."""
    parts: Shapes = {
        "blocks.0.attn.qkv.weight": (96, 32),
        "blocks.0.mlp.fc1.weight": (64, 32),
        "merger.mlp.0.weight": (32, 128),
    }
    base: Shapes = {**under("visual.", parts), **under("model.", LLM_PARTS)}
    raw = under("model.visual.", parts)
    # with the language model mapped already (by a table), `model.` -> `` would seem to cover it too
    mapped = under("model.language_model.", LLM_PARTS)
    inference = infer_renames(identity(raw), raw, base, mapped=mapped)
    assert [(r.source, r.target, r.tensors) for r in inference.renames] == [("model.visual.", "visual.", 3)]
    # alone, the rename is what it is: the wrapping prefix goes
    alone = infer_renames(identity(raw), raw, base)
    assert [r.note for r in alone.renames] == ["inferred rename: model. -> (prefix removed) (3 tensors)"]


def test_two_modules_renamed_differently() -> None:
    base: Shapes = {
        **under("vision_tower.vision_model.", CLIP_PARTS),
        **under("language_model.model.", LLM_PARTS),
    }
    raw: Shapes = {**under("model.vision_tower.", CLIP_PARTS), **under("model.language_model.", LLM_PARTS)}
    inference = infer_renames(identity(raw), raw, base)
    assert {(r.source, r.target) for r in inference.renames} == {
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.language_model.", "language_model.model."),
    }
    assert len(inference.mapping) == len(raw)


def test_names_matching_several_base_tensors_are_refused_with_the_settling_rule() -> None:
    """Two identical towers in the base: which one the fine-tune's tower is, names and shapes cannot say."""
    base: Shapes = {**under("tower_a.", CLIP_PARTS), **under("tower_b.", CLIP_PARTS)}
    raw = under("model.tower.", CLIP_PARTS)
    inference = infer_renames(identity(raw), raw, base)
    assert inference.mapping == {} and inference.renames == ()
    assert inference.refused == frozenset(raw)
    assert inference.problems == (
        (
            f"fine-tune tensors under model.tower. ({len(CLIP_PARTS)}) match base tensors under tower_a. and tower_b. "
            "equally well (same shapes, same name endings): say which with a `finetune.rename` rule, "
            "e.g. {from: '^model\\.tower\\.', to: 'tower_a.'}"
        ),
    )


def test_one_prefix_pointing_at_two_modules_is_refused() -> None:
    base: Shapes = {"a.x.conv.weight": (4, 4), "b.y.conv.weight": (8, 8)}
    raw: Shapes = {"m.x.conv.weight": (4, 4), "m.y.conv.weight": (8, 8)}
    # each aligns uniquely, but `m.x.` -> `a.x.` and `m.y.` -> `b.y.` are two renames, both fine
    assert {(r.source, r.target) for r in infer_renames(identity(raw), raw, base).renames} == {
        ("m.x.", "a.x."),
        ("m.y.", "b.y."),
    }
    # the same prefix with evidence for two targets is a conflict
    base = {
        "a.conv.weight": (4, 4),
        "a.norm.weight": (4,),
        "b.proj.weight": (8, 8),
        "b.bias.weight": (8,),
    }
    raw = {
        "m.conv.weight": (4, 4),
        "m.norm.weight": (4,),
        "m.proj.weight": (8, 8),
        "m.bias.weight": (8,),
    }
    inference = infer_renames(identity(raw), raw, base)
    assert inference.mapping == {} and inference.refused == frozenset(raw)
    assert inference.problems == (
        (
            "fine-tune tensors under m. (4) match base tensors under a. and b. (by shape and name ending): say which "
            "with a `finetune.rename` rule, e.g. {from: '^m\\.', to: 'a.'}"
        ),
    )


def test_a_rename_must_fit_its_whole_module() -> None:
    base = under("vision_tower.vision_model.", CLIP_PARTS)
    raw: Shapes = {**under("model.vision_tower.", CLIP_PARTS), "model.vision_tower.head.probe": (1, 1, 32)}
    inference = infer_renames(identity(raw), raw, base)
    assert inference.mapping == {} and inference.renames == ()
    assert inference.problems == (
        (
            "inferred rename model.vision_tower. -> vision_tower.vision_model. does not fit its whole module "
            "(model.vision_tower.head.probe would be vision_tower.vision_model.head.probe, which the base does not "
            "have): map these names with `finetune.rename` rules"
        ),
    )


def test_a_rename_must_keep_shapes() -> None:
    base = under("vision_tower.vision_model.", CLIP_PARTS)
    raw = under("model.vision_tower.", CLIP_PARTS)
    raw["model.vision_tower.post_layernorm.weight"] = (16,)
    inference = infer_renames(identity(raw), raw, base)
    assert inference.mapping == {}
    assert "of another shape [32]" in inference.problems[0]


def test_too_many_renames_are_refused() -> None:
    count = MAX_INFERRED_RENAMES + 1
    base: Shapes = {f"new{i}.block.w": (i + 1, 3) for i in range(count)}
    raw: Shapes = {f"old{i}.block.w": (i + 1, 3) for i in range(count)}
    inference = infer_renames(identity(raw), raw, base)
    assert inference.mapping == {}
    assert inference.problems[0].startswith(
        f"the fine-tune's names differ from the base's in {count} ways (old0. -> new0., "
    )
    assert inference.problems[0].endswith(
        "too many to infer safely (is it a fine-tune of this base?); map them with `finetune.rename` rules"
    )


def test_a_shared_leaf_name_or_another_shape_is_no_evidence() -> None:
    base: Shapes = {"tower.proj.weight": (4, 4), "head.norm.weight": (8,)}
    raw: Shapes = {"other.weight": (4, 4), "model.head.norm.weight": (16,)}
    inference = infer_renames(identity(raw), raw, base)
    assert (inference.mapping, inference.problems, inference.refused) == ({}, (), frozenset())


def test_a_rename_of_every_name_is_not_inferred() -> None:
    """`x` <-> `model.x` for names with nothing in common in front would be a rename of the empty prefix."""
    base: Shapes = {"model.a.w": (2,), "model.b.w": (3,)}
    raw: Shapes = {"a.w": (2,), "b.w": (3,)}
    assert infer_renames(identity(raw), raw, base).mapping == {}


def test_unmapped_names_are_listed_after_inference() -> None:
    base = under("vision_tower.vision_model.", CLIP_PARTS)
    raw: Shapes = {**under("model.vision_tower.", CLIP_PARTS), "extra_head.weight": (2, 2)}
    names = resolve_names(raw, base, (), tuple)
    assert [(u.name, u.reason) for u in names.unmapped] == [
        ("extra_head.weight", "no tensor of that name in the base")
    ]
    assert len(names.mapping) == len(CLIP_PARTS)
    assert names.notes == (
        f"inferred rename: model.vision_tower. -> vision_tower.vision_model. ({len(CLIP_PARTS)} tensors)",
    )


# --- tied copies --------------------------------------------------------------------------------------------


def test_a_tied_head_is_a_copy_of_the_embedding() -> None:
    base = under("language_model.model.", LLM_PARTS)
    raw: Shapes = {**under("model.language_model.", LLM_PARTS), "lm_head.weight": (300, 32)}
    names = resolve_names(raw, base, (), tuple)
    assert names.tied == {"lm_head.weight": "language_model.model.embed_tokens.weight"}
    assert names.unmapped == ()
    assert (
        "lm_head.weight is a copy of the tied language_model.model.embed_tokens.weight (the base stores it once): "
        "compared, not written"
    ) in names.notes


@pytest.mark.parametrize(
    "base",
    [
        {"lm_head.weight": (300, 32), "model.embed_tokens.weight": (300, 32)},  # the base has its own head
        {"a.embed_tokens.weight": (300, 32), "b.embed_tokens.weight": (300, 32)},  # which embedding?
        {"model.embed_tokens.weight": (301, 32)},  # not the head's shape
    ],
)
def test_a_head_is_only_a_tied_copy_when_the_base_says_so(base: dict[str, tuple[int, ...]]) -> None:
    assert tied_copies({"lm_head.weight": "lm_head.weight"}, {"lm_head.weight": (300, 32)}, base) == {}
