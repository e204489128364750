"""Marginal-network algorithms: log p_theta(x_S) in one pass, the self-consistency loss and the anchor term.

f_theta(x_S) is the backbone's ``log_marginal`` output; the normalised marginal is f(x_S) - f(empty).
"""
from __future__ import annotations

import torch

from .arm import conditional_log_probs, value_log_prob, value_log_probs
from .orders import index_at, observed_before, order_observed_first, random_order


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


def self_consistency_terms(net, x, order=None, generator=None, all_values: bool = False,
                           conditional_grad: bool = True, with_complete: bool = False) -> dict:
    """One sampled constraint per row, f(empty), and f on the extended prefix (reused by the anchor term).

    With d ~ U{1..D}: residual = f(x_sigma(<d)) + log p_phi(x_sigma(d) | x_sigma(<d)) - f(x_sigma(<=d)).
    Two passes: prefixes with both heads (the conditional term needs logits there), and
    [extended prefixes; complete rows if ``with_complete``; empty] with the marginal head only.

    ``all_values``: the constraint is written for every value k of x_sigma(d), not only the row's own, and the
    squared residuals are averaged with weights p_phi(k | x_sigma(<d)) (no gradient). When x_sigma(d) ~ p_phi this is
    the conditional expectation of the sampled-value loss (Rao-Blackwellised: same mean, less noise), and the
    conditional head gets a target for its whole distribution. The second pass then has K * B + 1 rows
    (+ B with ``with_complete``).
    ``conditional_grad=False`` stops the gradient into the conditionals: only f is fitted to them.
    ``with_complete``: also f(x) on the complete rows (key ``f_complete``), in the same marginal pass (one pass fewer
    for the energy-based KL objective, whose REINFORCE term needs it).
    """
    batch, dim = x.shape
    if order is None:
        order = random_order(batch, dim, device=x.device, generator=generator)
    step = torch.randint(0, dim, (batch,), device=x.device, generator=generator)  # 0-based index of sigma(d)
    prefix_mask = observed_before(order, step)
    position = index_at(order, step)
    f_prefix, logits = net(x, prefix_mask, need_logits=True, need_marginal=True, positions=position)
    if not conditional_grad:
        logits = logits.detach()
    empty_x, empty_mask = empty_like_rows(x)
    extended_mask = observed_before(order, step + 1)
    num_classes = logits.shape[-1]
    if all_values:  # row k * B + b: row b with x_sigma(d) set to k
        extended_x, extended_rows_mask = x.repeat(num_classes, 1), extended_mask.repeat(num_classes, 1)
        extended_x[torch.arange(num_classes * batch, device=x.device), position.repeat(num_classes)] = (
            torch.arange(num_classes, device=x.device).repeat_interleave(batch).to(x.dtype))
    else:
        extended_x, extended_rows_mask = x, extended_mask
    complete = [x] if with_complete else []
    complete_mask = [torch.ones_like(extended_mask)] if with_complete else []
    f_rest = log_marginal(net, torch.cat([extended_x, *complete, empty_x]),
                          torch.cat([extended_rows_mask, *complete_mask, empty_mask])).float()
    f_extended = f_rest[:len(extended_x)]
    extra = {"f_complete": f_rest[len(extended_x):-1]} if with_complete else {}
    if not all_values:
        residual = f_prefix.float() + value_log_prob(logits, x, position) - f_extended
        return {"residual": residual, "squared_residual": residual.pow(2), "f_empty": f_rest[-1],
                "f_extended": f_extended, "extended_mask": extended_mask, **extra}
    rows = torch.arange(batch, device=x.device)
    f_values = f_extended.view(num_classes, batch).t()  # (B, K): f(x_sigma(<d), x_sigma(d) = k)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    residuals = f_prefix.float().unsqueeze(1) + log_probs - f_values
    own_value = x[rows, position].long()
    return {"residual": residuals[rows, own_value],
            "squared_residual": (log_probs.detach().exp() * residuals.pow(2)).sum(1),
            "f_empty": f_rest[-1], "f_extended": f_values[rows, own_value], "extended_mask": extended_mask, **extra}


def self_consistency_residual(net, x, order=None, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual (B,), f_empty (scalar)) of :func:`self_consistency_terms`."""
    terms = self_consistency_terms(net, x, order=order, generator=generator)
    return terms["residual"], terms["f_empty"]


@torch.no_grad()
def anchor_target(net, x, observed_mask, generator=None, draws: int = 1) -> torch.Tensor:
    """Unbiased estimate of E_sigma log p_sigma(x_S), the order-averaged chain rule over S, from ``draws`` passes.

    A random order of S and t ~ U{0..|S|-1} give a prefix P (the first t positions of S); the estimate is
    |S| * mean_{j in S minus P} log p_phi(x_j | x_P). For each t the mean is an unbiased estimate of the t-th
    chain-rule term averaged over orders, so the sum over t (|S| times a uniform draw) is unbiased for the
    whole chain rule. With ``draws`` = m > 1 the m prefix sizes are stratified (draw k has t/|S| in [k/m, (k+1)/m))
    and averaged: still unbiased, and the early (uncertain) and late (near-certain) steps no longer swing one draw by
    hundreds of nats. Rows with S empty get 0. float32 (B,), no gradient (a regression target).
    """
    batch = x.shape[0]
    counts = observed_mask.sum(1)
    order = order_observed_first(observed_mask, generator=generator).repeat(draws, 1)
    strata = torch.arange(draws, device=x.device, dtype=torch.float32).unsqueeze(1)
    uniform = (strata + torch.rand(draws, batch, device=x.device, generator=generator)) / draws
    prefix_size = (uniform * counts).floor().long().flatten()  # U{0..|S|-1}, stratified over the draws
    prefix = observed_before(order, prefix_size)
    x_rep, observed_rep = x.repeat(draws, 1), observed_mask.repeat(draws, 1)
    values = value_log_probs(conditional_log_probs(net, x_rep, prefix), x_rep)
    remaining = (observed_rep & ~prefix).float()
    estimates = counts.repeat(draws).float() * (values * remaining).sum(1) / remaining.sum(1).clamp(min=1.0)
    return estimates.view(draws, batch).mean(0)


def self_consistency_loss(net, x, log_z: float | torch.Tensor = 0.0, order=None, generator=None,
                          anchor_weight: float = 0.0, anchor_draws: int = 1, all_values: bool = False):
    """D * mean(residual^2) + (f(empty) - log_z)^2 [+ anchor_weight * mean((f(S) - f(empty) - anchor)^2) / D].

    The anchor term regresses the normalised marginal of the extended prefix S on :func:`anchor_target`; its
    minimiser is E_sigma log p_sigma(x_S), which pins the level of f that adjacent-step constraints leave free to
    drift. Divided by D so that its scale (whole-set log-probabilities) is comparable with the D-weighted
    per-step consistency term. Returns (loss, parts for logging).
    """
    terms = self_consistency_terms(net, x, order=order, generator=generator, all_values=all_values)
    consistency = terms["squared_residual"].mean()
    normalizer = (terms["f_empty"] - log_z).pow(2)
    loss = x.shape[1] * consistency + normalizer
    parts = {"consistency": consistency.item(), "normalizer": normalizer.item(), "log_z_model": terms["f_empty"].item()}
    if anchor_weight > 0:
        target = anchor_target(net, x, terms["extended_mask"], generator=generator, draws=anchor_draws)
        anchor = (terms["f_extended"] - terms["f_empty"] - target).pow(2).mean() / x.shape[1]
        loss = loss + anchor_weight * anchor
        parts["anchor"] = anchor.item()
    return loss, parts
