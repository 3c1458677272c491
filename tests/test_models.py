"""The model fixtures themselves: they load, they are deterministic, and they fail the way real ones do."""

from __future__ import annotations

import filecmp
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from hubsync.testing.models import (
    NATIVE_VISION_PREFIXES,
    REMOTE_CODE_FILES,
    REMOTE_VISION_PREFIXES,
    PublishedModel,
    make_native_vlm,
    make_remote_code_vlm,
    make_test_image,
    make_trainer_output,
    read_state_dict,
)

REMOTE_BASE_FILES = {
    ".gitattributes",
    "LICENSE",
    "README.md",
    "config.json",
    "generation_config.json",
    "model-00001-of-00003.safetensors",
    "model-00002-of-00003.safetensors",
    "model-00003-of-00003.safetensors",
    "model.safetensors.index.json",
    "preprocessor_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    *REMOTE_CODE_FILES,
}
TRAINER_FILES = {
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "trainer_state.json",
    "training_args.bin",
}
QUESTION = [{"role": "user", "content": "What is in this image?"}]


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file()}


def _weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def _dtypes(folder: Path) -> set[torch.dtype]:
    return {t.dtype for t in read_state_dict(folder).values()}


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------------------------
# Base snapshots


def test_native_base_layout(native_base_dir: Path) -> None:
    weight_map = _weight_map(native_base_dir)
    shards = set(weight_map.values())
    assert len(shards) >= 2 and all((native_base_dir / s).exists() for s in shards)
    # transformers 5 writes the legacy LLaVA names on save, not the in-memory `model.language_model.*`.
    assert {k.split(".")[0] for k in weight_map} == {
        "language_model",
        "vision_tower",
        "multi_modal_projector",
    }
    assert "language_model.lm_head.weight" in weight_map
    vision_shards = {s for k, s in weight_map.items() if k.startswith(NATIVE_VISION_PREFIXES)}
    assert shards - vision_shards, "some shard must hold LLM tensors only, so a build can copy it untouched"
    assert _dtypes(native_base_dir) == {torch.bfloat16}
    assert {"processor_config.json", "chat_template.jinja", "tokenizer.json", "README.md"} <= _files(
        native_base_dir
    )


def test_native_base_loads_and_generates(native_base_dir: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaProcessor

    model = AutoModelForImageTextToText.from_pretrained(native_base_dir)
    processor = AutoProcessor.from_pretrained(native_base_dir)
    assert isinstance(processor, LlavaProcessor)
    assert model.dtype == torch.bfloat16
    msgs: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}
    ]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt.startswith("<s>USER: <image>\n") and prompt.endswith("ASSISTANT:")
    inputs = processor(images=[make_test_image(0)], text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == model.config.image_seq_length
    first = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    second = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(first, second) and first.shape[1] > inputs["input_ids"].shape[1]


def test_remote_base_layout(remote_base_dir: Path) -> None:
    assert _files(remote_base_dir) == REMOTE_BASE_FILES
    weight_map = _weight_map(remote_base_dir)
    assert {k.split(".")[0] for k in weight_map} == {"vpm", "resampler", "llm"}
    assert sum(k.startswith("resampler.") for k in weight_map) == 13  # as in MiniCPM-Llama3-V-2_5
    vision_shards = {s for k, s in weight_map.items() if k.startswith(REMOTE_VISION_PREFIXES)}
    assert vision_shards == {"model-00003-of-00003.safetensors"}
    # The vision shard also holds frozen LLM tensors, so it must be rewritten rather than replaced.
    assert {k for k, s in weight_map.items() if s in vision_shards and k.startswith("llm.")} == {
        "llm.lm_head.weight",
        "llm.model.norm.weight",
    }
    assert _dtypes(remote_base_dir) == {torch.bfloat16}

    config = json.loads((remote_base_dir / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_minicpmv.MiniCPMV"
    assert config["torch_dtype"] == "bfloat16" and "dtype" not in config
    preprocessor = json.loads((remote_base_dir / "preprocessor_config.json").read_text())
    assert preprocessor["auto_map"]["AutoProcessor"] == "processing_minicpmv.MiniCPMVProcessor"
    assert preprocessor["image_feature_size"] == config["query_num"]
    assert preprocessor["max_slice_nums"] == config["slice_config"]["max_slice_nums"]
    tokenizer_config = json.loads((remote_base_dir / "tokenizer_config.json").read_text())
    assert (
        tokenizer_config["auto_map"]["AutoTokenizer"][1] == "tokenization_minicpmv_fast.MiniCPMVTokenizerFast"
    )
    assert "chat_template" in tokenizer_config
    readme = (remote_base_dir / "README.md").read_text()
    assert readme.startswith("---\nlicense: other\nlicense_name: ") and "license_link: LICENSE" in readme

    # The index's total_size is doubled, as in the real repo: it must not be trusted for the dtype.
    index = json.loads((remote_base_dir / "model.safetensors.index.json").read_text())
    real = sum(t.numel() * t.element_size() for t in read_state_dict(remote_base_dir).values())
    assert index["metadata"]["total_size"] == 2 * real


def test_remote_base_loads_and_chats(remote_base_dir: Path) -> None:
    from transformers import AutoModel, AutoProcessor, AutoTokenizer

    model = AutoModel.from_pretrained(remote_base_dir, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(remote_base_dir, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(remote_base_dir, trust_remote_code=True)
    assert type(model).__name__ == "MiniCPMV" and model.dtype == torch.bfloat16
    assert type(tokenizer).__name__ == "MiniCPMVTokenizerFast"
    assert type(processor).__name__ == "MiniCPMVProcessor"
    assert type(processor.image_processor).__name__ == "MiniCPMVImageProcessor"

    # The remote tokenizer defines its own __init__: it must still use the whole tokenizer.json (merges,
    # byte-level pre-tokenizer and decoder), not a rebuild from the bare vocabulary.
    text = "Describe the image, please."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and len(ids) < len(text) // 2

    saved = read_state_dict(remote_base_dir)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())

    image = make_test_image(0)
    answer = model.chat(image, QUESTION, tokenizer)
    assert isinstance(answer, str)
    assert model.chat(image, QUESTION, tokenizer) == answer


def test_generators_are_deterministic(tmp_path: Path, native_base_dir: Path, remote_base_dir: Path) -> None:
    assert _tree_bytes(make_native_vlm(tmp_path / "native")) == _tree_bytes(native_base_dir)
    assert _tree_bytes(make_remote_code_vlm(tmp_path / "remote")) == _tree_bytes(remote_base_dir)
    runs = [
        make_trainer_output(remote_base_dir, tmp_path / f"run{i}" / "out", base_repo_id="a/b") for i in (1, 2)
    ]
    assert _tree_bytes(runs[0]) == _tree_bytes(runs[1])
    assert make_test_image(3).tobytes() == make_test_image(3).tobytes() != make_test_image(4).tobytes()


# ---------------------------------------------------------------------------------------------------------------
# Trainer outputs


def _assert_vision_fine_tune(
    trainer_dir: Path, base_dir: Path, tune: tuple[str, ...], prefix: str = ""
) -> None:
    tuned = read_state_dict(trainer_dir)
    base = read_state_dict(base_dir)
    assert set(tuned) == {prefix + k for k in base}
    for key, base_tensor in base.items():
        as_base = tuned[prefix + key].to(base_tensor.dtype)
        if key.startswith(tune):
            assert not torch.equal(as_base, base_tensor), f"{key} was not trained"
        else:
            assert torch.equal(as_base, base_tensor), f"{key} changed but is not tuned"


def test_remote_trainer_output(
    remote_trainer_output: Path, remote_base_dir: Path, published_remote_base: PublishedModel
) -> None:
    assert _files(remote_trainer_output) == TRAINER_FILES
    assert _dtypes(remote_trainer_output) == {torch.float32}
    _assert_vision_fine_tune(remote_trainer_output, remote_base_dir, REMOTE_VISION_PREFIXES)

    repo = published_remote_base.repo_id
    config = json.loads((remote_trainer_output / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == f"{repo}--modeling_minicpmv.MiniCPMV"
    assert config["auto_map"]["AutoConfig"] == f"{repo}--configuration_minicpm.MiniCPMVConfig"
    assert config["torch_dtype"] == "float32" and config["_name_or_path"] == repo
    tokenizer_config = json.loads((remote_trainer_output / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"]["AutoTokenizer"][1].startswith(f"{repo}--")

    args = torch.load(remote_trainer_output / "training_args.bin", weights_only=True)
    assert args["tune_vision"] and not args["tune_llm"] and args["model_name_or_path"] == repo
    state = json.loads((remote_trainer_output / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and len(state["log_history"]) == 3


def test_native_trainer_output(native_trainer_output: Path, native_base_dir: Path) -> None:
    assert _files(native_trainer_output) == TRAINER_FILES
    assert _dtypes(native_trainer_output) == {torch.float32}
    _assert_vision_fine_tune(native_trainer_output, native_base_dir, NATIVE_VISION_PREFIXES)
    assert json.loads((native_trainer_output / "config.json").read_text())["dtype"] == "float32"


def test_trainer_output_variants(
    trainer_output_factory: Any, remote_base_dir: Path, native_base_dir: Path
) -> None:
    out = trainer_output_factory(
        "remote", dtype="bfloat16", key_prefix="module.", sharded=True, stray_shard=True
    )
    weight_map = _weight_map(out)
    listed = set(weight_map.values())
    on_disk = {p.name for p in out.glob("*.safetensors")}
    assert len(listed) == 2 and on_disk - listed == {"model-00001-of-00003.safetensors"}
    assert all(k.startswith("module.") for k in weight_map)
    assert _dtypes(out) == {torch.bfloat16}
    _assert_vision_fine_tune(out, remote_base_dir, REMOTE_VISION_PREFIXES, prefix="module.")
    with safe_open(out / "model-00001-of-00003.safetensors", "pt") as stray:
        stray_keys = list(stray.keys())
    assert stray_keys and all(k.startswith(("module.vpm.", "module.resampler.")) for k in stray_keys)

    out = trainer_output_factory("remote", also_perturb="llm.model.layers.1.", key_prefix="_orig_mod.")
    tuned, base = read_state_dict(out), read_state_dict(remote_base_dir)
    changed = {k for k, v in base.items() if not torch.equal(tuned["_orig_mod." + k].to(v.dtype), v)}
    assert {k for k in changed if k.startswith("llm.")} == {
        k for k in base if k.startswith("llm.model.layers.1.")
    }

    out = trainer_output_factory("native", key_style="runtime")
    keys = set(read_state_dict(out))
    assert "model.vision_tower.embeddings.patch_embedding.weight" in keys and "lm_head.weight" in keys


# ---------------------------------------------------------------------------------------------------------------
# The seed error: what loading a raw MiniCPM-V fine-tune does today


def test_raw_remote_fine_tune_reproduces_the_seed_error(remote_trainer_output: Path) -> None:
    """MiniCPM-V #601: the `repo--` auto_map fetches the code from the published base on the (emulated) Hub,
    the model loads, and `chat()` fails because AutoProcessor falls back to the bare tokenizer."""
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(remote_trainer_output, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(remote_trainer_output, trust_remote_code=True)
    assert model.dtype == torch.float32
    text = "Describe the image, please."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    with pytest.raises(AttributeError, match="MiniCPMVTokenizerFast has no attribute tokenizer"):
        model.chat(make_test_image(0), QUESTION, tokenizer)


def test_remote_fine_tune_chats_once_processor_and_code_are_restored(
    tmp_path: Path, remote_trainer_output: Path, remote_base_dir: Path
) -> None:
    """The fixture fails for exactly the documented reasons: put back the processor config and the code (with
    a plain auto_map) and the same weights chat."""
    from transformers import AutoModel, AutoTokenizer

    fixed = Path(shutil.copytree(remote_trainer_output, tmp_path / "fixed"))
    for name in ("preprocessor_config.json", "config.json", "tokenizer_config.json", *REMOTE_CODE_FILES):
        shutil.copyfile(remote_base_dir / name, fixed / name)
    assert filecmp.cmp(
        fixed / "model.safetensors", remote_trainer_output / "model.safetensors", shallow=False
    )
    model = AutoModel.from_pretrained(fixed, trust_remote_code=True, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(fixed, trust_remote_code=True)
    assert isinstance(model.chat(make_test_image(0), QUESTION, tokenizer), str)
