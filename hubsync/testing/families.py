"""A matrix of tiny vision-language model families, in the layouts the Hub carries, and their vision fine-tunes
saved the ways trainers save.

Every family is built offline from a config with tiny random weights (fixed seed), a byte-level BPE tokenizer
trained on a fixed corpus, its real transformers processor and a chat template, so that the base loads and
generates with transformers 5 like the real repo does.

Two base layouts:

* `checkpoint`: the tensor names the Hub repos carry, written by transformers 4.x (llava-hf's
  `language_model.model.*` / `vision_tower.vision_model.*`, Qwen2-VL's `model.*` / `visual.*`, ...). The
  table of names is ours, written from the public repos' indexes; transformers 5 loading such a base without
  a missing or unexpected key is the proof that it is right.
* `runtime`: the module names of transformers 5 (`model.vision_tower.*` without CLIP's `vision_model.` level,
  `model.language_model.*`), which is what repos saved from a raw `state_dict()` carry. Only for the families
  where the two differ.

A fine-tune loads the base with transformers 5 (`from_pretrained`, so the real key conversion runs), changes
only the vision side (a deterministic perturbation of exactly the vision tensors, in float32), and is saved
one of `WAYS`:

* `save_pretrained`: `Trainer.save_model` / `save_pretrained` of a bf16 run: transformers 5 writes the
  checkpoint names back, bf16, with config, generation config, tokenizer and `training_args.bin`;
* `accelerate`: `Accelerator.save_model`, the raw `state_dict()` in safetensors (runtime names, float32, tied
  duplicates removed by accelerate), weights only;
* `bin`: `torch.save(model.state_dict())` as `pytorch_model.bin` (runtime names, float32, tied duplicates kept)
  with config.json;
* `fsdp`: an FSDP full state dict as accelerate and the Trainer write it (`pytorch_model_fsdp.bin`: runtime
  names, float32);
* `deepspeed`: what `zero_to_fp32.py --safe_serialization` writes after a bf16 run: the bf16 weights upcast to
  float32, runtime names, tied duplicates as copies, sharded with an index (emulated without deepspeed: same
  file layout, names and dtypes).

The MiniCPM-V 2.6-style family (`minicpmv26`) runs our own look-alike remote code (`remote_code_v26/`): a Qwen2
language model under `llm.`, a SigLIP-shaped vision tower under `vpm.`, a resampler under `resampler.`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubsync.testing.models import (
    _GITATTRIBUTES,
    _deterministic,
    _prepare_dest,
    _train_bpe,
    _write_json,
    _write_shards,
)

if TYPE_CHECKING:
    import torch

WAYS = ("save_pretrained", "accelerate", "bin", "fsdp", "deepspeed")
LAYOUTS = ("checkpoint", "runtime")
REMOTE_CODE_V26_DIR = Path(__file__).parent / "remote_code_v26"
REMOTE_CODE_V26_FILES = (
    "configuration_minicpm.py",
    "image_processing_minicpmv.py",
    "modeling_minicpmv.py",
    "modeling_navit_siglip.py",
    "processing_minicpmv.py",
    "resampler.py",
    "tokenization_minicpmv_fast.py",
)
# Far above bf16's resolution at the tensors' scale, so that every vision tensor visibly moves in bf16 too.
PERTURBATION = 0.05

# --------------------------------------------------------------------------------------------------------------
# Chat templates: one shape, the family's own markers. Content may be a string or a list of image/text items.


def _chat_template(start: str, end: str, image: str, generation: str, bos: bool = True) -> str:
    """`start` holds `{role}`; the template renders both plain-string and image/text-list messages."""
    head, _, tail = start.partition("{role}")
    role = f"{head}{{{{ message['role'] }}}}{tail}" if _ else head
    return (
        ("{{ bos_token }}" if bos else "")
        + "{% for message in messages %}"
        + role.replace("\n", "{{ '\\n' }}")
        + "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
        + image.replace("\n", "{{ '\\n' }}")
        + "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
        + end.replace("\n", "{{ '\\n' }}")
        + "{% endfor %}{% if add_generation_prompt %}"
        + generation.replace("\n", "{{ '\\n' }}")
        + "{% endif %}"
    )


# --------------------------------------------------------------------------------------------------------------
# The families


@dataclass(frozen=True)
class Family:
    """One model family: how to build it tiny, and how its tensors are named in each layout."""

    name: str
    model_class: str  # transformers class, or the remote-code class for `remote`
    dtype: str  # the base's dtype, as the Hub repo has it
    special_tokens: tuple[str, ...]
    make: Callable[[Any], tuple[Any, Any]]  # tokenizer -> (config, processor)
    vision: tuple[str, ...]  # runtime prefixes of what a vision fine-tune trains
    # runtime prefix -> 4.x checkpoint prefix, first match wins; a prefix mapped to None is not stored (tied)
    checkpoint_names: tuple[tuple[str, str | None], ...]
    tuned: Mapping[str, tuple[str, ...]]  # layout -> the manifest's `finetune.tuned` in that layout's names
    remote: bool = False
    tied: bool = False

    @property
    def layouts(self) -> tuple[str, ...]:
        differs = any(a != b for a, b in self.checkpoint_names)
        return LAYOUTS if differs else ("checkpoint",)

    def stored_name(self, runtime_name: str, layout: str) -> str | None:
        """The name a base in `layout` stores a runtime tensor under (None: not stored, a tied duplicate)."""
        if self.tied and runtime_name == "lm_head.weight":
            return None
        if layout == "runtime":
            return runtime_name
        for runtime_prefix, stored_prefix in self.checkpoint_names:
            if runtime_name.startswith(runtime_prefix) and stored_prefix is not None:
                return stored_prefix + runtime_name[len(runtime_prefix) :]
        return runtime_name


def _tokens(tokenizer: Any, *names: str) -> dict[str, int]:
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in names}
    assert all(isinstance(i, int) and i >= 0 for i in ids.values()), ids
    return ids


def _llama_text(tokenizer: Any, **extra: Any) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **extra,
    }


def _vit(**extra: Any) -> dict[str, Any]:
    """A CLIP / SigLIP vision tower: 32x32 images in 8x8 patches, two layers of width 32."""
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
        **extra,
    }


def _llava(tokenizer: Any) -> tuple[Any, Any]:
    from transformers import LlavaConfig, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", **_vit(projection_dim=32)},
        text_config={"model_type": "llama", **_llama_text(tokenizer)},
        image_token_index=_tokens(tokenizer, "<image>")["<image>"],
        image_seq_length=16,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_chat_template("{role}: ", "\n", "<image>\n", "ASSISTANT:"),
    )
    return config, processor


def _llava_next(tokenizer: Any) -> tuple[Any, Any]:
    from transformers import LlavaNextConfig, LlavaNextImageProcessorPil, LlavaNextProcessor

    pinpoints = [[32, 32], [32, 64], [64, 32]]
    config = LlavaNextConfig(
        vision_config={"model_type": "clip_vision_model", **_vit(projection_dim=32)},
        text_config={"model_type": "llama", **_llama_text(tokenizer)},
        image_token_index=_tokens(tokenizer, "<image>")["<image>"],
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": 32},
            crop_size={"height": 32, "width": 32},
            image_grid_pinpoints=pinpoints,
        ),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_chat_template("[INST] ", " [/INST]\n", "<image>\n", ""),
    )
    return config, processor


_QWEN_CHAT = _chat_template(
    "<|im_start|>{role}\n",
    "<|im_end|>\n",
    "<|vision_start|><|image_pad|><|vision_end|>",
    "<|im_start|>assistant\n",
    bos=False,
)


def _qwen_text(tokenizer: Any) -> dict[str, Any]:
    # head_dim 8: the three M-RoPE sections (time, height, width) share its 4 rotary frequencies
    return {
        **_llama_text(tokenizer),
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
    }


@dataclass(frozen=True)
class _ProcessorFiles:
    """The files of a processor that cannot be built here: transformers 5 refuses to construct a Qwen2-VL
    processor without torchvision (its video processor), so its files are written as the Hub repos have them:
    preprocessor_config.json naming the processor class, chat_template.jinja and the tokenizer."""

    image_processor: Any
    tokenizer: Any
    chat_template: str
    processor_class: str

    def save_pretrained(self, dest: Path) -> None:
        config = {**self.image_processor.to_dict(), "processor_class": self.processor_class}
        _write_json(dest / "preprocessor_config.json", config)
        (dest / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        self.tokenizer.save_pretrained(dest)


def _qwen_processor(cls_name: str, tokenizer: Any) -> Any:
    from transformers import Qwen2VLImageProcessorPil

    # 28 = patch 14 x merge 2: a 40x32 picture becomes a 28x28 grid, one merged vision token
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 28 * 28, "longest_edge": 56 * 56}, patch_size=14, merge_size=2
    )
    return _ProcessorFiles(image_processor, tokenizer, _QWEN_CHAT, cls_name)


def _qwen_ids(tokenizer: Any) -> dict[str, Any]:
    ids = _tokens(tokenizer, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def _qwen2_vl(tokenizer: Any) -> tuple[Any, Any]:
    from transformers import Qwen2VLConfig

    config = Qwen2VLConfig(
        text_config=_qwen_text(tokenizer),
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        **_qwen_ids(tokenizer),
    )
    return config, _qwen_processor("Qwen2VLProcessor", tokenizer)


def _qwen2_5_vl(tokenizer: Any) -> tuple[Any, Any]:
    from transformers import Qwen2_5_VLConfig

    config = Qwen2_5_VLConfig(
        text_config=_qwen_text(tokenizer),
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 32,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        },
        **_qwen_ids(tokenizer),
    )
    return config, _qwen_processor("Qwen2_5_VLProcessor", tokenizer)


def _idefics3(tokenizer: Any) -> tuple[Any, Any]:
    from transformers import Idefics3Config, Idefics3ImageProcessorPil, Idefics3Processor

    config = Idefics3Config(
        vision_config=_vit(),
        text_config={"model_type": "llama", **_llama_text(tokenizer)},
        image_token_id=_tokens(tokenizer, "<image>")["<image>"],
        scale_factor=2,
    )
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(
            do_image_splitting=False, size={"longest_edge": 32}, max_image_size={"longest_edge": 32}
        ),
        tokenizer=tokenizer,
        image_seq_len=4,  # (32 / 8) ** 2 patches, merged 2x2 by the connector
        chat_template=_chat_template("{role}:", "<end_of_utterance>\n", "<image>", "Assistant:"),
    )
    return config, processor


def _paligemma(tokenizer: Any) -> tuple[Any, Any]:
    from transformers import PaliGemmaConfig, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    config = PaliGemmaConfig(
        vision_config={"model_type": "siglip_vision_model", **_vit(projection_dim=32, vision_use_head=False)},
        text_config={"model_type": "gemma", **_llama_text(tokenizer, num_key_value_heads=1, head_dim=8)},
        image_token_index=_tokens(tokenizer, "<image>")["<image>"],
        projection_dim=32,
    )
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    # PaliGemma's preprocessor_config.json carries how many image tokens the processor inserts
    setattr(image_processor, "image_seq_length", 16)  # noqa: B010 - not a declared attribute of the class
    processor = PaliGemmaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=_chat_template("", "\n", "", "", bos=False),
    )
    return config, processor


def _gemma3(tokenizer: Any) -> tuple[Any, Any]:
    from transformers import Gemma3Config, Gemma3ImageProcessorPil, Gemma3Processor

    ids = _tokens(tokenizer, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    config = Gemma3Config(
        text_config=_llama_text(tokenizer, num_key_value_heads=1, head_dim=8, sliding_window=16),
        vision_config=_vit(vision_use_head=False),
        mm_tokens_per_image=4,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
        image_seq_length=4,
        chat_template=_chat_template(
            "<start_of_turn>{role}\n", "<end_of_turn>\n", "<start_of_image>", "<start_of_turn>model\n"
        ),
    )
    return config, processor


def _mllama(tokenizer: Any) -> tuple[Any, Any]:
    from transformers import MllamaConfig, MllamaImageProcessorPil, MllamaProcessor

    config = MllamaConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_global_layers": 1,
            "attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "max_num_tiles": 2,
            "intermediate_layers_indices": [0],
            "vision_output_dim": 64,  # hidden_size x (1 + the intermediate layers kept)
            "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]],
        },
        text_config={**_llama_text(tokenizer), "cross_attention_layers": [1]},
        image_token_index=_tokens(tokenizer, "<|image|>")["<|image|>"],
    )
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=2),
        tokenizer=tokenizer,
        chat_template=_chat_template(
            "<|start_header_id|>{role}<|end_header_id|>\n\n",
            "<|eot_id|>",
            "<|image|>",
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ),
    )
    return config, processor


def _minicpmv26(tokenizer: Any) -> tuple[Any, Any]:
    from hubsync.testing.remote_code_v26.configuration_minicpm import MiniCPMVConfig
    from hubsync.testing.remote_code_v26.image_processing_minicpmv import MiniCPMVImageProcessor
    from hubsync.testing.remote_code_v26.processing_minicpmv import MiniCPMVProcessor

    config = MiniCPMVConfig(
        **{k: v for k, v in _llama_text(tokenizer).items() if k != "pad_token_id"},
        query_num=8,
        image_size=28,
        patch_size=7,
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2},
        tie_word_embeddings=False,
    )
    processor = MiniCPMVProcessor(
        image_processor=MiniCPMVImageProcessor(image_feature_size=8, scale_resolution=28, patch_size=7),
        tokenizer=tokenizer,
    )
    return config, processor


_CLIP_LLAVA_NAMES: tuple[tuple[str, str | None], ...] = (
    ("lm_head.", "language_model.lm_head."),
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)
_LLAVA_TUNED = {
    "checkpoint": ("vision_tower.", "multi_modal_projector."),
    "runtime": ("model.vision_tower.", "model.multi_modal_projector."),
}
_QWEN_NAMES: tuple[tuple[str, str | None], ...] = (
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
)
_LLAMA_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
_QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="llava",
            model_class="LlavaForConditionalGeneration",
            dtype="float16",  # llava-hf/llava-1.5-7b-hf is fp16
            special_tokens=(*_LLAMA_SPECIALS, "<image>"),
            make=_llava,
            vision=("model.vision_tower.", "model.multi_modal_projector."),
            checkpoint_names=_CLIP_LLAVA_NAMES,
            tuned=_LLAVA_TUNED,
        ),
        Family(
            name="llava_next",
            model_class="LlavaNextForConditionalGeneration",
            dtype="bfloat16",
            special_tokens=(*_LLAMA_SPECIALS, "<image>"),
            make=_llava_next,
            vision=("model.vision_tower.", "model.multi_modal_projector.", "model.image_newline"),
            checkpoint_names=(*_CLIP_LLAVA_NAMES, ("model.image_newline", "image_newline")),
            tuned={
                "checkpoint": ("vision_tower.", "multi_modal_projector.", "image_newline"),
                "runtime": ("model.vision_tower.", "model.multi_modal_projector.", "model.image_newline"),
            },
        ),
        Family(
            name="qwen2_vl",
            model_class="Qwen2VLForConditionalGeneration",
            dtype="bfloat16",
            special_tokens=_QWEN_SPECIALS,
            make=_qwen2_vl,
            vision=("model.visual.",),
            checkpoint_names=_QWEN_NAMES,
            tuned={"checkpoint": ("visual.",), "runtime": ("model.visual.",)},
        ),
        Family(
            name="qwen2_5_vl",
            model_class="Qwen2_5_VLForConditionalGeneration",
            dtype="bfloat16",
            special_tokens=_QWEN_SPECIALS,
            make=_qwen2_5_vl,
            vision=("model.visual.",),
            checkpoint_names=_QWEN_NAMES,
            tuned={"checkpoint": ("visual.",), "runtime": ("model.visual.",)},
        ),
        Family(
            name="idefics3",
            model_class="Idefics3ForConditionalGeneration",
            dtype="bfloat16",
            special_tokens=(
                *_LLAMA_SPECIALS,
                "<image>",
                "<fake_token_around_image>",
                "<global-img>",
                "<end_of_utterance>",
            ),
            make=_idefics3,
            vision=("model.vision_model.", "model.connector."),
            checkpoint_names=(),
            tuned={"checkpoint": ("model.vision_model.", "model.connector.")},
        ),
        Family(
            name="paligemma",
            model_class="PaliGemmaForConditionalGeneration",
            dtype="bfloat16",
            special_tokens=(*_LLAMA_SPECIALS, "<image>"),
            make=_paligemma,
            vision=("model.vision_tower.", "model.multi_modal_projector."),
            checkpoint_names=_CLIP_LLAVA_NAMES[1:],
            tuned=_LLAVA_TUNED,
            tied=True,
        ),
        Family(
            name="gemma3",
            model_class="Gemma3ForConditionalGeneration",
            dtype="bfloat16",
            special_tokens=(
                *_LLAMA_SPECIALS,
                "<start_of_turn>",
                "<end_of_turn>",
                "<start_of_image>",
                "<end_of_image>",
                "<image_soft_token>",
            ),
            make=_gemma3,
            vision=("model.vision_tower.", "model.multi_modal_projector."),
            checkpoint_names=_CLIP_LLAVA_NAMES[1:],
            tuned=_LLAVA_TUNED,
            tied=True,
        ),
        Family(
            name="mllama",
            model_class="MllamaForConditionalGeneration",
            dtype="bfloat16",
            special_tokens=(
                "<|begin_of_text|>",
                "<|end_of_text|>",
                "<|finetune_right_pad_id|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
                "<|python_tag|>",
                "<|image|>",
            ),
            make=_mllama,
            vision=("model.vision_model.", "model.multi_modal_projector."),
            checkpoint_names=(
                ("lm_head.", "language_model.lm_head."),
                ("model.language_model.", "language_model.model."),
                ("model.vision_model.", "vision_model."),
                ("model.multi_modal_projector.", "multi_modal_projector."),
            ),
            tuned={
                "checkpoint": ("vision_model.", "multi_modal_projector."),
                "runtime": ("model.vision_model.", "model.multi_modal_projector."),
            },
        ),
        Family(
            name="minicpmv26",
            model_class="MiniCPMV",
            dtype="bfloat16",
            special_tokens=(
                "<|endoftext|>",
                "<|im_start|>",
                "<|im_end|>",
                "<unk>",
                "<image>",
                "</image>",
                "<slice>",
                "</slice>",
            ),
            make=_minicpmv26,
            vision=("vpm.", "resampler."),
            checkpoint_names=(),
            tuned={"checkpoint": ("vpm.", "resampler.")},
            remote=True,
        ),
    )
}


# --------------------------------------------------------------------------------------------------------------
# Tokenizers


_SPECIAL_ROLES: dict[str, dict[str, str]] = {
    "<s>": {"bos_token": "<s>"},
    "</s>": {"eos_token": "</s>"},
    "<unk>": {"unk_token": "<unk>"},
    "<pad>": {"pad_token": "<pad>"},
    "<|begin_of_text|>": {"bos_token": "<|begin_of_text|>"},
    "<|end_of_text|>": {"eos_token": "<|end_of_text|>"},
    "<|finetune_right_pad_id|>": {"pad_token": "<|finetune_right_pad_id|>"},
    "<|endoftext|>": {"pad_token": "<|endoftext|>"},
    "<|im_end|>": {"eos_token": "<|im_end|>"},
}
_EXTRA_SPECIAL = {
    "<image>": "image_token",
    "<|image|>": "image_token",
    "<|image_pad|>": "image_token",
    "<|video_pad|>": "video_token",
    "<start_of_image>": "boi_token",
    "<end_of_image>": "eoi_token",
    "<image_soft_token>": "image_token",
}


def _tokenizer(family: Family) -> Any:
    """A fast tokenizer over a BPE trained on a fixed corpus (the same bytes on every run)."""
    from transformers import PreTrainedTokenizerFast

    roles: dict[str, str] = {}
    for token in family.special_tokens:
        roles.update(_SPECIAL_ROLES.get(token, {}))
    if "<|im_end|>" in family.special_tokens:  # a ChatML vocabulary has no bos of its own
        roles.setdefault("bos_token", "<|endoftext|>")
    extra = {_EXTRA_SPECIAL[t]: t for t in family.special_tokens if t in _EXTRA_SPECIAL and not family.remote}
    cls: Any = PreTrainedTokenizerFast
    if family.remote:
        from hubsync.testing.remote_code_v26.tokenization_minicpmv_fast import MiniCPMVTokenizerFast

        cls = MiniCPMVTokenizerFast
        roles["chat_template"] = _chat_template(
            "<|im_start|>{role}\n", "<|im_end|>\n", "", "<|im_start|>assistant\n", bos=False
        )
    return cls(
        tokenizer_object=_train_bpe(family.special_tokens, vocab_size=320),
        extra_special_tokens=extra,
        **roles,
    )


# --------------------------------------------------------------------------------------------------------------
# Bases


def _model_class(family: Family) -> Any:
    if family.remote:
        from hubsync.testing.remote_code_v26.modeling_minicpmv import MiniCPMV

        return MiniCPMV
    import transformers

    return getattr(transformers, family.model_class)


def make_family_base(name: str, dest: Path, *, layout: str = "checkpoint", seed: int = 0) -> Path:
    """A tiny base snapshot of family `name` in `layout` (see the module docstring), in the family's dtype, over
    two shards with an index, with its tokenizer, processor, chat template, generation config and card."""
    import torch

    family = FAMILIES[name]
    if layout not in family.layouts:
        raise ValueError(f"{name} has no {layout!r} layout; it has {family.layouts}")
    dest = _prepare_dest(dest)
    tokenizer = _tokenizer(family)
    config, processor = family.make(tokenizer)
    with _deterministic(seed):
        model = _model_class(family)(config).to(getattr(torch, family.dtype))
    state = _stored_state(family, model, layout)
    _write_shards(state, dest, _two_shards(state, family, layout))
    config.architectures = [family.model_class]  # what `save_pretrained` of the model writes
    config.save_pretrained(dest)
    _write_generation_config(dest, tokenizer)
    if family.remote:
        _save_remote_processor(dest, tokenizer, processor)
    else:
        processor.save_pretrained(dest)
    (dest / "README.md").write_text(_card(family, layout), encoding="utf-8")
    (dest / ".gitattributes").write_text(_GITATTRIBUTES, encoding="utf-8")
    return dest


def _stored_state(family: Family, model: Any, layout: str) -> dict[str, torch.Tensor]:
    state = {}
    for runtime_name, tensor in model.state_dict().items():
        stored = family.stored_name(runtime_name, layout)
        if stored is not None:
            state[stored] = tensor.detach().clone().contiguous()
    return state


def _two_shards(state: Mapping[str, Any], family: Family, layout: str) -> list[list[str]]:
    """The language model's first layers in shard 1, everything else (vision included) in shard 2: a vision
    fine-tune leaves shard 1 a byte copy and rewrites shard 2, which also holds frozen tensors."""
    first = {k for k in state if ".layers.0." in k and not k.startswith(family.tuned[layout])}
    return [sorted(first), sorted(k for k in state if k not in first)]


def _write_generation_config(dest: Path, tokenizer: Any) -> None:
    _write_json(
        dest / "generation_config.json",
        {
            "bos_token_id": tokenizer.bos_token_id,
            "do_sample": False,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
    )


def _save_remote_processor(dest: Path, tokenizer: Any, processor: Any) -> None:
    """The remote code ships in the repo and every `auto_map` points at it, as in openbmb/MiniCPM-V-2_6:
    config.json, preprocessor_config.json (the image processor's fields) and tokenizer_config.json."""
    for file in REMOTE_CODE_V26_FILES:
        shutil.copyfile(REMOTE_CODE_V26_DIR / file, dest / file)
    config = json.loads((dest / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
        "AutoModel": "modeling_minicpmv.MiniCPMV",
        "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV",
    }
    config["architectures"] = ["MiniCPMV"]
    _write_json(dest / "config.json", config)
    image_processor = processor.image_processor
    preprocessor = {
        key: getattr(image_processor, key)
        for key in (
            "image_feature_size",
            "scale_resolution",
            "patch_size",
            "max_slice_nums",
            "im_start",
            "im_end",
            "slice_start",
            "slice_end",
            "unk",
            "norm_mean",
            "norm_std",
            "slice_mode",
            "version",
        )
    }
    preprocessor.update(
        image_processor_type="MiniCPMVImageProcessor",
        processor_class="MiniCPMVProcessor",
        auto_map={
            "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor",
            "AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
        },
    )
    _write_json(dest / "preprocessor_config.json", preprocessor)
    tokenizer.save_pretrained(dest)
    _write_json(dest / "tokenizer_config.json", _legacy_tokenizer_config(tokenizer))
    (dest / "chat_template.jinja").unlink(missing_ok=True)  # 4.x kept the template in tokenizer_config.json


def _legacy_tokenizer_config(tokenizer: Any) -> dict[str, Any]:
    """tokenizer_config.json as transformers 4.x wrote it for openbmb/MiniCPM-V-2_6. transformers 5's own file
    (`extra_special_tokens` as a list, `backend`) does not load in 4.x, and the repo was not made by 5.x."""
    added = {
        str(token_id): {
            "content": token.content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token_id, token in sorted(tokenizer.added_tokens_decoder.items())
    }
    return {
        "added_tokens_decoder": added,
        "auto_map": {"AutoTokenizer": [None, "tokenization_minicpmv_fast.MiniCPMVTokenizerFast"]},
        "bos_token": tokenizer.bos_token,
        "chat_template": tokenizer.chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": tokenizer.eos_token,
        "model_max_length": 32768,
        "pad_token": tokenizer.pad_token,
        "tokenizer_class": "MiniCPMVTokenizerFast",
        "unk_token": "<unk>",
    }


def _card(family: Family, layout: str) -> str:
    return (
        "---\nlicense: apache-2.0\npipeline_tag: image-text-to-text\nlibrary_name: transformers\n---\n\n"
        f"# Tiny {family.name} (test fixture, {layout} layout)\n\n"
        "Random weights made by `hubsync.testing.families`; it loads and answers with noise.\n"
    )


# --------------------------------------------------------------------------------------------------------------
# Fine-tunes


def load_family_model(base_dir: Path, name: str, dtype: str = "float32") -> Any:
    """The base as a training script loads it: transformers' `from_pretrained` (remote code: the look-alike's
    class, as `trust_remote_code` would import it), in the training dtype."""
    import torch

    cls = _model_class(FAMILIES[name])
    return cls.from_pretrained(base_dir, dtype=getattr(torch, dtype))


def perturb_vision(model: Any, name: str, *, seed: int = 0) -> list[str]:
    """Change every vision tensor (runtime names under the family's `vision` prefixes) and nothing else, by a
    seeded deterministic amount; returns the runtime names changed."""
    import torch

    family = FAMILIES[name]
    generator = torch.Generator().manual_seed(seed + 1)
    changed = []
    with torch.no_grad():
        for runtime_name, param in model.named_parameters():
            if runtime_name.startswith(family.vision):
                noise = torch.randn(param.shape, generator=generator) * PERTURBATION
                param.copy_((param.float() + noise).to(param.dtype))
                changed.append(runtime_name)
    if not changed:
        raise RuntimeError(f"no parameter of {name} is under {family.vision}")
    return changed


def make_family_finetune(base_dir: Path, name: str, way: str, dest: Path, *, seed: int = 0) -> Path:
    """The output folder of a vision fine-tune of `base_dir` (a `make_family_base` folder), saved `way`."""
    if way not in WAYS:
        raise ValueError(f"way must be one of {WAYS}, not {way!r}")
    dest = _prepare_dest(dest)
    bf16_run = way in ("save_pretrained", "deepspeed")
    model = load_family_model(base_dir, name, "bfloat16" if bf16_run else "float32")
    perturb_vision(model, name, seed=seed)
    SAVERS[way](model, dest)
    if way in ("save_pretrained", "bin"):
        _copy_tokenizer(base_dir, dest)
    return dest


def save_pretrained(model: Any, dest: Path) -> None:
    """What `Trainer.save_model` does for a `PreTrainedModel`: `save_pretrained`, plus the training args."""
    import torch

    model.save_pretrained(dest)
    torch.save({"bf16": True, "learning_rate": 1e-5, "output_dir": dest.name}, dest / "training_args.bin")


def save_accelerate(model: Any, dest: Path) -> None:
    from accelerate import Accelerator

    Accelerator(cpu=True).save_model(model, dest)


def save_bin(model: Any, dest: Path) -> None:
    import torch

    torch.save(model.state_dict(), dest / "pytorch_model.bin")
    model.config.save_pretrained(dest)


def save_fsdp_full(model: Any, dest: Path) -> None:
    """accelerate's `save_fsdp_model` with FULL_STATE_DICT: the unsharded state dict under FSDP's file name."""
    import torch

    torch.save(model.state_dict(), dest / "pytorch_model_fsdp.bin")


def save_zero_to_fp32(model: Any, dest: Path) -> None:
    """The file layout of `zero_to_fp32.py CHECKPOINT OUT --safe_serialization`: float32 copies of every tensor
    (a tied tensor copied under each of its names), sharded by size with `model.safetensors.index.json`."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    state = {k: v.detach().float().clone().contiguous() for k, v in model.state_dict().items()}
    total = sum(t.numel() * t.element_size() for t in state.values())
    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=total // 2 + 1
    )
    for file, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, str(dest / file), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


SAVERS: dict[str, Callable[[Any, Path], None]] = {
    "save_pretrained": save_pretrained,
    "accelerate": save_accelerate,
    "bin": save_bin,
    "fsdp": save_fsdp_full,
    "deepspeed": save_zero_to_fp32,
}


def _copy_tokenizer(base_dir: Path, dest: Path) -> None:
    """The trainer saves its tokenizer (not the processor): the processor config goes missing."""
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (base_dir / file).is_file():
            shutil.copyfile(base_dir / file, dest / file)
