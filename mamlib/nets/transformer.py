"""Bidirectional pre-LayerNorm transformer over token sequences (text8, MOSES, any token array)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone, MaskedSum, at_positions, check_marginal_head


def sinusoidal_table(num_positions: int, dim: int) -> torch.Tensor:
    """(num_positions, dim): sines in the first half, cosines in the second (not interleaved)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half) / max(half - 1, 1))
    angles = torch.arange(num_positions).unsqueeze(1) * frequencies.unsqueeze(0)
    table = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(table, (0, dim - 2 * half))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"d_model={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, length, dim = h.shape
        q, k, v = self.qkv(h).view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # no mask: every position sees every other
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, h):
        h = h + self.dropout(self.attn(self.norm1(h)))
        return h + self.dropout(self.mlp(self.norm2(h)))


def mlp_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


class Transformer(Backbone):
    """Conditional logits per position; marginal head = MLP on mean-pooled final features (``pooled``, the original's)
    or a per-position MLP score summed over the observed positions plus a learned f(empty) (``sum``)."""

    def __init__(self, num_classes: int, num_positions: int, d_model: int = 768, num_layers: int = 12, num_heads: int = 12,
                 mlp_dim: int = 3072, dropout: float = 0.0, marginal: bool = False, marginal_hidden: int = 3072,
                 marginal_head: str = "pooled"):
        super().__init__()
        self.marginal_kind = check_marginal_head(marginal_head)
        self.num_classes, self.num_positions = num_classes, num_positions
        self.embedding = nn.Embedding(num_classes + 1, d_model)  # index K = missing symbol
        self.register_buffer("positions", sinusoidal_table(num_positions, d_model), persistent=False)
        self.blocks = nn.ModuleList(Block(d_model, num_heads, mlp_dim, dropout) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(d_model, eps=1e-6)
        self.conditional_head = mlp_head(d_model, d_model, num_classes)
        if marginal:
            self.marginal_head = mlp_head(d_model, marginal_hidden, 1)
            self.marginal_prefixes = ("marginal_head.",)
            if marginal_head == "sum":
                self.marginal_sum = MaskedSum(num_positions, num_classes)
                self.marginal_prefixes = ("marginal_head.", "marginal_sum.")
        self.apply(self._init_weights)
        if marginal and marginal_head == "sum":  # f = f(empty) = 0 everywhere at the start
            nn.init.zeros_(self.marginal_head[-1].weight)
            nn.init.zeros_(self.marginal_head[-1].bias)

    def marginal_score_bias(self):
        return self.marginal_head[-1].bias if self.has_marginal and self.marginal_kind == "sum" else None

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.normal_(module.bias, std=1e-6)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight)

    def forward(self, x, observed_mask, need_logits: bool = True, need_marginal: bool = False, positions=None):
        if not (need_logits or need_marginal):
            raise ValueError("request at least one of need_logits / need_marginal")
        if need_marginal and not self.has_marginal:
            raise ValueError("this transformer was built without a marginal head (marginal=False)")
        h = self.embedding(self.input_tokens(x, observed_mask)) + self.positions
        for block in self.blocks:
            h = block(h)
        h = self.final_norm(h)
        logits = self.conditional_head(at_positions(h, positions)) if need_logits else None  # the head only where needed
        log_marginal = None
        if need_marginal and self.marginal_kind == "sum":
            log_marginal = self.marginal_sum(self.marginal_head(h).squeeze(-1), observed_mask, x)
        elif need_marginal:
            log_marginal = self.marginal_head(h.mean(dim=1)).squeeze(-1)
        return log_marginal, logits
