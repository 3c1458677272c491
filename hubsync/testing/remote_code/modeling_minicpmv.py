"""Tiny MiniCPM-V look-alike: `vpm` (ViT) -> `resampler` -> `llm` (Llama), with a `chat()` like the real one.

What matters for hubsync is reproduced faithfully: the tensor prefixes (`vpm.`, `resampler.`, `llm.`), and
`chat()` asking `AutoProcessor` for the processor of `config._name_or_path`, so that a checkpoint folder
without processor files fails exactly like MiniCPM-V #601 (`... has no attribute tokenizer`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoProcessor, LlamaForCausalLM, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # transformers 5: initialisers that leave the tensors already loaded from the checkpoint alone
    from transformers import initialization as init
except ImportError:  # transformers 4.x calls _init_weights only for tensors the checkpoint lacks
    from torch.nn import init  # type: ignore[no-redef]

from .configuration_minicpm import MiniCPMVConfig
from .resampler import Resampler


class VisionEmbeddings(nn.Module):
    def __init__(self, hidden_size: int, image_size: int, patch_size: int) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.num_patches = (image_size // patch_size) ** 2
        self.position_embedding = nn.Embedding(self.num_patches, hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        positions = torch.arange(patches.shape[1], device=patches.device)
        return patches + self.position_embedding(positions)


class VisionAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class VisionMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionEncoderLayer(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.self_attn = VisionAttention(hidden_size, num_heads)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = VisionMLP(hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, layers: list[VisionEncoderLayer]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class VisionTransformer(nn.Module):
    """SigLIP-shaped encoder: the same key names (`embeddings.*`, `encoder.layers.N.*`, `post_layernorm.*`)."""

    def __init__(self, vision_config: dict[str, Any]) -> None:
        super().__init__()
        hidden = int(vision_config["hidden_size"])
        eps = float(vision_config["layer_norm_eps"])
        self.embeddings = VisionEmbeddings(
            hidden, int(vision_config["image_size"]), int(vision_config["patch_size"])
        )
        self.encoder = VisionEncoder(
            [
                VisionEncoderLayer(
                    hidden,
                    int(vision_config["intermediate_size"]),
                    int(vision_config["num_attention_heads"]),
                    eps,
                )
                for _ in range(int(vision_config["num_hidden_layers"]))
            ]
        )
        self.post_layernorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class MiniCPMVPreTrainedModel(PreTrainedModel):
    config_class = MiniCPMVConfig
    base_model_prefix = "llm"
    supports_gradient_checkpointing = False
    _no_split_modules = ["LlamaDecoderLayer", "VisionEncoderLayer"]  # noqa: RUF012 - as declared by the base

    def _init_weights(self, module: nn.Module) -> None:
        # The generic init covers Linear/Conv/Embedding/LayerNorm/MultiheadAttention; the resampler's bare
        # parameters need their own. `transformers.initialization` skips tensors already loaded from disk.
        super()._init_weights(module)
        if isinstance(module, Resampler):
            init.normal_(module.query, std=0.02)
            init.normal_(module.proj, std=module.embed_dim**-0.5)


class MiniCPMV(MiniCPMVPreTrainedModel):
    def __init__(self, config: MiniCPMVConfig) -> None:
        super().__init__(config)
        # As in the real model, the language model is built from the top-level (Llama) fields of the config.
        self.llm = LlamaForCausalLM(config)
        self.vpm = VisionTransformer(config.vision_config)
        self.resampler = Resampler(
            num_queries=config.query_num,
            embed_dim=config.hidden_size,
            num_heads=max(1, config.hidden_size // 32),
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
            # Rebuilt with cat rather than written in place, so gradients reach the vision tower.
            pieces = []
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
        """Greedy decoding without a KV cache: the model is tiny, and this keeps the output deterministic."""
        embeds = self.get_vllm_embedding(input_ids, pixel_values, image_bound)
        stop = set(terminators or [])
        new_tokens: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            logits = self.llm(inputs_embeds=embeds, use_cache=False).logits[:, -1, :]
            next_token = logits.argmax(dim=-1)
            new_tokens.append(next_token)
            if stop and all(int(t) in stop for t in next_token):
                break
            next_embed = self.llm.get_input_embeddings()(next_token).unsqueeze(1)
            embeds = torch.cat([embeds, next_embed], dim=1)
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
            # The real model does exactly this: with no processor files next to the weights, AutoProcessor
            # falls back to the bare tokenizer, and the next line fails.
            processor = AutoProcessor.from_pretrained(self.config._name_or_path, trust_remote_code=True)
        msgs = copy.deepcopy(msgs)
        if image is not None and msgs and msgs[0]["role"] == "user":
            msgs[0]["content"] = "(<image>./</image>)\n" + msgs[0]["content"]
        prompt = processor.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        inputs = processor(prompt, [image] if image is not None else None, return_tensors="pt")
        terminators = [tokenizer.convert_tokens_to_ids(t) for t in (tokenizer.eos_token, tokenizer.eot_token)]
        output_ids = self.generate(
            input_ids=inputs["input_ids"].to(self.device),
            pixel_values=inputs["pixel_values"].to(self.device) if "pixel_values" in inputs else None,
            image_bound=inputs.get("image_bound"),
            max_new_tokens=max_new_tokens,
            terminators=terminators,
        )
        return tokenizer.decode(output_ids[0], skip_special_tokens=True)
