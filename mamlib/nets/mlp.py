"""Residual MLPs on one-hot inputs (energy-based tasks): a conditional MLP and an optional marginal MLP."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone, MaskedSum, check_marginal_head


class ResidualMLP(nn.Module):
    """in -> hidden (LeakyReLU), then (num_layers-1) residual hidden layers, then -> out."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int, residual: bool = True):
        super().__init__()
        self.input = nn.Linear(in_dim, hidden)
        self.hidden = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_layers - 1))
        self.output = nn.Linear(hidden, out_dim)
        self.residual = residual

    def features(self, h):
        h = F.leaky_relu(self.input(h))
        for layer in self.hidden:
            out = F.leaky_relu(layer(h))
            h = out + h if self.residual else out
        return h

    def forward(self, h):
        return self.output(self.features(h))


class MLPPair(Backbone):
    """Two independent residual MLPs on the same one-hot input with K+1 classes per position."""

    def __init__(self, num_classes: int, num_positions: int, hidden: int = 2048, num_layers: int = 4, residual: bool = True,
                 marginal: bool = True, marginal_head: str = "pooled"):
        super().__init__()
        self.marginal_kind = check_marginal_head(marginal_head)
        self.num_classes, self.num_positions = num_classes, num_positions
        in_dim = (num_classes + 1) * num_positions
        self.conditional_mlp = ResidualMLP(in_dim, hidden, num_classes * num_positions, num_layers, residual)
        if marginal:
            self.marginal_prefixes = ("marginal_mlp.",)
            if marginal_head == "sum":  # D scores summed over the observed positions (zero at the start)
                self.marginal_mlp = ResidualMLP(in_dim, hidden, num_positions, num_layers, residual)
                nn.init.zeros_(self.marginal_mlp.output.weight)
                nn.init.zeros_(self.marginal_mlp.output.bias)
                self.marginal_sum = MaskedSum(num_positions, num_classes)
                self.marginal_prefixes = ("marginal_mlp.", "marginal_sum.")
            else:
                self.marginal_mlp = ResidualMLP(in_dim, hidden, 1, num_layers, residual)

    def marginal_score_bias(self):
        return self.marginal_mlp.output.bias if self.has_marginal and self.marginal_kind == "sum" else None

    def one_hot_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, D) tokens in 0..K -> (B, D * (K+1)) float one-hot, written in place (F.one_hot builds int64 first)."""
        width = self.num_classes + 1
        offsets = torch.arange(0, self.num_positions * width, width, device=tokens.device)
        return torch.zeros(tokens.shape[0], self.num_positions * width, device=tokens.device).scatter_(1, tokens + offsets, 1.0)

    def conditional_logits(self, one_hot, positions=None):
        """(B, D, K) logits, or (B, K) at ``positions``: then only those K rows of the output layer are computed."""
        if positions is None:
            return self.conditional_mlp(one_hot).view(-1, self.num_positions, self.num_classes)
        output = self.conditional_mlp.output
        weight = output.weight.view(self.num_positions, self.num_classes, -1)[positions]  # (B, K, hidden)
        bias = output.bias.view(self.num_positions, self.num_classes)[positions]
        return torch.einsum("bh,bkh->bk", self.conditional_mlp.features(one_hot), weight) + bias

    def forward(self, x, observed_mask, need_logits: bool = True, need_marginal: bool = False, positions=None):
        if not (need_logits or need_marginal):
            raise ValueError("request at least one of need_logits / need_marginal")
        if need_marginal and not self.has_marginal:
            raise ValueError("this MLP was built without a marginal network (marginal=False)")
        one_hot = self.one_hot_input(self.input_tokens(x, observed_mask))
        logits = self.conditional_logits(one_hot, positions) if need_logits else None
        log_marginal = None
        if need_marginal and self.marginal_kind == "sum":
            log_marginal = self.marginal_sum(self.marginal_mlp(one_hot), observed_mask, x)
        elif need_marginal:
            log_marginal = self.marginal_mlp(one_hot).squeeze(-1)
        return log_marginal, logits
