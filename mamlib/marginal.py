"""Marginal-network algorithms: log p_theta(x_S) in one pass and the self-consistency loss.

f_theta(x_S) is the backbone's ``log_marginal`` output; the normalised marginal is f(x_S) - f(empty).
"""
from __future__ import annotations

import torch

from .orders import index_at, observed_before, random_order


def empty_like_rows(x: torch.Tensor, rows: int = 1):
    """(rows, D) all-missing inputs."""
    return torch.zeros(rows, x.shape[1], dtype=x.dtype, device=x.device), torch.zeros(rows, x.shape[1], dtype=torch.bool, device=x.device)


def log_marginal(net, x, observed_mask) -> torch.Tensor:
    """Raw f_theta(x_S): the marginal head only."""
    return net(x, observed_mask, need_logits=False, need_marginal=True)[0]


def normalized_log_marginal(net, x, observed_mask) -> torch.Tensor:
    """f_theta(x_S) - f_theta(empty): one pass over the batch plus one all-missing row. float64 (B,)."""
    empty_x, empty_mask = empty_like_rows(x)
    values = log_marginal(net, torch.cat([x, empty_x]), torch.cat([observed_mask, empty_mask])).double()
    return values[:-1] - values[-1]


def self_consistency_residual(net, x, order=None, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sampled constraint per row and f(empty).

    With d ~ U{1..D}: residual = f(x_sigma(<d)) + log p_phi(x_sigma(d) | x_sigma(<d)) - f(x_sigma(<=d)).
    Two passes: prefixes with both heads (the conditional term needs logits there), and
    [extended prefixes; empty] with the marginal head only.
    Returns (residual (B,), f_empty (scalar)).
    """
    batch, dim = x.shape
    if order is None:
        order = random_order(batch, dim, device=x.device, generator=generator)
    step = torch.randint(0, dim, (batch,), device=x.device, generator=generator)  # 0-based index of sigma(d)
    prefix_mask = observed_before(order, step)
    f_prefix, logits = net(x, prefix_mask, need_logits=True, need_marginal=True)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    rows = torch.arange(batch, device=x.device)
    position = index_at(order, step)
    log_conditional = log_probs[rows, position, x[rows, position]]
    empty_x, empty_mask = empty_like_rows(x)
    f_rest = log_marginal(net, torch.cat([x, empty_x]), torch.cat([observed_before(order, step + 1), empty_mask]))
    residual = f_prefix.float() + log_conditional - f_rest[:-1].float()
    return residual, f_rest[-1].float()


def self_consistency_loss(net, x, log_z: float | torch.Tensor = 0.0, order=None, generator=None):
    """D * mean(residual^2) + (f(empty) - log_z)^2, and its two parts for logging."""
    residual, f_empty = self_consistency_residual(net, x, order=order, generator=generator)
    consistency = residual.pow(2).mean()
    normalizer = (f_empty - log_z).pow(2)
    return x.shape[1] * consistency + normalizer, {"consistency": consistency.item(), "normalizer": normalizer.item(),
                                                  "log_z_model": f_empty.item()}
