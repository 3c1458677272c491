"""The perceiver-style resampler of MiniCPM-V 2.6's layout: learned queries cross-attend to the patches."""

from __future__ import annotations

import math

import torch
from torch import nn


def sincos_position_embedding(num_positions: int, dim: int) -> torch.Tensor:
    """Computed on the fly, not a buffer: transformers 5 builds models on the meta device, where a
    non-persistent buffer made in `__init__` would never be filled in."""
    position = torch.arange(num_positions, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(num_positions, dim)
    table[:, 0::2] = torch.sin(position * div)
    table[:, 1::2] = torch.cos(position * div)
    return table


class Resampler(nn.Module):
    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.embed_dim = embed_dim
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.zeros(embed_dim, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, patches, kv_dim) -> (batch, num_queries, embed_dim)."""
        batch, patches, _ = x.shape
        kv = self.ln_kv(self.kv_proj(x))
        pos = sincos_position_embedding(patches, self.embed_dim).to(dtype=kv.dtype, device=kv.device)
        key = (kv + pos).permute(1, 0, 2)  # nn.MultiheadAttention is sequence-first
        value = kv.permute(1, 0, 2)
        query = self.ln_q(self.query).unsqueeze(1).expand(-1, batch, -1)
        out, _ = self.attn(query, key, value, need_weights=False)
        return self.ln_post(out.permute(1, 0, 2)) @ self.proj
