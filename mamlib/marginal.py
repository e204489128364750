"""Marginal-network algorithms: log p_theta(x_S) in one pass and the self-consistency loss.

f_theta(x_S) is the backbone's ``log_marginal`` output; the normalised marginal is f(x_S) - f(empty).
"""
from __future__ import annotations

import torch

from .arm import value_log_prob, value_log_probs
from .orders import index_at, observed_before, random_prefix


def empty_like_rows(x: torch.Tensor, rows: int = 1):
    """(rows, D) all-missing inputs."""
    return torch.zeros(rows, x.shape[1], dtype=x.dtype, device=x.device), torch.zeros(rows, x.shape[1], dtype=torch.bool, device=x.device)


def log_marginal(net, x, observed_mask) -> torch.Tensor:
    """Raw f_theta(x_S): the marginal head only."""
    return net(x, observed_mask, need_logits=False, need_marginal=True)[0]


@torch.no_grad()
def log_normalizer(net, device=None) -> float:
    """f_theta(empty), the marginal network's log total mass: compute it once for a frozen network and pass it to
    :func:`normalized_log_marginal`, so each query is exactly one pass over its own rows."""
    device = device if device is not None else next(net.parameters()).device
    empty_x = torch.zeros(1, net.num_positions, dtype=torch.long, device=device)
    return float(log_marginal(net, empty_x, torch.zeros_like(empty_x, dtype=torch.bool)).double().item())


def normalized_log_marginal(net, x, observed_mask, log_normalizer: float | None = None) -> torch.Tensor:
    """f_theta(x_S) - f_theta(empty), float64 (B,): one pass over the batch, plus one all-missing row unless the
    network's ``log_normalizer`` (frozen weights: :func:`log_normalizer`) is given."""
    if log_normalizer is not None:
        return log_marginal(net, x, observed_mask).double() - log_normalizer
    empty_x, empty_mask = empty_like_rows(x)
    values = log_marginal(net, torch.cat([x, empty_x]), torch.cat([observed_mask, empty_mask])).double()
    return values[:-1] - values[-1]


def self_consistency_terms(net, x, order=None, generator=None, conditional_grad: bool = True,
                           extra_rows: tuple | None = None, surprise_share: float = 0.0) -> dict:
    """One sampled constraint per row, and f(empty).

    With d ~ U{1..D}: residual = f(x_sigma(<d)) + log p_phi(x_sigma(d) | x_sigma(<d)) - f(x_sigma(<=d)).
    Two passes: prefixes with both heads (the conditional term needs logits there), and
    [extended prefixes; ``extra_rows``; empty] with the marginal head only.

    ``conditional_grad=False`` stops the gradient into the conditionals: only f is fitted to them.
    ``extra_rows``: (x, observed_mask) of other rows whose raw f is wanted (key ``f_extra``), in the same marginal pass:
    one pass fewer for the energy-based KL objective (f on complete rows).
    ``surprise_share`` = a in (0, 1): given the prefix, the next position is drawn from :func:`surprise_proposal`
    (a share a in proportion to -log p_phi(x_j | prefix), the rest uniform) instead of uniformly, and each squared
    residual is weighted by uniform / proposal probability: the same expected loss, with more of the draws on the
    steps whose conditional is far from certain, where f has something to learn (one pass gives every position's
    conditional, so the draw costs no extra pass).
    """
    batch, dim = x.shape
    rows = torch.arange(batch, device=x.device)
    if order is None:  # the same distribution without sorting
        prefix_mask, position = random_prefix(batch, dim, device=x.device, generator=generator)
    else:
        step = torch.randint(0, dim, (batch,), device=x.device, generator=generator)  # 0-based index of sigma(d)
        prefix_mask, position = observed_before(order, step), index_at(order, step)
    weight = None
    if surprise_share:  # the prefix's pass gives every position's conditional: draw the step from them
        f_prefix, all_logits = net(x, prefix_mask, need_logits=True, need_marginal=True)
        remaining = ~prefix_mask
        surprise = -value_log_probs(torch.log_softmax(all_logits.detach().float(), dim=-1), x)
        proposal = surprise_proposal(surprise, remaining, surprise_share)
        position = torch.multinomial(proposal, 1, generator=generator).squeeze(1)
        weight = 1.0 / (remaining.sum(1).float() * proposal[rows, position])  # 1 for a uniform draw
        logits = all_logits[rows, position]
    else:
        f_prefix, logits = net(x, prefix_mask, need_logits=True, need_marginal=True, positions=position)
    extended_mask = prefix_mask.clone()
    extended_mask[rows, position] = True
    if not conditional_grad:
        logits = logits.detach()
    empty_x, empty_mask = empty_like_rows(x)
    more_x, more_mask = ([extra_rows[0]], [extra_rows[1]]) if extra_rows is not None else ([], [])
    f_rest = log_marginal(net, torch.cat([x, *more_x, empty_x]), torch.cat([extended_mask, *more_mask, empty_mask])).float()
    extra = {"f_extra": f_rest[batch:-1]} if extra_rows is not None else {}
    residual = f_prefix.float() + value_log_prob(logits, x, position) - f_rest[:batch]
    squared = residual.pow(2) if weight is None else weight * residual.pow(2)
    return {"residual": residual, "squared_residual": squared, "f_empty": f_rest[-1], "extended_mask": extended_mask,
            "position": position, **extra}


def surprise_proposal(surprise: torch.Tensor, remaining: torch.Tensor, share: float) -> torch.Tensor:
    """(B, D) probabilities of the next position: over the ``remaining`` positions, ``share`` in proportion to
    ``surprise`` (-log p of the row's value, >= 0) and 1 - share uniform; uniform alone where the surprise is all 0.
    The uniform part bounds every importance weight by 1 / (1 - share)."""
    if not 0.0 < share < 1.0:  # share 1 would never draw a certain step, whose residual still counts: biased
        raise ValueError(f"step_surprise_share={share} must be in [0, 1): 0 turns the surprise draw off")
    remaining = remaining.float()
    uniform = remaining / remaining.sum(1, keepdim=True)
    surprise = surprise.clamp(min=0.0) * remaining
    total = surprise.sum(1, keepdim=True)
    proportional = torch.where(total > 0, surprise / total.clamp(min=1e-30), uniform)
    return share * proportional + (1.0 - share) * uniform


def self_consistency_residual(net, x, order=None, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual (B,), f_empty (scalar)) of :func:`self_consistency_terms`."""
    terms = self_consistency_terms(net, x, order=order, generator=generator)
    return terms["residual"], terms["f_empty"]


def self_consistency_loss(net, x, log_z: float | torch.Tensor = 0.0, order=None, generator=None,
                          surprise_share: float = 0.0):
    """D * mean(residual^2) + (f(empty) - log_z)^2. Returns (loss, parts for logging)."""
    terms = self_consistency_terms(net, x, order=order, generator=generator, surprise_share=surprise_share)
    consistency = terms["squared_residual"].mean()
    normalizer = (terms["f_empty"] - log_z).pow(2)
    parts = {"consistency": consistency.item(), "normalizer": normalizer.item(), "log_z_model": terms["f_empty"].item()}
    return x.shape[1] * consistency + normalizer, parts
