"""Calibration of a marginal network: how far f(x_S) - f(empty) is from AO-ARM-E's log p(x_S), in nats.

Ranking (correlations) says whether the marginal network orders assignments like the conditionals do; calibration
says whether its values can be taken at their word. The reference is the conditionals' chain rule along several
random orders combined by log-mean-exp (AO-ARM-E); the conditionals are frozen in stage 2, so a fixed set's
reference values are computed once and reused.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import arm
from .experiment import batched
from .marginal import log_normalizer, normalized_log_marginal, self_consistency_terms
from .progress import progress


def random_observed_masks(num_rows: int, num_positions: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """(num_rows, D) masks with exactly round(fraction * D) observed positions (at least one), uniformly placed."""
    count = max(1, min(num_positions, round(fraction * num_positions)))
    rank = torch.rand(num_rows, num_positions, generator=generator).argsort(1).argsort(1)
    return rank < count


def gap_summary(marginal, reference) -> dict:
    """Signed mean and mean absolute difference marginal - reference (nats), the count, and the signed mean's standard
    error over the examples (NaN below 2): the network's error differs from image to image, so a handful of examples
    gives the mean only roughly."""
    difference = np.asarray(marginal, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    if difference.size == 0:
        return {"gap_nats": math.nan, "abs_gap_nats": math.nan, "n": 0, "gap_se_nats": math.nan}
    spread = float(difference.std(ddof=1) / math.sqrt(difference.size)) if difference.size > 1 else math.nan
    return {"gap_nats": float(difference.mean()), "abs_gap_nats": float(np.abs(difference).mean()), "n": int(difference.size),
            "gap_se_nats": spread}


@torch.no_grad()
def consistency_drift(net, rows: torch.Tensor, batch_size: int, device, generator: torch.Generator | None = None,
                      draws: int | None = None, description: str | None = None, by_cell: bool = False) -> dict:
    """Reference-free level of the marginal network: mean over ``rows`` of f(x) - f(empty) - E_sigma log p_sigma(x), nats.

    Along any order the self-consistency residuals telescope, sum_t r_t = f(empty) - f(x) + log p_sigma(x), so with the
    order and the step uniform, -D * E[r] is exactly that mean (E_sigma log p_sigma is the order-averaged chain rule,
    whose level the self-consistency loss's fixed point has, though not its per-example values; AO-ARM-E's log-mean-exp
    lies above it by a Jensen gap). One conditional and one marginal pass per row and no chain rule, but a noisy one: the
    standard error is D * std(r) / sqrt(draws) (about 2 nats for 4,096 MNIST rows when the residuals' rms is 0.17).

    ``draws``: (row, order, step) draws, cycling through ``rows`` with a fresh order and step each time round (default:
    each row once). The noise is the step's, not the rows', so more draws than rows still shrink the standard error.
    ``description``: show a progress bar with this label (the level fit's 32,768 draws take minutes).
    ``by_cell``: also return, per draw, the (position, value) the constraint adds and its prefix size (``draw_positions``,
    ``draw_values``, ``draw_sizes``, ``draw_residuals``), and ``cell_sums`` / ``cell_counts`` (D, K): the residuals summed
    and counted by cell, for :func:`fit_cells`.
    """
    residuals, positions, values, sizes = [], [], [], []
    draws = len(rows) if draws is None else int(draws)
    starts = range(0, draws if len(rows) else 0, batch_size)
    for start in (progress(starts, desc=description, unit="batch") if description else starts):
        x = rows[torch.arange(start, min(start + batch_size, draws)) % len(rows)].to(device)
        terms = self_consistency_terms(net, x, generator=generator)
        residuals.append(terms["residual"].double().cpu())
        if by_cell:
            positions.append(terms["position"].cpu())
            values.append(x[torch.arange(len(x)), terms["position"]].long().cpu())
            sizes.append(terms["extended_mask"].sum(1).cpu() - 1)
    scaled = -rows.shape[1] * torch.cat(residuals).numpy() if residuals else np.zeros(0)
    spread = float(scaled.std(ddof=1) / math.sqrt(scaled.size)) if scaled.size > 1 else math.nan
    result = {"drift_nats": float(scaled.mean()) if scaled.size else math.nan, "drift_se_nats": spread, "n": int(scaled.size)}
    if not by_cell:
        return result
    record = {"draw_positions": torch.cat(positions), "draw_values": torch.cat(values), "draw_sizes": torch.cat(sizes),
              "draw_residuals": torch.cat(residuals)}
    cell_sums, cell_counts = cell_totals(record["draw_residuals"], record, rows.shape[1], net.num_classes)
    return {**result, **record, "cell_sums": cell_sums, "cell_counts": cell_counts}


def cell_totals(values: torch.Tensor, record: dict, num_positions: int, num_classes: int):
    """``values`` (one per draw) summed and counted by the (position, value) cell each draw adds: two (D, K) tables."""
    cell = (record["draw_positions"], record["draw_values"])
    sums = torch.zeros(num_positions, num_classes, dtype=torch.float64).index_put_(cell, values.double(), accumulate=True)
    counts = torch.zeros_like(sums).index_put_(cell, torch.ones_like(values, dtype=torch.float64), accumulate=True)
    return sums, counts


@torch.no_grad()
def fit_level(net, rows: torch.Tensor, batch_size: int, device, generator: torch.Generator | None = None,
              also_shift=()) -> dict:
    """Set the level of a ``sum``-head marginal network in closed form: estimate its drift on ``rows``
    (:func:`consistency_drift`) and move every per-position score by -drift / D, so that f(x) - f(empty) moves by
    -drift on complete rows (by -drift * |S| / D on a subset). Adam leaves the level wherever its last steps put it (a
    shared offset moves f by up to D * lr per step); this is the least-squares optimum of one extra bias per observed
    position, from many rows at once. ``also_shift``: other tensors holding the same bias (a moving average). Returns
    the drift measured before the shift."""
    drift = consistency_drift(net, rows, batch_size, device, generator)
    shift_level(net, drift["drift_nats"], also_shift)
    return drift


@torch.no_grad()
def fit_cells(net, drift: dict, prior_draws: float = 1.0, size_buckets: int = 0, sweeps: int = 20) -> dict:
    """Add to the ``sum`` head's (position, value) table the least-squares correction of the drift's residuals, and with
    ``size_buckets`` = B > 0 a table by |S| as well.

    A constraint that adds position j with value v to a prefix of size d has residual
    r = f(x_S) + log p(v | x_S) - f(x_S, x_j = v); a cell entry c[j, v] changes it by exactly -c[j, v], and a size entry
    h[|S|] by h[d] - h[d + 1]. So c[j, v] = the mean residual of the draws that add (j, v) zeroes every cell's mean
    residual (the level fit is the same with one shared entry): f(x) - f(empty) then moves by sum_j c[j, x_j], an
    image's own correction. The size table takes a level that is not linear in |S| (subsets sat 1-1.5 nats low on MNIST
    while complete images were right): h[d + 1] - h[d] = the mean residual of the prefix sizes in d's bucket (B equal
    buckets of 0..D-1), h[0] = 0, and its linear part moved into the cells (the same f), so h[D] = 0 and h is the level's
    departure from linear in |S|. With both, ``sweeps`` alternating closed-form updates solve the joint least squares.
    ``prior_draws`` pseudo-draws at the shared mean shrink rarely drawn cells toward it (least squares with a penalty;
    0: plain cell means, undefined for undrawn cells). ``drift``: :func:`consistency_drift` with ``by_cell=True``."""
    head = net.marginal_sum_head()
    if head is None:
        raise ValueError("level_fit_cells needs a sum marginal head (arch.marginal_head=sum): the pooled head has no "
                         "per-position terms to correct")
    num_positions, num_classes = head.cell_correction.shape
    counts = drift["cell_counts"]
    if prior_draws < 0 or (prior_draws == 0 and not bool((counts > 0).all())):
        raise ValueError(f"prior_draws={prior_draws} must be positive (or 0 when every (position, value) cell "
                         f"was drawn): use prior_draws=1")
    if not 0 <= size_buckets <= num_positions:
        raise ValueError(f"level_fit_size_buckets={size_buckets} must be between 0 and D = {num_positions}")
    residuals, positions, values = drift["draw_residuals"], drift["draw_positions"], drift["draw_values"]
    bucket = drift["draw_sizes"] * size_buckets // num_positions if size_buckets else None
    step = torch.zeros(len(residuals), dtype=torch.float64)  # h[d + 1] - h[d] of each draw's prefix size
    for _ in range(sweeps if size_buckets else 1):
        sums, _ = cell_totals(residuals - step, drift, num_positions, num_classes)
        shared = sums.sum() / counts.sum()
        correction = (sums + prior_draws * shared) / (counts + prior_draws)
        if size_buckets:
            left = residuals - correction[positions, values]
            bucket_means = (torch.zeros(size_buckets, dtype=torch.float64).index_add_(0, bucket, left)
                            / torch.bincount(bucket, minlength=size_buckets).clamp(min=1))
            step = bucket_means[bucket]
    if size_buckets:  # c[j, v] + a with h[k] - a k is the same f: put h's linear part in the cells, so h[D] = 0
        increments = bucket_means[torch.arange(num_positions) * size_buckets // num_positions]
        profile = torch.cat([torch.zeros(1, dtype=torch.float64), increments.cumsum(0)])
        slope = profile[-1] / num_positions
        correction, profile = correction + slope, profile - slope * torch.arange(num_positions + 1, dtype=torch.float64)
        head.size_correction.add_(profile.to(head.size_correction))
    head.cell_correction.add_(correction.to(head.cell_correction))
    result = {"cells_drawn": int((counts > 0).sum()), "cells": int(counts.numel()), "prior_draws": float(prior_draws),
              "cell_correction_sd_nats": float(correction[counts > 0].std()) if int((counts > 0).sum()) > 1 else math.nan}
    if size_buckets:
        result.update({"size_buckets": int(size_buckets),
                       "size_correction_nats": {f"{q}%": float(profile[round(q / 100 * num_positions)])
                                                for q in (25, 50, 75, 100)}})
    return result


@torch.no_grad()
def shift_level(net, nats: float, also_shift=()) -> None:
    """Lower f(x) - f(empty) by ``nats`` on complete rows (by nats * |S| / D on a subset): every per-position score of
    the sum head moves by -nats / D."""
    bias = net.marginal_score_bias()
    if bias is None:
        raise ValueError("the level can only be set for a sum marginal head (arch.marginal_head=sum): the pooled head's "
                         "output has no per-position score to shift")
    for tensor in (bias, *also_shift):
        tensor.sub_(nats / net.num_positions)


def fraction_label(fraction: float) -> str:
    return "full" if fraction >= 1.0 else f"observed_{round(100 * fraction)}"


class CalibrationSet:
    """Fixed rows, each observed at one of ``fractions`` of its positions, with their AO-ARM-E references cached."""

    def __init__(self, net, rows: torch.Tensor, fractions, orders: int, batch_size: int, device, steps_per_pass: int = 1,
                 seed: int = 0, reference=None):
        generator = torch.Generator().manual_seed(seed)
        self.labels, xs, masks = [], [], []
        for fraction in fractions:
            masks.append(random_observed_masks(len(rows), rows.shape[1], float(fraction), generator))
            xs.append(rows)
            self.labels += [fraction_label(float(fraction))] * len(rows)
        self.x, self.mask = torch.cat(xs), torch.cat(masks)
        self.batch_size, self.device = batch_size, device
        if reference is not None:  # cached by the caller for the same rows, fractions and seed
            self.reference = np.asarray(reference)
            return
        with torch.no_grad():
            self.reference = batched(lambda x, m: arm.ensemble_log_prob(net, x, orders, m, steps_per_pass), self.x, self.mask,
                                     batch_size, device, desc="AO-ARM-E reference").numpy()

    @torch.no_grad()
    def measure(self, net) -> dict:
        """{label: gap_summary} of the marginal network on the cached set."""
        normalizer = log_normalizer(net, self.device)
        marginal = batched(lambda x, m: normalized_log_marginal(net, x, m, normalizer), self.x, self.mask, self.batch_size,
                           self.device).numpy()
        labels = np.asarray(self.labels)
        return {label: gap_summary(marginal[labels == label], self.reference[labels == label])
                for label in dict.fromkeys(self.labels)}


def flat_gap_metrics(summaries: dict) -> dict:
    """{label: summary} -> {"marginal_gap_<label>": ..., "marginal_abs_gap_<label>": ...} for curves."""
    metrics = {}
    for label, summary in summaries.items():
        metrics[f"marginal_gap_{label}"] = summary["gap_nats"]
        metrics[f"marginal_abs_gap_{label}"] = summary["abs_gap_nats"]
    return metrics


def group_error_summary(groups) -> dict:
    """The original's per-group log-likelihood error: per group, mean and variance of (candidate - reference),
    then averaged over groups."""
    means, variances = [], []
    for reference, candidate in groups:
        error = np.asarray(candidate, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
        if error.size:
            means.append(error.mean())
            variances.append(error.var())
    if not means:
        return {"error_mean_nats": math.nan, "error_var_nats2": math.nan, "num_groups": 0}
    return {"error_mean_nats": float(np.mean(means)), "error_var_nats2": float(np.mean(variances)), "num_groups": len(means)}
