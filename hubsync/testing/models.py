"""Tiny, deterministic model repos for tests and for `hubsync demo`.

Three kinds of folders, each built in a second or two on a CPU:

* `make_native_vlm`: a LLaVA (Llama text model, CLIP vision tower) saved by transformers' own
  `save_pretrained`, with a locally trained byte-level BPE tokenizer, an image processor and a chat template.
* `make_remote_code_vlm`: a MiniCPM-V look-alike whose code ships in the repo (`trust_remote_code`), laid out
  like `openbmb/MiniCPM-Llama3-V-2_5` was written by transformers 4.x: `vpm.` / `resampler.` / `llm.` tensors in
  bf16 over three shards, processor files, model card and license.
* `make_trainer_output`: what a fine-tuning run leaves behind for either base, made by really training the
  vision part for a few steps: full state dict in the training dtype, tokenizer, `training_args.bin`,
  `trainer_state.json`, no processor config and no remote-code files, and (for remote code) an `auto_map`
  rewritten to the `org/name--module.Class` form that transformers 4.x wrote.

Nothing here touches the network. torch and transformers are imported inside the functions, so that importing
this module stays cheap and cannot read Hub settings from the environment before the test harness sets them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image

NATIVE_REPO_ID = "hubsync-tests/tiny-llava"
REMOTE_REPO_ID = "hubsync-tests/tiny-minicpmv"

REMOTE_CODE_DIR = Path(__file__).parent / "remote_code"
REMOTE_CODE_FILES = (
    "configuration_minicpm.py",
    "image_processing_minicpmv.py",
    "modeling_minicpmv.py",
    "processing_minicpmv.py",
    "resampler.py",
    "tokenization_minicpmv_fast.py",
)

# The parts a vision fine-tune trains, by checkpoint (on-disk) key prefix.
NATIVE_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")
REMOTE_VISION_PREFIXES = ("vpm.", "resampler.")

# A 4.x version string for files that mimic what transformers 4.x wrote (the base MiniCPM-V repos and most
# existing fine-tunes were made with it).
_LEGACY_TRANSFORMERS_VERSION = "4.40.0"

_CORPUS = (
    "Describe the image.",
    "What is in this image?",
    "A red square on a blue background.",
    "The picture shows a small green circle next to a yellow line.",
    "There is a white cat sitting on a brown table.",
    "Two black dots and one orange stripe.",
    "The image is mostly dark with a bright corner.",
    "user assistant system",
)

# Captions for the few training steps: short, so that a step costs milliseconds.
_CAPTIONS = ("A red square on a blue background.", "A small green circle.", "Two black dots.")

_NATIVE_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
_REMOTE_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<unk>",
    "<image>",
    "</image>",
    "<slice>",
    "</slice>",
)

# LLaVA-1.5 style; `{{ '\n' }}` rather than a literal newline because transformers renders chat templates
# with trim_blocks, which would eat a newline that follows a block tag.
NATIVE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>{{ '\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# The Llama-3 template MiniCPM-Llama3-V-2_5 ships in its tokenizer_config.json.
REMOTE_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_GITATTRIBUTES = """\
*.7z filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.gz filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
tokenizer.json filter=lfs diff=lfs merge=lfs -text
"""

_REMOTE_README = """\
---
license: other
license_name: tiny-minicpm-model-license
license_link: LICENSE
pipeline_tag: image-text-to-text
library_name: transformers
language:
- en
tags:
- minicpm-v
- vision
- custom_code
---

# Tiny MiniCPM-V (test fixture)

A randomly initialised, few-hundred-kilobyte stand-in for `openbmb/MiniCPM-Llama3-V-2_5`, made by
`hubsync.testing.models.make_remote_code_vlm`. Same file layout, tensor prefixes (`vpm.`, `resampler.`, `llm.`)
and remote code entry points; it answers with noise.

```python
from transformers import AutoModel, AutoTokenizer

model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{repo_id}", trust_remote_code=True)
print(model.chat(image, [{{"role": "user", "content": "What is in this image?"}}], tokenizer))
```
"""

_REMOTE_LICENSE = """\
Tiny MiniCPM Model License (test fixture)

This file exists so that tests can check that a published fine-tune keeps its base model's license.
The weights it accompanies are random numbers and carry no rights or obligations.
"""

_NATIVE_README = """\
---
license: apache-2.0
pipeline_tag: image-text-to-text
library_name: transformers
tags:
- llava
- vision
---

# Tiny LLaVA (test fixture)

A randomly initialised LLaVA (Llama text model, CLIP vision tower) made by
`hubsync.testing.models.make_native_vlm`. It loads with the transformers Auto classes and answers with noise.
"""


@dataclass(frozen=True)
class PublishedModel:
    """A folder uploaded to a Hub (real or emulated), pinned to the commit the upload made."""

    repo_id: str
    sha: str
    local_dir: Path


# --------------------------------------------------------------------------------------------------------------
# Small helpers


@contextlib.contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seed torch and run single-threaded: CPU kernels may sum in another order with another thread count,
    and the fixtures must be the same bytes on every machine."""
    import torch

    threads = torch.get_num_threads()
    rng_state = torch.get_rng_state()
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng_state)


def _prepare_dest(dest: Path) -> Path:
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise FileExistsError(
            f"{dest} is not empty; the model generators only write into a new or empty folder."
        )
    dest.mkdir(parents=True, exist_ok=True)
    return dest


def _write_json(path: Path, data: Any) -> None:
    # Sorted keys and a trailing newline, as transformers writes its JSON: stable bytes.
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _train_bpe(special_tokens: tuple[str, ...], vocab_size: int) -> Any:
    """A byte-level BPE (the Llama-3 / GPT-2 kind) trained on a fixed corpus: any text encodes, and the
    trainer is deterministic for a fixed corpus, so tokenizer.json is the same bytes on every run."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(_CORPUS) * 4, trainer=trainer)
    return tokenizer


def _save_legacy_tokenizer_json(backend: Any, path: Path) -> None:
    """tokenizer.json with merges as "a b" strings, as tokenizers < 0.20 wrote it (the real MiniCPM-Llama3-V 2.5
    repo's file looks so), so that transformers 4.40 reads it as well as 5.x does."""
    data = json.loads(backend.to_str(pretty=True))
    merges = data.get("model", {}).get("merges") or []
    data["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in merges]
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def make_test_image(seed: int = 0) -> Image.Image:
    """A small RGB picture (40x32): a colour gradient with one filled rectangle, all derived from `seed`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    height, width = 32, 40
    start, stop = rng.integers(0, 256, size=3), rng.integers(0, 256, size=3)
    ramp = np.linspace(0.0, 1.0, width)[None, :, None]
    pixels = np.broadcast_to(start + (stop - start) * ramp, (height, width, 3)).copy()
    top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
    pixels[top : top + height // 3, left : left + width // 3] = rng.integers(0, 256, size=3)
    return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8), mode="RGB")


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, following its index when there is one (stray shards ignored)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update({k: v for k, v in load_file(folder / shard).items() if weight_map.get(k) == shard})
        return state
    return load_file(folder / "model.safetensors")


def _write_shards(
    state: Mapping[str, torch.Tensor],
    dest: Path,
    shards: list[list[str]] | None,
    *,
    metadata: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write `state` as `model.safetensors`, or as `model-0000i-of-0000n.safetensors` + index when `shards`
    lists the keys of each shard. Returns the file names written."""
    from safetensors.torch import save_file

    if shards is None:
        save_file(dict(state), str(dest / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for name, keys in zip(names, shards):
        save_file({k: state[k] for k in keys}, str(dest / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index_metadata = {"total_size": total, **(metadata or {})}
    _write_json(dest / "model.safetensors.index.json", {"metadata": index_metadata, "weight_map": weight_map})
    return names


def _split_by_size(state: Mapping[str, torch.Tensor], count: int) -> list[list[str]]:
    """Consecutive runs of sorted keys of about equal byte size, as `save_pretrained(max_shard_size=...)` does."""
    keys = sorted(state)
    sizes = [state[k].numel() * state[k].element_size() for k in keys]
    target = sum(sizes) / count
    shards: list[list[str]] = [[]]
    filled = 0
    for key, size in zip(keys, sizes):
        if shards[-1] and filled + size > target * 1.05 and len(shards) < count:
            shards.append([])
            filled = 0
        shards[-1].append(key)
        filled += size
    return shards


# --------------------------------------------------------------------------------------------------------------
# (a) A native transformers VLM


def make_native_vlm(dest: Path, *, seed: int = 0) -> Path:
    """A tiny `LlavaForConditionalGeneration` base snapshot in bf16, sharded, with processor and chat template.

    Written by transformers' own `save_pretrained`, so the folder shows what 5.x writes: the checkpoint keys
    are the legacy LLaVA names (`language_model.model.*`, `language_model.lm_head.weight`, `vision_tower.*`,
    `multi_modal_projector.*`) even though the module tree is `model.language_model.*` / `lm_head.*` in memory,
    `processor_config.json` (no `preprocessor_config.json`), `chat_template.jinja`, and `dtype` in config.json.
    """
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    dest = _prepare_dest(dest)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(_NATIVE_SPECIAL_TOKENS, vocab_size=320),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_size, patch_size = 32, 8
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    assert isinstance(image_token_id, int)
    # "default" drops the CLS token: one image becomes (32 / 8) ** 2 = 16 `<image>` tokens.
    image_tokens = (image_size // patch_size) ** 2
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch_size,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=image_token_id,
        image_seq_length=image_tokens,
        vision_feature_select_strategy="default",
        # The last layer, so that every vision-tower tensor but the (unused) post_layernorm gets a gradient.
        vision_feature_layer=-1,
    )
    with _deterministic(seed):
        model = LlavaForConditionalGeneration(config).bfloat16()
    # About 290 KB of bf16: 100 KB shards give four files, with the vision tower apart from most of the LLM.
    model.save_pretrained(dest, max_shard_size="100KB")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=NATIVE_CHAT_TEMPLATE,
    )
    processor.save_pretrained(dest)
    (dest / "README.md").write_text(_NATIVE_README, encoding="utf-8")
    (dest / ".gitattributes").write_text(_GITATTRIBUTES, encoding="utf-8")
    return dest


# --------------------------------------------------------------------------------------------------------------
# (b) A remote-code VLM shaped like MiniCPM-V


def _remote_config_dict(vocab_size: int, token_ids: Mapping[str, int]) -> dict[str, Any]:
    """config.json as transformers 4.x wrote it for MiniCPM-Llama3-V-2_5 (`torch_dtype`, `_name_or_path`)."""
    return {
        "_name_or_path": "tiny-minicpmv",
        "architectures": ["MiniCPMV"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
            "AutoModel": "modeling_minicpmv.MiniCPMV",
            "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV",
        },
        "batch_vision_input": True,
        "bos_token_id": token_ids["<|begin_of_text|>"],
        "drop_vision_last_layer": False,
        "eos_token_id": [token_ids["<|end_of_text|>"], token_ids["<|eot_id|>"]],
        "hidden_act": "silu",
        "hidden_size": 64,
        "image_size": 28,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 256,
        "mlp_bias": False,
        "model_type": "minicpmv",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "patch_size": 7,
        "pretraining_tp": 1,
        "query_num": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "slice_config": {
            "max_slice_nums": 1,
            "model_type": "minicpmv",
            "patch_size": 7,
            "scale_resolution": 28,
        },
        "slice_mode": True,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": _LEGACY_TRANSFORMERS_VERSION,
        "use_cache": True,
        "vision_config": {
            "hidden_size": 32,
            "image_size": 28,
            "intermediate_size": 64,
            "layer_norm_eps": 1e-06,
            "model_type": "siglip",
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "patch_size": 7,
        },
        "vocab_size": vocab_size,
    }


def _remote_preprocessor_config() -> dict[str, Any]:
    return {
        "auto_map": {
            "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor",
            "AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
        },
        "im_end": "</image>",
        "im_start": "<image>",
        "image_feature_size": 8,
        "image_processor_type": "MiniCPMVImageProcessor",
        "max_slice_nums": 1,
        "norm_mean": [0.5, 0.5, 0.5],
        "norm_std": [0.5, 0.5, 0.5],
        "patch_size": 7,
        "processor_class": "MiniCPMVProcessor",
        "scale_resolution": 28,
        "slice_end": "</slice>",
        "slice_mode": True,
        "slice_start": "<slice>",
        "unk": "<unk>",
        "version": 2.5,
    }


def _remote_tokenizer_config(token_ids: Mapping[str, int]) -> dict[str, Any]:
    """tokenizer_config.json in the 4.x layout: chat template inline, `added_tokens_decoder`, `auto_map`."""
    added = {
        str(token_ids[token]): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token in _REMOTE_SPECIAL_TOKENS
    }
    return {
        "added_tokens_decoder": added,
        "auto_map": {"AutoTokenizer": [None, "tokenization_minicpmv_fast.MiniCPMVTokenizerFast"]},
        "bos_token": "<|begin_of_text|>",
        "chat_template": REMOTE_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|end_of_text|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "MiniCPMVTokenizerFast",
        "unk_token": "<unk>",
    }


def _remote_shards(keys: list[str], num_layers: int) -> list[list[str]]:
    """Shard 1: embeddings + the first half of the LLM layers; shard 2: the other layers; shard 3: the rest of
    the LLM (final norm, lm_head) together with every vision tensor. A vision fine-tune then leaves shards 1-2
    byte-for-byte untouched and forces a rewrite of shard 3, which also holds frozen LLM tensors."""
    half = num_layers // 2

    def shard_of(key: str) -> int:
        if key.startswith("llm.model.embed_tokens."):
            return 0
        if key.startswith("llm.model.layers."):
            return 0 if int(key.split(".")[3]) < half else 1
        return 2

    shards: list[list[str]] = [[], [], []]
    for key in sorted(keys):
        shards[shard_of(key)].append(key)
    return shards


def make_remote_code_vlm(dest: Path, *, seed: int = 0, repo_id: str = REMOTE_REPO_ID) -> Path:
    """A tiny MiniCPM-V look-alike base snapshot: remote code, bf16 weights in three shards, processor files,
    chat template, generation config, model card, LICENSE and .gitattributes.

    The JSON files are written the way transformers 4.x wrote the real repo (the base was not made by 5.x);
    the index's `metadata.total_size` is doubled, as in `openbmb/MiniCPM-Llama3-V-2_5`, so that nothing can
    lean on it. `repo_id` only appears in the model card's usage example.
    """

    from hubsync.testing.remote_code.configuration_minicpm import MiniCPMVConfig
    from hubsync.testing.remote_code.modeling_minicpmv import MiniCPMV

    dest = _prepare_dest(dest)
    backend = _train_bpe(_REMOTE_SPECIAL_TOKENS, vocab_size=384)
    token_ids = {token: backend.token_to_id(token) for token in _REMOTE_SPECIAL_TOKENS}
    config_dict = _remote_config_dict(backend.get_vocab_size(), token_ids)

    # config.json first, then read back: the model is built from exactly what the folder will say.
    _write_json(dest / "config.json", config_dict)
    config = MiniCPMVConfig.from_pretrained(dest)
    with _deterministic(seed):
        model = MiniCPMV(config).bfloat16()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    shards = _remote_shards(list(state), config.num_hidden_layers)
    _write_shards(state, dest, shards)
    index_path = dest / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["total_size"] *= 2
    _write_json(index_path, index)

    for name in REMOTE_CODE_FILES:
        shutil.copyfile(REMOTE_CODE_DIR / name, dest / name)
    _write_json(
        dest / "generation_config.json",
        {
            "bos_token_id": config_dict["bos_token_id"],
            "do_sample": False,
            "eos_token_id": config_dict["eos_token_id"],
            "transformers_version": _LEGACY_TRANSFORMERS_VERSION,
        },
    )
    _write_json(dest / "preprocessor_config.json", _remote_preprocessor_config())
    _write_json(dest / "tokenizer_config.json", _remote_tokenizer_config(token_ids))
    _write_json(
        dest / "special_tokens_map.json",
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "unk_token": "<unk>"},
    )
    _save_legacy_tokenizer_json(backend, dest / "tokenizer.json")
    (dest / "README.md").write_text(_REMOTE_README.format(repo_id=repo_id), encoding="utf-8")
    (dest / "LICENSE").write_text(_REMOTE_LICENSE, encoding="utf-8")
    (dest / ".gitattributes").write_text(_GITATTRIBUTES, encoding="utf-8")
    return dest


# --------------------------------------------------------------------------------------------------------------
# (c) Trainer outputs


def _is_remote_base(base_dir: Path) -> bool:
    return json.loads((Path(base_dir) / "config.json").read_text()).get("model_type") == "minicpmv"


@dataclass
class _Trained:
    """What a training run produced, in checkpoint key names and fp32."""

    state: dict[str, torch.Tensor]
    base: dict[str, torch.Tensor]
    tuned_keys: list[str]
    losses: list[float]
    learning_rate: float


def _optimise(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    batches: list[dict[str, Any]],
    steps: int,
    learning_rate: float,
) -> list[float]:
    """A few AdamW steps of next-token loss plus a small pull of every tuned weight toward 0.01. The pull gives
    every tuned tensor a gradient, even a zero bias the forward never reaches (CLIP's post_layernorm in LLaVA),
    so every tuned tensor moves; Adam's step is about `learning_rate` per element, far above bf16 resolution."""
    import torch

    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    losses = []
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = model(**batch).loss + 1e-4 * sum(((p.float() - 0.01) ** 2).sum() for p in params)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(round(float(loss.detach()), 6))
    model.eval()
    return losses


def _train_remote(base_dir: Path, tune: tuple[str, ...], steps: int) -> tuple[_Trained, Any]:
    from hubsync.testing.remote_code.configuration_minicpm import MiniCPMVConfig
    from hubsync.testing.remote_code.image_processing_minicpmv import MiniCPMVImageProcessor
    from hubsync.testing.remote_code.modeling_minicpmv import MiniCPMV
    from hubsync.testing.remote_code.processing_minicpmv import IMAGE_MARKER, MiniCPMVProcessor
    from hubsync.testing.remote_code.tokenization_minicpmv_fast import MiniCPMVTokenizerFast

    base = read_state_dict(base_dir)
    config = MiniCPMVConfig.from_pretrained(base_dir)
    model = MiniCPMV(config)
    model.load_state_dict({k: v.float() for k, v in base.items()}, strict=True)
    model.float()
    tokenizer = MiniCPMVTokenizerFast.from_pretrained(base_dir)
    processor = MiniCPMVProcessor(
        image_processor=MiniCPMVImageProcessor.from_pretrained(base_dir), tokenizer=tokenizer
    )
    batches = []
    for i, caption in enumerate(_CAPTIONS):
        msgs = [
            {"role": "user", "content": IMAGE_MARKER + "\nDescribe the image."},
            {"role": "assistant", "content": caption},
        ]
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        inputs = processor(text, [make_test_image(100 + i)], return_tensors="pt")
        labels = inputs["input_ids"].clone()
        labels[labels == tokenizer.unk_id] = -100  # the image slots carry no text to predict
        batches.append({**inputs, "labels": labels})
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(tune))
    params = [p for p in model.parameters() if p.requires_grad]
    learning_rate = 1e-2
    losses = _optimise(model, params, batches, steps, learning_rate)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tuned = sorted(k for k in state if k.startswith(tune))
    return _Trained(state, base, tuned, losses, learning_rate), tokenizer


def _checkpoint_names(model: Any) -> dict[str, str]:
    """Runtime parameter name -> the name `save_pretrained` writes to disk (transformers 5 renames some VLM
    keys back to their legacy layout on save)."""
    from transformers.core_model_loading import revert_weight_conversion

    mapping = {}
    for name, tensor in model.state_dict().items():
        (saved,) = revert_weight_conversion(model, {name: tensor}).keys()
        mapping[name] = saved
    return mapping


def _train_native(base_dir: Path, tune: tuple[str, ...], steps: int, key_style: str) -> tuple[_Trained, Any]:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(base_dir)
    names = _checkpoint_names(model)
    image_token_id = model.config.image_token_id
    batches = []
    for i, caption in enumerate(_CAPTIONS):
        msgs = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
            {"role": "assistant", "content": [{"type": "text", "text": caption}]},
        ]
        text = processor.apply_chat_template(msgs)
        inputs = dict(processor(images=[make_test_image(100 + i)], text=text, return_tensors="pt"))
        labels = inputs["input_ids"].clone()
        labels[labels == image_token_id] = -100
        batches.append({**inputs, "labels": labels})
    for name, param in model.named_parameters():
        param.requires_grad_(names[name].startswith(tune))
    params = [p for p in model.parameters() if p.requires_grad]
    learning_rate = 1e-2
    losses = _optimise(model, params, batches, steps, learning_rate)
    base_on_disk = read_state_dict(base_dir)
    state: dict[str, torch.Tensor] = {}
    base: dict[str, torch.Tensor] = {}
    tuned = []
    for runtime_name, tensor in model.state_dict().items():
        saved = names[runtime_name]
        key = runtime_name if key_style == "runtime" else saved
        state[key] = tensor.detach().clone()
        base[key] = base_on_disk[saved]
        if saved.startswith(tune):
            tuned.append(key)
    return _Trained(state, base, sorted(tuned), losses, learning_rate), processor.tokenizer


def _rewrite_auto_map(auto_map: Mapping[str, Any], repo_id: str) -> dict[str, Any]:
    """`module.Class` -> `repo_id--module.Class`, as transformers 4.x did when the base came from the Hub."""

    def prefixed(ref: Any) -> Any:
        if isinstance(ref, str) and "--" not in ref:
            return f"{repo_id}--{ref}"
        if isinstance(ref, list):
            return [prefixed(r) for r in ref]
        return ref

    return {key: prefixed(value) for key, value in auto_map.items()}


def make_trainer_output(
    base_dir: Path,
    dest: Path,
    *,
    base_repo_id: str,
    dtype: str = "float32",
    key_prefix: str = "",
    sharded: bool = False,
    stray_shard: bool = False,
    tune: tuple[str, ...] | None = None,
    steps: int = 3,
    seed: int = 0,
    also_perturb: str | None = None,
    key_style: str = "checkpoint",
    config_updates: Mapping[str, Any] | None = None,
) -> Path:
    """The output folder of a vision fine-tune of `base_dir`, made by really training the tuned parts.

    Args:
        base_repo_id: the Hub id the base was loaded from; for remote code it goes into the `repo--` auto_map.
        dtype: "float32" (no --bf16/--fp16 flag, the MiniCPM-V default), "bfloat16" or "float16".
        key_prefix: prepended to every saved key: "module." (DDP) or "_orig_mod." (torch.compile).
        sharded: two shards + index instead of one `model.safetensors`.
        stray_shard: leave an extra, stale shard that no index lists (an earlier save's leftover).
        tune: checkpoint key prefixes that are trained; default: the vision tower and its projector /
            resampler (`vpm.`, `resampler.` for remote code; `vision_tower.`, `multi_modal_projector.` native).
        also_perturb: a key prefix outside `tune` whose tensors are also changed (an LLM that was not frozen).
        key_style: native only: "checkpoint" writes the names `save_pretrained` writes; "runtime" writes the
            in-memory module names (`model.vision_tower.*`), as a trainer that dumps `state_dict()` does.
        config_updates: top-level keys merged into the saved config.json (e.g. a trainer-written
            `slice_config`), to reproduce config drift.

    The tokenizer is written by transformers 5's `tokenizer.save_pretrained` (so the chat template lands in
    `chat_template.jinja`); for remote code its `auto_map` is then rewritten to the `repo--` form as well.
    """
    import torch

    base_dir = Path(base_dir)
    dest = _prepare_dest(dest)
    remote = _is_remote_base(base_dir)
    if tune is None:
        tune = REMOTE_VISION_PREFIXES if remote else NATIVE_VISION_PREFIXES
    if key_style not in ("checkpoint", "runtime"):
        raise ValueError(f"key_style must be 'checkpoint' or 'runtime', not {key_style!r}")
    target_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    with _deterministic(seed):
        if remote:
            trained, tokenizer = _train_remote(base_dir, tuple(tune), steps)
        else:
            trained, tokenizer = _train_native(base_dir, tuple(tune), steps, key_style)
        if also_perturb is not None:
            _perturb(trained, also_perturb, seed)
    _check_tuned_changed(trained)
    state = {key_prefix + k: v.to(target_dtype).contiguous() for k, v in trained.state.items()}
    shard_files = _write_shards(state, dest, _split_by_size(state, 2) if sharded else None)
    if stray_shard:
        # A stale file from an earlier save with another shard count: base values of the tuned tensors.
        from safetensors.torch import save_file

        stale = {key_prefix + k: trained.base[k].to(target_dtype).contiguous() for k in trained.tuned_keys}
        stray_name = f"model-00001-of-{len(shard_files) + 1:05d}.safetensors"
        save_file(stale, str(dest / stray_name), metadata={"format": "pt"})
    _write_trainer_config(base_dir, dest, remote=remote, base_repo_id=base_repo_id, dtype=dtype)
    if config_updates:
        config = json.loads((dest / "config.json").read_text())
        config.update(copy.deepcopy(dict(config_updates)))
        _write_json(dest / "config.json", config)
    _save_trainer_tokenizer(tokenizer, base_dir, dest, remote=remote, base_repo_id=base_repo_id)
    _write_trainer_leftovers(
        dest,
        trained,
        steps=steps,
        seed=seed,
        dtype=dtype,
        base_repo_id=base_repo_id,
        tune_llm=also_perturb is not None,
    )
    return dest


def _perturb(trained: _Trained, prefix: str, seed: int) -> None:
    """Also change the tensors under `prefix` (a part that should have been frozen)."""
    import torch

    touched = [k for k in trained.state if k.startswith(prefix)]
    if not touched:
        raise ValueError(f"also_perturb={prefix!r} matches no tensor of the checkpoint")
    generator = torch.Generator().manual_seed(seed + 1)
    for key in touched:
        noise = torch.randn(trained.state[key].shape, generator=generator)
        trained.state[key] = trained.state[key] + 0.05 * noise


def _check_tuned_changed(trained: _Trained) -> None:
    """The point of the fixture: the tuned tensors must differ from the base even after rounding to the
    base's dtype, or a rebuild could not tell the fine-tune from the base."""
    import torch

    unchanged = [
        k
        for k in trained.tuned_keys
        if torch.equal(trained.state[k].to(trained.base[k].dtype), trained.base[k])
    ]
    if unchanged:
        raise RuntimeError(f"training left {len(unchanged)} tuned tensors equal to the base: {unchanged[:5]}")


def _save_trainer_tokenizer(
    tokenizer: Any, base_dir: Path, dest: Path, *, remote: bool, base_repo_id: str
) -> None:
    tokenizer.save_pretrained(dest)
    if remote:
        tokenizer_config_path = dest / "tokenizer_config.json"
        tokenizer_config = json.loads(tokenizer_config_path.read_text())
        base_tokenizer_config = json.loads((base_dir / "tokenizer_config.json").read_text())
        tokenizer_config["auto_map"] = _rewrite_auto_map(base_tokenizer_config["auto_map"], base_repo_id)
        _write_json(tokenizer_config_path, tokenizer_config)


def _write_trainer_leftovers(
    dest: Path, trained: _Trained, *, steps: int, seed: int, dtype: str, base_repo_id: str, tune_llm: bool
) -> None:
    """training_args.bin and trainer_state.json, as the Trainer leaves them beside the weights."""
    import torch

    # Plain types only, so that `torch.load(weights_only=True)` reads it back.
    torch.save(
        {
            "output_dir": str(dest.name),
            "learning_rate": trained.learning_rate,
            "max_steps": steps,
            "per_device_train_batch_size": 1,
            "seed": seed,
            "bf16": dtype == "bfloat16",
            "fp16": dtype == "float16",
            "tune_vision": True,
            "tune_llm": tune_llm,
            "use_lora": False,
            "model_name_or_path": base_repo_id,
        },
        dest / "training_args.bin",
    )
    log_history = [
        {
            "epoch": round((i + 1) / steps, 4),
            "learning_rate": trained.learning_rate,
            "loss": loss,
            "step": i + 1,
        }
        for i, loss in enumerate(trained.losses)
    ]
    _write_json(
        dest / "trainer_state.json",
        {
            "best_metric": None,
            "best_model_checkpoint": None,
            "epoch": 1.0,
            "global_step": steps,
            "is_hyper_param_search": False,
            "is_local_process_zero": True,
            "is_world_process_zero": True,
            "log_history": log_history,
            "logging_steps": 1,
            "max_steps": steps,
            "num_train_epochs": 1,
            "total_flos": 0.0,
            "train_batch_size": 1,
            "trial_name": None,
            "trial_params": None,
        },
    )


def _write_trainer_config(base_dir: Path, dest: Path, *, remote: bool, base_repo_id: str, dtype: str) -> None:
    config = json.loads((base_dir / "config.json").read_text())
    if remote:
        # Saved by transformers 4.x from a model loaded by Hub id: `repo--` auto_map, `_name_or_path` is the id,
        # `torch_dtype` is the training dtype. No `.py` file comes along.
        config["auto_map"] = _rewrite_auto_map(config["auto_map"], base_repo_id)
        config["_name_or_path"] = base_repo_id
        config["torch_dtype"] = dtype
        config["transformers_version"] = _LEGACY_TRANSFORMERS_VERSION
    else:
        # Saved by transformers 5: `dtype`, not `torch_dtype`.
        config["dtype"] = dtype
    _write_json(dest / "config.json", config)
    shutil.copyfile(base_dir / "generation_config.json", dest / "generation_config.json")


# --------------------------------------------------------------------------------------------------------------
# Publishing


def publish_model(
    folder: Path, repo_id: str, *, endpoint: str | None = None, token: str | None = None
) -> PublishedModel:
    """Upload `folder` as one commit to `repo_id` (created if missing) and return the commit sha."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, commit_message="Upload tiny base model"
    )
    return PublishedModel(repo_id=repo_id, sha=info.oid, local_dir=Path(folder))
