"""Tiny MiniCPM-V 2.6 look-alike: `vpm` (SigLIP-shaped) -> `resampler` -> `llm` (Qwen2), with a `chat()`.

As in the real model, `chat()` asks `AutoProcessor` for the processor of `config._name_or_path` when it is not
given one, so a folder without processor files fails like MiniCPM-V #408 (`... has no attribute
image_processor`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import AutoProcessor, PreTrainedModel, Qwen2ForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_minicpm import MiniCPMVConfig
from .modeling_navit_siglip import SiglipVisionTransformer
from .resampler import Resampler

try:  # transformers 5: these initialisers leave tensors loaded from the checkpoint alone
    from transformers import initialization as init
except ImportError:  # transformers 4.x only initialises modules the checkpoint did not fill
    from torch.nn import init  # type: ignore[no-redef]


class MiniCPMVPreTrainedModel(PreTrainedModel):
    config_class = MiniCPMVConfig
    base_model_prefix = "llm"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Qwen2DecoderLayer", "SiglipEncoderLayer"]  # noqa: RUF012

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            init.normal_(module.in_proj_weight, mean=0.0, std=0.02)
            init.zeros_(module.in_proj_bias)
        elif isinstance(module, Resampler):
            init.normal_(module.query, mean=0.0, std=0.02)
            init.normal_(module.proj, mean=0.0, std=module.embed_dim**-0.5)
        elif type(module).__name__ == "Qwen2RMSNorm":
            weight: Any = module.weight
            init.ones_(weight)


class MiniCPMV(MiniCPMVPreTrainedModel):
    def __init__(self, config: MiniCPMVConfig) -> None:
        super().__init__(config)
        self.llm = Qwen2ForCausalLM(config)
        self.vpm = SiglipVisionTransformer(config.vision_config)
        self.resampler = Resampler(
            num_queries=config.query_num,
            embed_dim=config.hidden_size,
            num_heads=max(1, config.hidden_size // 16),
            kv_dim=int(config.vision_config["hidden_size"]),
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_vision_embedding(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, 3, H, W) -> (images, query_num, hidden_size)."""
        dtype = self.vpm.embeddings.patch_embedding.weight.dtype
        return self.resampler(self.vpm(pixel_values.to(dtype)))

    def get_vllm_embedding(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_bound: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Token embeddings with each image's `query_num` placeholder slots replaced by its vision tokens."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds
        if image_bound is None:
            raise ValueError(
                "pixel_values were given without image_bound: run the inputs through the processor."
            )
        vision = self.get_vision_embedding(pixel_values).to(embeds.dtype)
        rows = []
        image_index = 0
        for row, bounds in zip(embeds, image_bound):
            pieces = []  # rebuilt with cat rather than written in place, so gradients reach the vision tower
            cursor = 0
            for start, end in bounds.tolist():
                pieces.extend([row[cursor:start], vision[image_index][: end - start]])
                cursor = end
                image_index += 1
            pieces.append(row[cursor:])
            rows.append(torch.cat(pieces, dim=0))
        return torch.stack(rows, dim=0)

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_bound: list[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        embeds = self.get_vllm_embedding(input_ids, pixel_values, image_bound)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, use_cache=False)

    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_bound: list[torch.Tensor] | None = None,
        max_new_tokens: int = 16,
        terminators: list[int] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Greedy decoding without a KV cache: the model is tiny, and this is the same on every version."""
        embeds = self.get_vllm_embedding(input_ids, pixel_values, image_bound)
        stop = set(terminators or [])
        new_tokens: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            next_token = self.llm(inputs_embeds=embeds, use_cache=False).logits[:, -1, :].argmax(dim=-1)
            new_tokens.append(next_token)
            if stop and all(int(t) in stop for t in next_token):
                break
            embeds = torch.cat([embeds, self.llm.get_input_embeddings()(next_token).unsqueeze(1)], dim=1)
        return torch.stack(new_tokens, dim=1)

    def chat(
        self,
        image: Any,
        msgs: list[dict[str, Any]],
        tokenizer: Any,
        processor: Any = None,
        max_new_tokens: int = 16,
        sampling: bool = False,
        **kwargs: Any,
    ) -> str:
        if processor is None:
            processor = AutoProcessor.from_pretrained(self.config._name_or_path, trust_remote_code=True)
        msgs = copy.deepcopy(msgs)
        if image is not None and msgs and msgs[0]["role"] == "user":
            msgs[0]["content"] = "(<image>./</image>)\n" + msgs[0]["content"]
        prompt = processor.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        inputs = processor(prompt, [image] if image is not None else None, return_tensors="pt")
        terminators = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
        output_ids = self.generate(
            input_ids=inputs["input_ids"].to(self.device),
            pixel_values=inputs["pixel_values"].to(self.device) if "pixel_values" in inputs else None,
            image_bound=inputs.get("image_bound"),
            max_new_tokens=max_new_tokens,
            terminators=terminators,
        )
        return tokenizer.decode(output_ids[0], skip_special_tokens=True)
