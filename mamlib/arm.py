"""Any-order autoregressive algorithms on top of any backbone's conditional logits.

All functions take ``net`` (a :class:`mamlib.nets.base.Backbone`) and assignments in the library's
value convention (LongTensor (B, D) in 0..K-1 plus a bool ``observed_mask``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .orders import given_first, index_at, observed_before, order_observed_first, random_last_steps, random_order
from .runtime import autocast


def conditional_logits(net, x, observed_mask, positions=None) -> torch.Tensor:
    """float32 conditional logits: (B, D, K), or (B, K) at one position per row when ``positions`` is given.

    Every conditional pass goes through here, so the network's ``conditional_precision`` (``eval.precision``) applies
    to all of them: bf16 autocast for the pass, float32 for the log-softmax and the sums after it.
    """
    with autocast(x.device, getattr(net, "conditional_precision", "fp32") == "bf16"):
        logits = net(x, observed_mask, need_logits=True, need_marginal=False, positions=positions)[1]
    return logits.float()


def conditional_log_probs(net, x, observed_mask) -> torch.Tensor:
    """(B, D, K) normalised log p(x_j = k | x_S) for every position j."""
    return F.log_softmax(conditional_logits(net, x, observed_mask), dim=-1)


def position_log_prob(net, x, observed_mask, position) -> torch.Tensor:
    """(B,) float32 log p(x_j | x_S) at one position j = ``position[b]`` per row.

    Asks the backbone for that position's K logits only: normalising all D positions (and keeping them for
    backward) costs up to D times the work and memory for one number per row.
    """
    return value_log_prob(conditional_logits(net, x, observed_mask, position), x, position)


def value_log_prob(position_logits: torch.Tensor, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """(B,) log-softmax of (B, K) logits at one position per row, evaluated at that row's value there."""
    rows = torch.arange(x.shape[0], device=x.device)
    log_probs = F.log_softmax(position_logits.float(), dim=-1)
    return log_probs.gather(-1, x[rows, position].unsqueeze(-1)).squeeze(-1)


def value_log_probs(log_probs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, D) log-probability of the value x_j at every position j."""
    return log_probs.gather(-1, x.unsqueeze(-1)).squeeze(-1)


def aoarm_loss(net, x, generator: torch.Generator | None = None, order=None, step=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The any-order training objective (original §6.1).

    Order sigma and step t ~ U{0..D-1} per example; the loss is the mean over all unobserved positions of
    -log p(x_j | x_sigma(<t)). Its expectation is -ELBO/D, so the returned per-example values are an unbiased
    estimate of the negative order-averaged log-likelihood per dimension (nats).
    ``order`` / ``step`` ((B,) 0-based) fix the draws (for exact checks). Returns (scalar loss, per-example nats/dim).
    """
    per_example = -one_step_mean_log_prob(net, x, order=order, generator=generator, step=step)
    return per_example.mean(), per_example.detach()


def _steps_log_prob(net, x, order, steps: torch.Tensor) -> torch.Tensor:
    """(len(steps), B) float64 log p(x at step t | x before step t) along ``order``, every step t in one pass."""
    batch, chunk = x.shape[0], len(steps)
    step_per_row = steps.repeat_interleave(batch)  # (chunk*B,)
    rank_rep = order.repeat(chunk, 1)
    picked = position_log_prob(net, x.repeat(chunk, 1), observed_before(rank_rep, step_per_row), index_at(rank_rep, step_per_row))
    return picked.double().view(chunk, batch)


def _chain_rule_step_terms(net, x, observed_mask, order, steps_per_pass: int, skip: torch.Tensor | None = None):
    """Yields, per network pass, (steps, (chunk, B) float64 chain-rule terms, 0 past a row's |S|) with autograd when
    enabled. ``skip``: (B,) leading steps of each row that are not computed (0 there): the conditioning positions."""
    batch = x.shape[0]
    counts = observed_mask.sum(1)
    first = int(skip.min().item()) if skip is not None and batch else 0
    num_steps = int(counts.max().item()) if batch else 0
    for start in range(first, num_steps, steps_per_pass):
        steps = torch.arange(start, min(start + steps_per_pass, num_steps), device=x.device)
        valid = steps.unsqueeze(1) < counts.unsqueeze(0)  # (chunk, B)
        if skip is not None:
            valid = valid & (steps.unsqueeze(1) >= skip.unsqueeze(0))
        yield steps, _steps_log_prob(net, x, order, steps) * valid


def _chain_rule_passes(net, x, observed_mask, order, steps_per_pass: int, skip: torch.Tensor | None = None):
    """Yields, per network pass, the (B,) float64 sum of that pass's chain-rule terms (with autograd when enabled)."""
    for _, terms in _chain_rule_step_terms(net, x, observed_mask, order, steps_per_pass, skip):
        yield terms.sum(0)


def _observed_and_order(x, observed_mask, order):
    if observed_mask is None:
        observed_mask = torch.ones_like(x, dtype=torch.bool)
    return observed_mask, order_observed_first(observed_mask) if order is None else order


def chain_rule_log_prob(net, x, observed_mask=None, order=None, steps_per_pass: int = 1,
                        given_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact log p(x_S) along one order: sum over the observed positions of their conditionals.

    ``observed_mask`` (default: all) selects the positions whose joint probability is computed; the order
    visits them first (a random order among them unless ``order`` is given, which must already put them first).
    ``steps_per_pass`` chain steps are evaluated in one network pass (batch grows by that factor).
    ``given_mask`` (a subset of the observed positions B): log p(x_{S minus B} | x_B) instead, along the order
    rearranged to visit B first; B's own steps are not computed.
    Returns float64 (B,) natural-log probabilities.
    """
    observed_mask, order = _observed_and_order(x, observed_mask, order)
    skip = None
    if given_mask is not None:
        order, skip = given_first(order, given_mask), given_mask.sum(1)
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for terms in _chain_rule_passes(net, x, observed_mask, order, steps_per_pass, skip):
        total = total + terms
    return total


def backward_chain_rule(net, x, row_weights: torch.Tensor, observed_mask=None, order=None, steps_per_pass: int = 1) -> torch.Tensor:
    """Backpropagates sum_b row_weights[b] * log p(x_b,S) (the chain rule of :func:`chain_rule_log_prob`) one network
    pass at a time, so only one pass's activations are alive instead of all D/steps_per_pass passes'.

    Gradients accumulate into ``.grad`` exactly as ``(row_weights * chain_rule_log_prob(...)).sum().backward()`` would.
    Returns the detached float64 (B,) log-probabilities.
    """
    observed_mask, order = _observed_and_order(x, observed_mask, order)
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    weights = row_weights.detach().double()
    for terms in _chain_rule_passes(net, x, observed_mask, order, steps_per_pass):
        (weights * terms).sum().backward()
        total += terms.detach()
    return total


def per_order_log_probs(net, x, num_orders: int, observed_mask=None, steps_per_pass: int = 1) -> torch.Tensor:
    """(M, B) chain-rule log p_sigma_m(x_S) for M independent random orders per row."""
    return torch.stack([chain_rule_log_prob(net, x, observed_mask, steps_per_pass=steps_per_pass) for _ in range(num_orders)])


def combine_orders(per_order: torch.Tensor) -> torch.Tensor:
    """log (1/M) sum_m p_sigma_m: the likelihood of the ensemble of M single-order models."""
    return torch.logsumexp(per_order, dim=0) - math.log(per_order.shape[0])


def ensemble_log_prob(net, x, num_orders: int = 5, observed_mask=None, steps_per_pass: int = 1) -> torch.Tensor:
    """log (1/M) sum_m p_sigma_m(x_S): the paper's AO-ARM-E (M=5) / AO-ARM-S (M=1). float64 (B,)."""
    return combine_orders(per_order_log_probs(net, x, num_orders, observed_mask, steps_per_pass))


def _one_step_setup(x, order, generator, step=None):
    batch, dim = x.shape
    rank = random_order(batch, dim, device=x.device, generator=generator) if order is None else order
    if step is None:
        step = torch.randint(0, dim, (batch,), device=x.device, generator=generator)
    return rank, step, observed_before(rank, step)


def one_step_log_prob(net, x, order=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Unbiased one-pass estimate of log p_sigma(x): D * log p(x_sigma(t) | x_sigma(<t)), t ~ U{0..D-1}.

    With ``order=None`` sigma is drawn per row, so the estimate is of E_sigma log p_sigma(x). float64 (B,).
    """
    rank, step, observed = _one_step_setup(x, order, generator)
    return x.shape[1] * position_log_prob(net, x, observed, index_at(rank, step)).double()


def one_step_mean_log_prob(net, x, order=None, generator: torch.Generator | None = None, step=None) -> torch.Tensor:
    """Mean over all unobserved positions of log p(x_j | x_sigma(<t)): a one-pass estimate of log p(x)/D (float32, with grad)."""
    _, _, observed = _one_step_setup(x, order, generator, step)
    log_probs = conditional_log_probs(net, x, observed)
    unobserved = (~observed).float()
    return (value_log_probs(log_probs, x) * unobserved).sum(1) / unobserved.sum(1)


@torch.no_grad()
def sample(net, x, observed_mask, order=None, temperature: float = 1.0, generator: torch.Generator | None = None,
           return_log_prob: bool = False):
    """Fill every unobserved position by ancestral sampling along ``order``; observed values never change.

    ``order`` must generate the observed positions first (default: a random such order). With ``return_log_prob``
    also returns float64 (B,) log p(drawn values | observed) along that order at temperature 1: the sampling passes
    already hold every conditional the chain rule would recompute.
    """
    batch, dim = x.shape
    if order is None:
        order = order_observed_first(observed_mask, generator=generator)
    x = torch.where(observed_mask, x, torch.zeros_like(x))
    known = observed_mask.clone()
    rows = torch.arange(batch, device=x.device)
    log_prob = torch.zeros(batch, dtype=torch.float64, device=x.device)
    first = int(observed_mask.sum(1).min().item())
    for step in range(first, dim):
        position = index_at(order, step)
        is_new = ~known[rows, position]
        if not is_new.any():
            continue
        logits = conditional_logits(net, x, known, position)
        probs = F.softmax(logits / temperature, dim=-1)
        drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        x[rows, position] = torch.where(is_new, drawn, x[rows, position])
        known[rows, position] = True
        if return_log_prob:
            log_prob += torch.where(is_new, value_log_prob(logits, x, position).double(), 0.0)
    return (x, log_prob) if return_log_prob else x


@torch.no_grad()
def sample_unconditional(net, num_samples: int, order=None, temperature: float = 1.0, device=None, generator=None,
                         return_log_prob: bool = False):
    dim = net.num_positions
    x = torch.zeros(num_samples, dim, dtype=torch.long, device=device)
    return sample(net, x, torch.zeros_like(x, dtype=torch.bool), order=order, temperature=temperature, generator=generator,
                  return_log_prob=return_log_prob)


@torch.no_grad()
def censor_and_resample(net, x, num_steps: int, order=None, generator=None) -> torch.Tensor:
    """Erase the last ``num_steps`` positions of ``order`` (random by default) and re-draw them with the conditionals."""
    batch, dim = x.shape
    num_steps = min(num_steps, dim)
    if order is None:  # only the last steps matter: no full sort
        order = random_last_steps(batch, dim, num_steps, device=x.device, generator=generator)
    keep = order < dim - num_steps
    return sample(net, x, keep, order=order, generator=generator)


@torch.no_grad()
def metropolis_censor_and_resample(net, x, num_steps: int, log_target, order=None, generator=None,
                                   current_log_target: torch.Tensor | None = None):
    """Censor-and-resample as a Metropolis-Hastings move that leaves exp(log_target) (unnormalised) invariant.

    The proposal re-draws the last ``num_steps`` positions R of a random order from p_phi(x'_R | x_S); the reverse
    move re-draws the current values from the same conditionals, so a proposal is accepted with probability
    min(1, f(x') p_phi(x_R | x_S) / (f(x) p_phi(x'_R | x_S))). The chains then target f whatever the conditionals
    are; good conditionals only make them accept more often. ``log_target``: (B, D) states -> (B,) log f;
    ``current_log_target``: log f of ``x`` if known (a molecule's reward costs a parse).
    Returns (states, (B,) bool accepted, (B,) float64 log f of the returned states).
    """
    batch, dim = x.shape
    num_steps = min(num_steps, dim)
    if order is None:
        order = random_last_steps(batch, dim, num_steps, device=x.device, generator=generator)
    proposal, log_forward = sample(net, x, order < dim - num_steps, order=order, generator=generator, return_log_prob=True)
    # log p_phi(x_R | x_S) of the current values along the same order: the num_steps conditionals in one pass
    log_reverse = _steps_log_prob(net, x, order, torch.arange(dim - num_steps, dim, device=x.device)).sum(0)
    log_f_current = log_target(x).double() if current_log_target is None else current_log_target.double()
    log_f_proposal = log_target(proposal).double()
    log_ratio = log_f_proposal - log_f_current + log_reverse - log_forward
    uniform = torch.rand(batch, device=x.device, generator=generator, dtype=torch.float64)
    accepted = uniform.log() < log_ratio
    return (torch.where(accepted.unsqueeze(1), proposal, x), accepted,
            torch.where(accepted, log_f_proposal, log_f_current))
