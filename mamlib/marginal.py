"""Marginal-network algorithms: log p_theta(x_S) in one pass, the self-consistency loss and the anchor term.

f_theta(x_S) is the backbone's ``log_marginal`` output; the normalised marginal is f(x_S) - f(empty).
"""
from __future__ import annotations

import torch

from .arm import chain_rule_prefix_log_probs, conditional_log_probs, conditional_logits, value_log_prob, value_log_probs
from .orders import index_at, observed_before, order_observed_first, random_order, random_prefix
from .progress import progress


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
                           conditional_grad: bool = True, extra_rows: tuple | None = None, span: int = 1,
                           prefix_gradient: float = 1.0, surprise_share: float = 0.0, extensions: int = 1) -> dict:
    """One sampled constraint per row, f(empty), and f on the extended prefix (reused by the anchor term).

    With d ~ U{1..D}: residual = f(x_sigma(<d)) + log p_phi(x_sigma(d) | x_sigma(<d)) - f(x_sigma(<=d)).
    Two passes: prefixes with both heads (the conditional term needs logits there), and
    [extended prefixes; ``extra_rows``; empty] with the marginal head only.

    ``all_values``: the constraint is written for every value k of x_sigma(d), not only the row's own, and the
    squared residuals are averaged with weights p_phi(k | x_sigma(<d)) (no gradient). When x_sigma(d) ~ p_phi this is
    the conditional expectation of the sampled-value loss (Rao-Blackwellised: same mean, less noise), and the
    conditional head gets a target for its whole distribution. The second pass then has K * B + 1 rows (+ extra).
    ``conditional_grad=False`` stops the gradient into the conditionals: only f is fitted to them.
    ``extra_rows``: (x, observed_mask) of other rows whose raw f is wanted (key ``f_extra``), in the same marginal pass:
    one pass fewer for the energy-based KL objective (f on complete rows) and the trajectory anchor (f on its prefixes).
    ``span`` = k > 1: the constraint telescopes over k consecutive steps of the order,
    f(x_sigma(<d)) + sum_{j<k} log p_phi(x_sigma(d+j) | x_sigma(<d+j)) = f(x_sigma(<d+k)), d ~ U{1..D-k+1}: k times the
    distance per constraint, with the k conditionals in one batched pass (see :func:`span_terms`).
    ``prefix_gradient`` = beta in [0, 1]: the gradient through f on the shorter prefix is scaled by beta (the value is
    unchanged). 1 is the paper's least squares, whose fixed point with inconsistent conditionals is pulled by the
    constraints *out* of every set as well as into it, so f(x) moves away from E_sigma log p_sigma(x) per example;
    0 is TD-style (the prefix a fixed target), whose fixed point is exactly E_sigma log p_sigma(x_S) on every set, but
    which learns by bootstrapping from f(empty) outward; in between, the pull shrinks with beta.
    ``surprise_share`` = a in (0, 1): given the prefix, the next position is drawn from :func:`surprise_proposal`
    (a share a in proportion to -log p_phi(x_j | prefix), the rest uniform) instead of uniformly, and each squared
    residual is weighted by uniform / proposal probability: the same expected loss, with more of the draws on the
    steps whose conditional is far from certain, where f has something to learn (one pass gives every position's
    conditional, so the draw costs no extra pass).
    ``extensions`` = m > 1: m next positions per prefix (drawn independently, from the surprise proposal or uniformly),
    so one prefix pass serves m constraints; the terms then have m * B rows, row k * B + b for draw k of row b.
    """
    if extensions < 1:
        raise ValueError(f"consistency_extensions={extensions} must be at least 1")
    if span > 1:
        if all_values or surprise_share or extensions > 1:
            raise ValueError("consistency_span > 1 needs consistency_values=sampled, step_surprise_share=0 and "
                             "consistency_extensions=1")
        return span_terms(net, x, span, order=order, generator=generator, conditional_grad=conditional_grad,
                          extra_rows=extra_rows, prefix_gradient=prefix_gradient)
    batch, dim = x.shape
    if order is None:  # the same distribution without sorting
        prefix_mask, position = random_prefix(batch, dim, device=x.device, generator=generator)
    else:
        step = torch.randint(0, dim, (batch,), device=x.device, generator=generator)  # 0-based index of sigma(d)
        prefix_mask, position = observed_before(order, step), index_at(order, step)
    weight = None
    if surprise_share or extensions > 1:  # the prefix's pass gives every position's conditional: draw the steps from them
        if all_values:
            raise ValueError("step_surprise_share > 0 and consistency_extensions > 1 need consistency_values=sampled")
        f_prefix, all_logits = net(x, prefix_mask, need_logits=True, need_marginal=True)
        remaining = ~prefix_mask
        if surprise_share:
            surprise = -value_log_probs(torch.log_softmax(all_logits.detach().float(), dim=-1), x)
            proposal = surprise_proposal(surprise, remaining, surprise_share)
        else:
            proposal = remaining.float() / remaining.sum(1, keepdim=True)
        drawn = torch.multinomial(proposal, extensions, replacement=extensions > 1, generator=generator).t()  # (m, B)
        source = torch.arange(batch, device=x.device).repeat(extensions)  # the row each draw extends
        position = drawn.reshape(-1)
        weight = 1.0 / (remaining.sum(1).float()[source] * proposal[source, position])  # 1 for a uniform draw
        logits = all_logits[source, position]
        if extensions > 1:
            x, prefix_mask, f_prefix = x[source], prefix_mask[source], f_prefix[source]
    else:
        f_prefix, logits = net(x, prefix_mask, need_logits=True, need_marginal=True, positions=position)
    rows = torch.arange(len(x), device=x.device)
    extended_mask = prefix_mask.clone()
    extended_mask[rows, position] = True
    f_prefix = scale_gradient(f_prefix, prefix_gradient)
    if not conditional_grad:
        logits = logits.detach()
    empty_x, empty_mask = empty_like_rows(x)
    num_classes = logits.shape[-1]
    if all_values:  # row k * B + b: row b with x_sigma(d) set to k
        extended_x, extended_rows_mask = x.repeat(num_classes, 1), extended_mask.repeat(num_classes, 1)
        extended_x[torch.arange(num_classes * batch, device=x.device), position.repeat(num_classes)] = (
            torch.arange(num_classes, device=x.device).repeat_interleave(batch).to(x.dtype))
    else:
        extended_x, extended_rows_mask = x, extended_mask
    more_x, more_mask = ([extra_rows[0]], [extra_rows[1]]) if extra_rows is not None else ([], [])
    f_rest = log_marginal(net, torch.cat([extended_x, *more_x, empty_x]),
                          torch.cat([extended_rows_mask, *more_mask, empty_mask])).float()
    f_extended = f_rest[:len(extended_x)]
    extra = {"f_extra": f_rest[len(extended_x):-1]} if extra_rows is not None else {}
    if not all_values:
        residual = f_prefix.float() + value_log_prob(logits, x, position) - f_extended
        squared = residual.pow(2) if weight is None else weight * residual.pow(2)
        return {"residual": residual, "squared_residual": squared, "f_empty": f_rest[-1],
                "f_extended": f_extended, "extended_mask": extended_mask, "position": position, **extra}
    f_values = f_extended.view(num_classes, batch).t()  # (B, K): f(x_sigma(<d), x_sigma(d) = k)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    residuals = f_prefix.float().unsqueeze(1) + log_probs - f_values
    own_value = x[rows, position].long()
    return {"residual": residuals[rows, own_value],
            "squared_residual": (log_probs.detach().exp() * residuals.pow(2)).sum(1),
            "f_empty": f_rest[-1], "f_extended": f_values[rows, own_value], "extended_mask": extended_mask,
            "position": position, **extra}


def scale_gradient(value: torch.Tensor, scale: float) -> torch.Tensor:
    """``value`` in the forward pass, ``scale`` times its gradient in the backward one."""
    if not 0.0 <= scale <= 1.0:
        raise ValueError(f"consistency_prefix_gradient={scale} must be in [0, 1]: 1 = the paper's, 0 = a fixed target")
    if scale == 1.0:
        return value
    return value.detach() if scale == 0.0 else scale * value + (1.0 - scale) * value.detach()


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


def span_terms(net, x, span: int, order=None, generator=None, conditional_grad: bool = True,
               extra_rows: tuple | None = None, prefix_gradient: float = 1.0) -> dict:
    """The k-step constraint of :func:`self_consistency_terms`. Two passes: the k prefixes of every row with the
    conditional head only (k * B rows, one position each), and [prefixes; extended prefixes; ``extra_rows``; empty]
    with the marginal head only. ``squared_residual`` is divided by k, so that the D-weighted loss keeps the scale of
    the one-step one (k independent step errors add k times the variance)."""
    batch, dim = x.shape
    if not 1 <= span <= dim:
        raise ValueError(f"consistency_span={span} must be between 1 and the number of positions D={dim}")
    if order is None:
        order = random_order(batch, dim, device=x.device, generator=generator)
    start = torch.randint(0, dim - span + 1, (batch,), device=x.device, generator=generator)
    steps = start.repeat(span) + torch.arange(span, device=x.device).repeat_interleave(batch)  # row j * B + b
    order_rep, x_rep = order.repeat(span, 1), x.repeat(span, 1)
    positions = index_at(order_rep, steps)
    with torch.set_grad_enabled(conditional_grad and torch.is_grad_enabled()):
        logits = conditional_logits(net, x_rep, observed_before(order_rep, steps), positions)
    span_log_prob = value_log_prob(logits, x_rep, positions).view(span, batch).sum(0)
    prefix_mask, extended_mask = observed_before(order, start), observed_before(order, start + span)
    empty_x, empty_mask = empty_like_rows(x)
    more_x, more_mask = ([extra_rows[0]], [extra_rows[1]]) if extra_rows is not None else ([], [])
    f_all = log_marginal(net, torch.cat([x, x, *more_x, empty_x]),
                         torch.cat([prefix_mask, extended_mask, *more_mask, empty_mask])).float()
    f_prefix, f_extended = f_all[:batch], f_all[batch:2 * batch]
    f_prefix = scale_gradient(f_prefix, prefix_gradient)
    residual = f_prefix + span_log_prob - f_extended
    extra = {"f_extra": f_all[2 * batch:-1]} if extra_rows is not None else {}
    return {"residual": residual, "squared_residual": residual.pow(2) / span, "f_empty": f_all[-1],
            "f_extended": f_extended, "extended_mask": extended_mask, **extra}


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


class TrajectoryAnchor:
    """Exact chain-rule targets for the anchor term: N rows, one random order each, and log p_sigma of every prefix.

    Computed once from frozen conditionals (N chain rules of D steps). A draw picks a row and a prefix size
    t ~ U{1..D}; the target log p_sigma(x_sigma(<=t)) is, over the row's uniformly random order, an unbiased sample of
    E_sigma log p_sigma(x_S) for S = that prefix (the order within S is uniform too): the minimiser of the one-pass
    :func:`anchor_target`, but with the spread of log p_sigma over orders (a few nats) as its only noise instead of a
    one-step estimate scaled by |S| (hundreds of nats on MNIST).
    """

    def __init__(self, rows: torch.Tensor, order: torch.Tensor, prefix_log_probs: torch.Tensor):
        self.rows, self.order, self.prefix_log_probs = rows, order, prefix_log_probs

    @classmethod
    @torch.no_grad()
    def compute(cls, net, rows: torch.Tensor, batch_size: int, steps_per_pass: int = 1, generator=None,
                device=None, order: torch.Tensor | None = None) -> "TrajectoryAnchor":
        """One chain rule per row along ``order`` (default: a random order per row)."""
        device = device if device is not None else rows.device
        order = random_order(len(rows), rows.shape[1], generator=generator) if order is None else order.cpu()
        prefix_log_probs = []
        with progress(total=len(rows) * rows.shape[1], desc="anchor trajectories", unit="step") as bar:
            for start in range(0, len(rows), batch_size):
                x, rank = rows[start:start + batch_size].to(device), order[start:start + batch_size].to(device)
                prefix_log_probs.append(chain_rule_prefix_log_probs(
                    net, x, rank, steps_per_pass, progress=lambda steps, n=len(x): bar.update(steps * n)).cpu())
        return cls(rows.cpu(), order.cpu(), torch.cat(prefix_log_probs))

    def draw(self, count: int, device=None, generator=None):
        """(x, observed_mask, target float32) for ``count`` random (row, prefix) pairs."""
        dim = self.rows.shape[1]
        index = torch.randint(0, len(self.rows), (count,), generator=generator)
        size = torch.randint(1, dim + 1, (count,), generator=generator)
        observed = observed_before(self.order[index], size)
        target = self.prefix_log_probs[index, size].float()
        return self.rows[index].to(device), observed.to(device), target.to(device)

    def state_dict(self) -> dict:
        return {"rows": self.rows, "order": self.order, "prefix_log_probs": self.prefix_log_probs}

    @classmethod
    def from_state_dict(cls, state: dict) -> "TrajectoryAnchor":
        return cls(state["rows"], state["order"], state["prefix_log_probs"])


def self_consistency_loss(net, x, log_z: float | torch.Tensor = 0.0, order=None, generator=None,
                          anchor_weight: float = 0.0, anchor_draws: int = 1, all_values: bool = False,
                          trajectories: TrajectoryAnchor | None = None, span: int = 1, prefix_gradient: float = 1.0,
                          surprise_share: float = 0.0, extensions: int = 1):
    """D * mean(residual^2) + (f(empty) - log_z)^2 [+ anchor_weight * mean((f(S) - f(empty) - anchor)^2) / D].

    The anchor term regresses the normalised marginal of the extended prefix S on :func:`anchor_target`; its
    minimiser is E_sigma log p_sigma(x_S), which pins the level of f that adjacent-step constraints leave free to
    drift. Divided by D so that its scale (whole-set log-probabilities) is comparable with the D-weighted
    per-step consistency term. With ``trajectories`` the anchor instead regresses f on B prefixes of those rows
    (their exact chain-rule values, same minimiser, far less noise), computed in the consistency term's marginal pass.
    Returns (loss, parts for logging).
    """
    anchor_rows = None
    if anchor_weight > 0 and extensions > 1:
        raise ValueError("anchor_weight > 0 needs consistency_extensions=1 (the anchor regresses one extended prefix per row)")
    if anchor_weight > 0 and trajectories is not None:
        *anchor_rows, anchor_values = trajectories.draw(x.shape[0], device=x.device, generator=generator)
    terms = self_consistency_terms(net, x, order=order, generator=generator, all_values=all_values, extra_rows=anchor_rows,
                                   span=span, prefix_gradient=prefix_gradient, surprise_share=surprise_share,
                                   extensions=extensions)
    consistency = terms["squared_residual"].mean()
    normalizer = (terms["f_empty"] - log_z).pow(2)
    loss = x.shape[1] * consistency + normalizer
    parts = {"consistency": consistency.item(), "normalizer": normalizer.item(), "log_z_model": terms["f_empty"].item()}
    if anchor_weight > 0:
        if anchor_rows is not None:
            fitted, target = terms["f_extra"], anchor_values
        else:
            fitted = terms["f_extended"]
            target = anchor_target(net, x, terms["extended_mask"], generator=generator, draws=anchor_draws)
        anchor = (fitted - terms["f_empty"] - target).pow(2).mean() / x.shape[1]
        loss = loss + anchor_weight * anchor
        parts["anchor"] = anchor.item()
    return loss, parts
