"""Perceiver-style resampler: a fixed set of learned queries cross-attends to the vision patches.

Parameter names and count (13 tensors) follow MiniCPM-V's `resampler.py`, so that fixtures exercise the same
key layout as the real checkpoint.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sincos_position_embedding(num_positions: int, dim: int) -> torch.Tensor:
    """1-D sin/cos table, computed on the fly rather than kept as a buffer: transformers 5 builds models on
    the meta device, and a non-persistent buffer made in `__init__` would never be filled in."""
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
        # nn.MultiheadAttention defaults to sequence-first tensors.
        key = (kv + pos).permute(1, 0, 2)
        value = kv.permute(1, 0, 2)
        query = self.ln_q(self.query).unsqueeze(1).expand(-1, batch, -1)
        out, _ = self.attn(query, key, value, need_weights=False)
        out = self.ln_post(out.permute(1, 0, 2))
        return out @ self.proj
