"""Tuned prefixes on hand-made names: what an entry matches, the boundary rule, regexes, and module proposals."""

from __future__ import annotations

import pytest

from hubsync.errors import ManifestError
from hubsync.manifest import parse_manifest
from hubsync.tuned import boundary_problems, matches, propose_modules, unmoved_under

NAMES = [
    "vpm.embeddings.patch_embedding.weight",
    "vpm.encoder.layers.0.layer_norm1.weight",
    "vpm.encoder.layers.0.mlp.fc1.weight",
    "vpm_extra.proj.weight",
    "resampler.query",
    "resampler.kv_proj.weight",
    "llm.model.embed_tokens.weight",
    "image_newline",
]


@pytest.mark.parametrize(
    ("prefix", "name", "expected"),
    [
        ("vpm.", "vpm.encoder.layers.0.mlp.fc1.weight", True),
        ("vpm.", "vpm_extra.proj.weight", False),
        ("image_newline", "image_newline", True),
        (r"re:vpm\.encoder\.layers\.(0|1)\.", "vpm.encoder.layers.0.mlp.fc1.weight", True),
        (r"re:vpm\.encoder\.layers\.(0|1)\.", "vpm.embeddings.patch_embedding.weight", False),
        (r"re:(vpm|resampler)\.", "resampler.query", True),
        (r"re:encoder", "vpm.encoder.layers.0.mlp.fc1.weight", False),  # matched at the start, like a prefix
    ],
)
def test_what_an_entry_matches(prefix: str, name: str, expected: bool) -> None:
    assert matches(prefix, name) is expected


def test_a_prefix_stopping_inside_a_name_is_refused_with_the_module_meant() -> None:
    assert boundary_problems(["v", "r"], NAMES) == [
        (
            "tuned prefix 'v' stops inside a name (vpm., vpm_extra.): did you mean `vpm.` or `vpm_extra.`? "
            "A prefix ends at a dot or is a whole tensor name; write `re:<pattern>` for a regex"
        ),
        (
            "tuned prefix 'r' stops inside a name (resampler.): did you mean `resampler.`? "
            "A prefix ends at a dot or is a whole tensor name; write `re:<pattern>` for a regex"
        ),
    ]
    # `vpm` alone matches `vpm.*` at a boundary, but also `vpm_extra.*` inside a name
    assert boundary_problems(["vpm"], NAMES)[0].startswith(
        "tuned prefix 'vpm' stops inside a name (vpm_extra.)"
    )
    assert boundary_problems(["resampler.quer"], NAMES)[0].startswith(
        "tuned prefix 'resampler.quer' stops inside a name (resampler.query): did you mean `resampler.query`?"
    )


@pytest.mark.parametrize(
    "ok", [["vpm.", "resampler."], ["image_newline"], ["resampler"], [r"re:v"], ["nothing."]]
)
def test_prefixes_at_a_boundary_and_regexes_pass(ok: list[str]) -> None:
    assert boundary_problems(ok, NAMES) == []


def test_a_regex_entry_must_compile() -> None:
    text = "base: {path: b}\nfinetune: {path: f, tuned: ['re:vpm\\.(']}\noutput: {dir: o}\n"
    with pytest.raises(ManifestError) as err:
        parse_manifest(text)
    assert (
        "finetune.tuned: 're:vpm\\.(' is not a valid regular expression (missing ), unterminated subpattern"
        in str(err.value)
    )


SIZES = {
    "vpm.embeddings.patch_embedding.weight": 1000,
    "vpm.encoder.layers.0.layer_norm1.weight": 32,
    "vpm.encoder.layers.0.layer_norm1.bias": 32,
    "vpm.encoder.layers.0.mlp.fc1.weight": 2000,
    "vpm.encoder.layers.1.layer_norm1.weight": 32,
    "vpm.encoder.layers.1.mlp.fc1.weight": 2000,
    "vpm.post_layernorm.weight": 32,
    "resampler.query": 256,
    "resampler.ln_q.weight": 32,
    "llm.model.embed_tokens.weight": 10000,
    "llm.model.layers.0.mlp.up_proj.weight": 4000,
}


def test_modules_are_proposed_even_when_some_norms_did_not_move() -> None:
    unmoved = {"vpm.encoder.layers.0.layer_norm1.weight", "vpm.encoder.layers.1.layer_norm1.weight"}
    unmoved |= {"vpm.post_layernorm.weight", "resampler.ln_q.weight"}
    changed = {n for n in SIZES if not n.startswith("llm.") and n not in unmoved}
    assert propose_modules(changed, SIZES) == ("resampler.", "vpm.")
    assert unmoved_under(("resampler.", "vpm."), changed, SIZES) == {
        "resampler.": ["resampler.ln_q.weight"],
        "vpm.": sorted(unmoved - {"resampler.ln_q.weight"}),
    }


def test_a_module_mostly_unmoved_is_not_proposed_whole() -> None:
    # only the last layer of the tower trained: the tower is mostly frozen, so the proposal goes down
    changed = {"vpm.encoder.layers.1.layer_norm1.weight", "vpm.encoder.layers.1.mlp.fc1.weight"}
    assert propose_modules(changed, SIZES) == ("vpm.encoder.layers.1.",)
    # a wrapping `model.` around a frozen language model is never proposed
    sizes = {"model.vision.a": 100, "model.vision.b": 100, "model.language.a": 1000, "model.head": 10}
    assert propose_modules({"model.vision.a", "model.vision.b", "model.head"}, sizes) == (
        "model.head",
        "model.vision.",
    )
