"""Configuration of the tiny MiniCPM-V look-alike (a stand-in for openbmb's `configuration_minicpm.py`)."""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import LlamaConfig


class MiniCPMVConfig(LlamaConfig):
    """Language-model fields live at the top level, as in MiniCPM-Llama3-V-2.5; vision fields are nested dicts.

    Like the real one this class defines its own `__init__` (transformers 5 still accepts that for remote
    configs) and keeps `slice_config` / `vision_config` as plain dicts so that `config.json` carries the keys
    that `preprocessor_config.json` must agree with.
    """

    model_type = "minicpmv"
    keys_to_ignore_at_inference: ClassVar[list[str]] = ["past_key_values"]

    # ClassVar, not a plain annotation: transformers 5 turns annotated config class attributes into dataclass fields.
    default_vision_config: ClassVar[dict[str, Any]] = {
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
        **kwargs: Any,
    ) -> None:
        self.use_cache = use_cache
        self.query_num = query_num
        self.image_size = image_size
        self.patch_size = patch_size
        self.drop_vision_last_layer = drop_vision_last_layer
        self.batch_vision_input = batch_vision_input
        self.slice_mode = slice_mode
        base_slice = {"patch_size": patch_size, "max_slice_nums": 1, "scale_resolution": image_size}
        self.slice_config = {**base_slice, **(slice_config or {})}
        self.vision_config = {**self.default_vision_config, **(vision_config or {})}
        super().__init__(use_cache=use_cache, **kwargs)
