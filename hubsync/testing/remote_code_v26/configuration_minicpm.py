"""Configuration of the tiny MiniCPM-V 2.6 look-alike: Qwen2 fields at the top level, vision fields nested."""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import Qwen2Config


class MiniCPMVConfig(Qwen2Config):
    """The language model is built from the top-level (Qwen2) fields, as in MiniCPM-V 2.6; `vision_config` and
    `slice_config` stay plain dicts, so that config.json carries the keys the processor config must agree with."""

    model_type = "minicpmv"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]
    # ClassVar: transformers 5 turns annotated class attributes of a config into dataclass fields.
    default_vision_config: ClassVar[dict[str, Any]] = {
        "model_type": "siglip",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 28,
        "patch_size": 7,
        "layer_norm_eps": 1e-6,
    }

    def __init__(
        self,
        use_cache: bool = True,
        query_num: int = 8,
        image_size: int = 28,
        patch_size: int = 7,
        drop_vision_last_layer: bool = False,
        batch_vision_input: bool = True,
        slice_mode: bool = True,
        slice_config: dict[str, Any] | None = None,
        vision_config: dict[str, Any] | None = None,
        version: float = 2.6,
        **kwargs: Any,
    ) -> None:
        self.use_cache = use_cache
        self.query_num = query_num
        self.image_size = image_size
        self.patch_size = patch_size
        self.drop_vision_last_layer = drop_vision_last_layer
        self.batch_vision_input = batch_vision_input
        self.slice_mode = slice_mode
        self.version = version
        base_slice = {"patch_size": patch_size, "max_slice_nums": 1, "scale_resolution": image_size}
        self.slice_config = {**base_slice, **(slice_config or {})}
        vision = {**self.default_vision_config, "image_size": image_size, "patch_size": patch_size}
        self.vision_config = {**vision, **(vision_config or {})}
        super().__init__(use_cache=use_cache, **kwargs)
