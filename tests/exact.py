"""Small enumerable distributions and brute-force models for exact tests."""
from __future__ import annotations

import itertools

import torch
from torch import nn

from mamlib.nets.base import Backbone, at_positions


def all_states(num_positions: int, num_classes: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(num_classes), repeat=num_positions)), dtype=torch.long)


def chain_log_joint(num_positions: int, num_classes: int, seed: int = 0, coupling: float = 1.5) -> torch.Tensor:
    """log p(x) over all K^D states for a chain with strong pairwise dependencies (normalised, float64)."""
    generator = torch.Generator().manual_seed(seed)
    pair = coupling * torch.randn(num_classes, num_classes, generator=generator, dtype=torch.float64)
    unary = 0.5 * torch.randn(num_positions, num_classes, generator=generator, dtype=torch.float64)
    states = all_states(num_positions, num_classes)
    score = unary[torch.arange(num_positions), states].sum(1)
    score += pair[states[:, :-1], states[:, 1:]].sum(1)
    return score - torch.logsumexp(score, 0)


class BruteForceNet(Backbone):
    """Conditionals and marginals computed exactly from a fixed joint table: self-consistent by construction."""

    def __init__(self, log_joint: torch.Tensor, num_positions: int, num_classes: int, marginal_offset: float = 0.0):
        super().__init__()
        self.num_positions, self.num_classes = num_positions, num_classes
        self.register_buffer("log_joint", log_joint.double())
        self.register_buffer("states", all_states(num_positions, num_classes))
        self.marginal_offset = marginal_offset  # a constant shift keeps consistency; used to test normalisation
        self.dummy = nn.Parameter(torch.zeros(()))
        self.marginal_prefixes = ("dummy",)

    def _log_marginal(self, x, observed_mask):
        agree = ((self.states.unsqueeze(0) == x.unsqueeze(1)) | ~observed_mask.unsqueeze(1)).all(-1)  # (B, S)
        return torch.logsumexp(torch.where(agree, self.log_joint.unsqueeze(0), torch.tensor(-torch.inf, dtype=torch.float64)), 1)

    def forward(self, x, observed_mask, need_logits=True, need_marginal=False, positions=None):
        log_marginal = self._log_marginal(x, observed_mask) + self.marginal_offset + 0 * self.dummy if need_marginal else None
        logits = None
        if need_logits:
            columns = []
            for position in range(self.num_positions):
                per_class = []
                for value in range(self.num_classes):
                    x_with = x.clone()
                    x_with[:, position] = value
                    mask_with = observed_mask.clone()
                    mask_with[:, position] = True
                    per_class.append(self._log_marginal(x_with, mask_with))
                columns.append(torch.stack(per_class, -1))
            logits = at_positions(torch.stack(columns, 1).float(), positions)
        return log_marginal, logits
