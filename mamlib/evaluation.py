"""Evaluation helpers: bits per dimension, marginal-quality correlations, timing and result tables.

The correlation protocol follows the original ``preprocess_logp`` / ``compare_logp``:
per group of samples, keep only samples whose reference log-likelihoods are separated by more than
``threshold`` nats (the Monte-Carlo noise of the reference), correlate the candidate estimates with
the reference on the kept samples, and average over groups weighted by the kept count.
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from .files import write_json_atomic, write_text_atomic


def _as_numpy_1d(values, name: str) -> np.ndarray:
    if torch.is_tensor(values):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}; flatten it first")
    return array


def bits_per_dim(log_prob_nats, num_positions: int):
    """-log p / (D ln 2): negative log-likelihood in bits per dimension (or per character).

    Returns a float tensor for tensor input, otherwise a float numpy array (0-d for a scalar).
    """
    if num_positions <= 0:
        raise ValueError(f"num_positions must be positive, got {num_positions}")
    denominator = num_positions * math.log(2.0)
    if torch.is_tensor(log_prob_nats):
        return -log_prob_nats.double() / denominator
    return -np.asarray(log_prob_nats, dtype=np.float64) / denominator


def log_mean_exp(values: torch.Tensor, dim: int) -> torch.Tensor:
    """log(mean(exp(values), dim)) computed stably with logsumexp."""
    count = values.shape[dim]
    if count == 0:
        raise ValueError(f"log_mean_exp over an empty dimension {dim} (shape {tuple(values.shape)})")
    return torch.logsumexp(values, dim=dim) - math.log(count)


def separated_indices(log_probs, threshold: float) -> np.ndarray:
    """Indices of samples whose log-likelihoods are more than ``threshold`` apart.

    Sort descending, keep the top, then walk down keeping a value iff (last kept − value) > threshold.
    Returns the original indices of the kept values, in descending-value order.
    """
    values = _as_numpy_1d(log_probs, "log_probs")
    if np.isnan(values).any():
        raise ValueError("log_probs contains NaN; drop or fix those samples before selecting")
    order = np.argsort(-values, kind="stable")
    kept: list[int] = []
    for index in order:
        if not kept or values[kept[-1]] - values[index] > threshold:
            kept.append(int(index))
    return np.asarray(kept, dtype=np.int64)


def correlation_summary(reference, candidate) -> dict:
    """Spearman and Pearson correlation of candidate with reference, mean |reference − candidate|, n.

    Pairs with a non-finite value are dropped; n counts the pairs used. Correlations are NaN (with
    no warning) when n < 2 or either side is constant.
    """
    reference = _as_numpy_1d(reference, "reference")
    candidate = _as_numpy_1d(candidate, "candidate")
    if reference.shape != candidate.shape:
        raise ValueError(f"reference and candidate must have the same length, got {reference.size} and {candidate.size}")
    finite = np.isfinite(reference) & np.isfinite(candidate)
    reference, candidate = reference[finite], candidate[finite]
    count = int(reference.size)
    spearman = pearson = math.nan
    if count >= 2 and np.ptp(reference) > 0 and np.ptp(candidate) > 0:
        from scipy.stats import pearsonr, spearmanr  # imported on first use: heavy, and most runs never call it

        spearman = float(spearmanr(candidate, reference).statistic)
        pearson = float(pearsonr(candidate, reference).statistic)
    mean_abs_error = float(np.mean(np.abs(reference - candidate))) if count else math.nan
    return {"spearman": spearman, "pearson": pearson, "mean_abs_error": mean_abs_error, "n": count,
            "spearman_ci95": correlation_interval(spearman, count, rank=True),
            "pearson_ci95": correlation_interval(pearson, count)}


def correlation_interval(value: float, count: int, rank: bool = False) -> list[float]:
    """Approximate 95 % interval of a correlation from ``count`` pairs (Fisher z; Bonett-Wright variance for ranks).

    Twelve pooled points leave an interval about 0.5 wide around 0.8: say so next to the figure. NaN when undefined
    (n < 4 or the correlation is NaN).
    """
    if count < 4 or not math.isfinite(value):
        return [math.nan, math.nan]
    clipped = min(max(value, -0.999999), 0.999999)
    variance = (1.0 + clipped ** 2 / 2.0) / (count - 3) if rank else 1.0 / (count - 3)
    centre, half = math.atanh(clipped), 1.959964 * math.sqrt(variance)
    return [math.tanh(centre - half), math.tanh(centre + half)]


def aggregate_correlations(groups, threshold: float) -> dict:
    """Kept-count-weighted mean correlations over groups of (reference, candidate) log-likelihoods.

    Per group the samples are filtered by :func:`separated_indices` on the reference; a group with fewer than 2
    kept samples, or a NaN correlation (a constant side), has no defined correlation: it is left out of the means
    and counted in ``num_undefined``. NaN results when no group counts.
    """
    weighted_spearman = weighted_pearson = 0.0
    num_groups = num_points = num_undefined = 0
    for reference, candidate in groups:
        reference = _as_numpy_1d(reference, "reference")
        candidate = _as_numpy_1d(candidate, "candidate")
        kept = separated_indices(reference, threshold)
        summary = correlation_summary(reference[kept], candidate[kept]) if kept.size >= 2 else None
        if summary is None or math.isnan(summary["spearman"]) or math.isnan(summary["pearson"]):
            num_undefined += 1
            continue
        weighted_spearman += summary["spearman"] * summary["n"]
        weighted_pearson += summary["pearson"] * summary["n"]
        num_groups += 1
        num_points += summary["n"]
    if num_points == 0:
        return {"spearman": math.nan, "pearson": math.nan, "num_groups": 0, "num_points": 0, "num_undefined": num_undefined}
    return {
        "spearman": weighted_spearman / num_points,
        "pearson": weighted_pearson / num_points,
        "num_groups": num_groups,
        "num_points": num_points,
        "num_undefined": num_undefined,
    }


def time_callable(fn, repeats: int = 5, warmup: int = 1, synchronize=None) -> dict:
    """Wall-clock seconds of ``fn()``: {"median", "mean", "std" (population), "repeats"}.

    ``synchronize`` (e.g. the accelerator's synchronize function) is called before starting and
    after finishing each timed call, so asynchronous device work is included.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    sync = synchronize if synchronize is not None else (lambda: None)
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return {
        "median": statistics.median(seconds),
        "mean": statistics.fmean(seconds),
        "std": statistics.pstdev(seconds),
        "repeats": repeats,
    }


def _plain(value):
    """Python scalar for numpy / torch scalars; other values unchanged."""
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _cell(value, floatfmt: str) -> str:
    value = _plain(value)
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, floatfmt)
    return str(value).replace("|", "\\|")


def markdown_table(rows: list[dict], columns: list[str], floatfmt: str = ".4g") -> str:
    """GitHub markdown table; floats use ``floatfmt``, a missing key or None gives an empty cell."""
    if not columns:
        raise ValueError("columns is empty; name the row keys to show")
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(column), floatfmt) for column in columns) + " |")
    return "\n".join(lines) + "\n"


def _json_value(value):
    value = _plain(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/inf
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _json_table(rows: list[dict], columns: list[str]) -> dict:
    return {"columns": list(columns), "rows": [{key: _json_value(value) for key, value in row.items()} for row in rows]}


def write_report(rows: list[dict], columns: list[str], run_dir, stem: str = "results",
                 extra_tables: dict[str, tuple[list[dict], list[str]]] | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.md`` (markdown table) and ``<stem>.json`` ({"columns", "rows"}) into run_dir.

    ``extra_tables`` {title: (rows, columns)} follow the main table under their titles (JSON: ``"tables"``).
    The JSON keeps every key of every row; non-finite floats become null.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    markdown_path, json_path = run_dir / f"{stem}.md", run_dir / f"{stem}.json"
    markdown = markdown_table(rows, columns)
    payload = _json_table(rows, columns)
    for title, (extra_rows, extra_columns) in (extra_tables or {}).items():
        markdown += f"\n**{title}**\n\n" + markdown_table(extra_rows, extra_columns)
        payload.setdefault("tables", {})[title] = _json_table(extra_rows, extra_columns)
    write_text_atomic(markdown_path, markdown)
    write_json_atomic(json_path, payload, indent=2, allow_nan=False)
    return markdown_path, json_path


MAX_ENUMERATED_STATES = 2 ** 20


def all_assignments(num_positions: int, num_classes: int) -> torch.Tensor:
    """(K^D, D) every assignment in the value convention, first position most significant."""
    if num_classes ** num_positions > MAX_ENUMERATED_STATES:
        raise ValueError(f"K^D = {num_classes}^{num_positions} is too many states to enumerate (limit {MAX_ENUMERATED_STATES})")
    codes = torch.arange(num_classes ** num_positions)
    powers = num_classes ** torch.arange(num_positions - 1, -1, -1)
    return (codes.unsqueeze(1) // powers) % num_classes


def enumerated_kl(log_q: torch.Tensor, log_f: torch.Tensor) -> dict:
    """Exact KL(q || f/Z) over every state, with q = softmax(log_q) (normalised here: a marginal network's values need
    not sum to 1) and log Z = logsumexp(log f). Also returns q's log total mass before normalising."""
    log_q, log_f = log_q.double(), log_f.double()
    log_mass = torch.logsumexp(log_q, 0)
    log_q_normalised = log_q - log_mass
    log_z = torch.logsumexp(log_f, 0)
    q = log_q_normalised.exp()
    return {"kl": float((q * (log_q_normalised - log_f + log_z)).sum()), "log_mass": float(log_mass), "log_z": float(log_z)}
