"""Tests for mamlib.evaluation and mamlib.plots."""
import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from mamlib import evaluation, plots

torch.set_num_threads(1)


# ---------------------------------------------------------------- separated_indices

def test_separated_indices_hand_worked_example():
    log_probs = [-10.0, -3.0, -12.5, -3.5, -20.0, -9.0]
    # Sorted descending (value@index): -3@1, -3.5@3, -9@5, -10@0, -12.5@2, -20@4; threshold 2.
    # keep -3@1 (top); -3.5: 0.5 <= 2 drop; -9: 6 > 2 keep (last=-9); -10: 1 drop;
    # -12.5: 3.5 keep (last=-12.5); -20: 7.5 keep.  -> [1, 5, 2, 4]
    kept = evaluation.separated_indices(log_probs, threshold=2.0)
    assert kept.tolist() == [1, 5, 2, 4]


def test_separated_indices_gap_equal_to_threshold_is_dropped_and_compares_to_last_kept():
    # 0 kept; -2: gap exactly 2 is not > 2, dropped; -3: gap to last KEPT (0) is 3 -> kept.
    assert evaluation.separated_indices(torch.tensor([-2.0, 0.0, -3.0]), 2.0).tolist() == [1, 2]
    assert evaluation.separated_indices(np.array([]), 1.0).tolist() == []
    with pytest.raises(ValueError, match="NaN"):
        evaluation.separated_indices([0.0, float("nan")], 1.0)


# ---------------------------------------------------------------- correlations

def test_correlation_monotone_nonlinear():
    reference = np.arange(1.0, 11.0)
    candidate = reference ** 3  # strictly increasing but not linear
    summary = evaluation.correlation_summary(reference, candidate)
    assert summary["spearman"] == pytest.approx(1.0)
    expected_pearson = np.corrcoef(reference, candidate)[0, 1]  # independent computation
    assert summary["pearson"] == pytest.approx(expected_pearson)
    assert summary["pearson"] < 0.99  # about 0.93 for x vs x^3 on 1..10
    assert summary["mean_abs_error"] == pytest.approx(np.mean(np.abs(reference - candidate)))
    assert summary["n"] == 10


def test_correlation_nan_safety_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's ConstantInputWarning etc. would fail the test
        one = evaluation.correlation_summary([1.0], [2.0])
        empty = evaluation.correlation_summary([], [])
        constant = evaluation.correlation_summary([1.0, 2.0, 3.0], [5.0, 5.0, 5.0])
        with_nan = evaluation.correlation_summary([1.0, float("nan"), 2.0, 3.0], [1.0, 7.0, float("inf"), 2.0])
    assert one["n"] == 1 and math.isnan(one["spearman"]) and math.isnan(one["pearson"])
    assert one["mean_abs_error"] == 1.0
    assert empty["n"] == 0 and math.isnan(empty["spearman"]) and math.isnan(empty["mean_abs_error"])
    assert constant["n"] == 3 and math.isnan(constant["spearman"]) and math.isnan(constant["pearson"])
    # pairs (nan,7) and (2,inf) dropped -> (1,1), (3,2): two increasing points
    assert with_nan["n"] == 2 and with_nan["spearman"] == pytest.approx(1.0) and with_nan["pearson"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same length"):
        evaluation.correlation_summary([1.0, 2.0], [1.0])


@pytest.mark.parametrize("count", [12, 48])
def test_correlation_intervals_cover_the_true_correlation(count):
    """Bivariate normal pairs with correlation 0.8 (Spearman's population value: (6/pi) asin(0.4)): the 95 % intervals
    must cover the true value in about 95 % of 2,000 seeded replicates. Measured coverage 0.947-0.954; a binomial
    standard error is 0.005, and an interval off by a factor 1.5 in width would cover about 83 % or 99.6 %."""
    rho = 0.8
    rank_rho = 6.0 / math.pi * math.asin(rho / 2.0)
    generator = np.random.default_rng(count)
    covered = {"pearson": 0, "spearman": 0}
    replicates = 2000
    for _ in range(replicates):
        z = generator.standard_normal((2, count))
        reference, candidate = z[0], rho * z[0] + math.sqrt(1.0 - rho ** 2) * z[1]
        summary = evaluation.correlation_summary(reference, candidate)
        for name, true_value in (("pearson", rho), ("spearman", rank_rho)):
            low, high = summary[f"{name}_ci95"]
            covered[name] += low <= true_value <= high
    for name, hits in covered.items():
        assert 0.92 <= hits / replicates <= 0.98, (name, hits / replicates)


def test_correlation_interval_undefined_and_narrowing():
    assert all(math.isnan(v) for v in evaluation.correlation_interval(0.5, 3))
    assert all(math.isnan(v) for v in evaluation.correlation_interval(math.nan, 40))
    low12, high12 = evaluation.correlation_interval(0.8, 12)
    low48, high48 = evaluation.correlation_interval(0.8, 48)
    assert low12 < low48 < 0.8 < high48 < high12  # more points, narrower interval, around the estimate
    assert evaluation.correlation_interval(1.0, 10)[1] <= 1.0


def test_aggregate_correlations_weighted_by_kept_count():
    threshold = 1.0
    groups = [
        # A: all 3 kept. spearman 1. Pearson: ref centred [4,0,-4], cand mean -11 -> centred [10,9,-19],
        #    cov 40+0+76 = 116, norms sqrt(32), sqrt(542) -> r = 116/sqrt(17344).
        (np.array([-1.0, -5.0, -9.0]), np.array([-1.0, -2.0, -30.0])),
        # B: -2.5 is within 1 of -2 -> kept indices [0, 2]: ref (-2, -6), cand (-6, -1) -> both correlations -1.
        (np.array([-2.0, -2.5, -6.0]), np.array([-6.0, 0.0, -1.0])),
        # C: only one kept -> skipped.
        (np.array([-1.0, -1.5]), np.array([0.0, 1.0])),
        # D: 3 kept but the candidate is constant -> NaN -> skipped.
        (np.array([0.0, -5.0, -10.0]), np.array([2.0, 2.0, 2.0])),
    ]
    result = evaluation.aggregate_correlations(groups, threshold)
    assert result["num_groups"] == 2
    assert result["num_points"] == 5
    assert result["spearman"] == pytest.approx((3 * 1.0 + 2 * -1.0) / 5)
    assert result["pearson"] == pytest.approx((3 * 116 / math.sqrt(17344) + 2 * -1.0) / 5)

    nothing = evaluation.aggregate_correlations([groups[2]], threshold)
    assert nothing["num_groups"] == 0 and math.isnan(nothing["spearman"])


# ---------------------------------------------------------------- likelihood helpers

def test_bits_per_dim_value():
    log_prob = torch.tensor([-784 * math.log(2.0) * 0.5, 0.0])  # 0.5 bit per pixel, and a certain event
    bpd = evaluation.bits_per_dim(log_prob, 784)
    assert torch.allclose(bpd, torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert float(evaluation.bits_per_dim(-3 * math.log(2.0), 3)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="positive"):
        evaluation.bits_per_dim(log_prob, 0)


def test_log_mean_exp_matches_naive_and_is_stable():
    values = torch.tensor([[0.1, -0.5, 1.2], [-2.0, 0.3, 0.0]], dtype=torch.float64)
    naive = values.exp().mean(dim=1).log()
    assert torch.allclose(evaluation.log_mean_exp(values, dim=1), naive)
    assert torch.allclose(evaluation.log_mean_exp(values, dim=0), values.exp().mean(dim=0).log())

    large = torch.tensor([-1e4, -1e4 + math.log(3.0)], dtype=torch.float64)
    assert torch.isinf(large.exp().mean().log())  # the naive form underflows here
    # mean(exp) = exp(-1e4) * (1 + 3) / 2  ->  -1e4 + ln 2
    assert evaluation.log_mean_exp(large, dim=0).item() == pytest.approx(-1e4 + math.log(2.0), abs=1e-9)


# ---------------------------------------------------------------- timing and tables

def test_time_callable_call_pattern():
    events = []
    result = evaluation.time_callable(lambda: events.append("call"), repeats=3, warmup=2,
                                      synchronize=lambda: events.append("sync"))
    # 2 warm-up calls, then sync/call/sync per timed repeat
    assert events == ["call", "call"] + ["sync", "call", "sync"] * 3
    assert set(result) == {"median", "mean", "std", "repeats"} and result["repeats"] == 3
    assert result["median"] >= 0 and result["std"] >= 0
    with pytest.raises(ValueError, match="repeats"):
        evaluation.time_callable(lambda: None, repeats=0)


def test_markdown_table_format():
    rows = [
        {"model": "MaM", "nll": 0.14912, "count": np.int64(32)},
        {"model": "a|b", "nll": float("nan")},
    ]
    table = evaluation.markdown_table(rows, ["model", "nll", "count"], floatfmt=".3f")
    assert table == (
        "| model | nll | count |\n"
        "|---|---|---|\n"
        "| MaM | 0.149 | 32 |\n"
        "| a\\|b | nan |  |\n"
    )


def test_write_report(tmp_path):
    rows = [{"model": "MaM", "spearman": np.float32(0.5), "extra": float("inf")}]
    markdown_path, json_path = evaluation.write_report(rows, ["model", "spearman"], tmp_path / "run", stem="quality")
    assert markdown_path.name == "quality.md" and json_path.name == "quality.json"
    assert "| MaM | 0.5 |" in markdown_path.read_text()
    payload = json.loads(json_path.read_text())
    assert payload == {"columns": ["model", "spearman"], "rows": [{"model": "MaM", "spearman": 0.5, "extra": None}]}


# ---------------------------------------------------------------- plots

def _open_png(path):
    assert path.exists() and path.stat().st_size > 0
    image = Image.open(path)
    image.load()
    assert image.format == "PNG"
    return image


def test_save_image_grid_layout_and_colours(tmp_path):
    images = np.zeros((5, 2, 3))
    images[0, 0, 0] = 1.0
    images[1, 1, 2] = -1  # missing
    path = plots.save_image_grid(torch.tensor(images), tmp_path / "sub" / "grid.png", scale=2, pad=1)
    image = _open_png(path).convert("RGB")
    # ceil(sqrt(5)) = 3 per row, 2 rows: width 3*3*2 + 4*1 = 22, height 2*2*2 + 3*1 = 11
    assert image.size == (22, 11)
    pixels = np.asarray(image)
    to_byte = lambda rgb: tuple(int(round(c * 255)) for c in rgb)  # noqa: E731
    assert tuple(pixels[0, 0]) == to_byte(plots.PAD_RGB)
    assert tuple(pixels[1, 1]) == (255, 255, 255) and tuple(pixels[2, 2]) == (255, 255, 255)  # 2x2 block
    assert tuple(pixels[1, 3]) == (0, 0, 0)
    # image 1 starts at column 1 + 6 + 1 = 8; its pixel (1, 2) covers rows 3-4, columns 12-13
    assert tuple(pixels[3, 12]) == to_byte(plots.MISSING_RGB)
    assert tuple(pixels[10, 21]) == to_byte(plots.PAD_RGB)  # empty sixth slot stays padding

    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plots.save_image_grid(np.full((1, 2, 2), 2.0), tmp_path / "bad.png")


def drawn_axes(monkeypatch):
    """Every figure a plots function saves, as its list of Axes (readable after the figure is closed)."""
    drawn = []
    save = plots._save_figure

    def keep(fig, path):
        drawn.append(fig.axes)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save_figure", keep)
    return drawn


def tallest_runs(rgb, low, high):
    """Per pixel column, the longest vertical run of pixels whose blue minus red lies in (low, high)."""
    tint = rgb[..., 2].astype(int) - rgb[..., 0].astype(int)
    inside = (tint > low) & (tint < high)
    best = np.zeros(inside.shape[1], dtype=int)
    run = best
    for row in inside:
        run = np.where(row, run + 1, 0)
        best = np.maximum(best, run)
    return best


def test_save_histograms_draws_each_series_on_shared_bins(tmp_path, monkeypatch):
    drawn = drawn_axes(monkeypatch)
    rng = np.random.default_rng(0)
    named = {
        "model": rng.normal(size=200),
        "ground truth": torch.tensor(rng.normal(0.5, 1.0, size=200)),
        "constant": np.full(10, 0.3),
        "single": [1.0],
        "with nan": [float("nan"), 0.0, 1.0],
    }
    finite = {name: np.asarray(values, dtype=np.float64) for name, values in named.items()}
    finite = {name: values[np.isfinite(values)] for name, values in finite.items()}
    pooled = np.concatenate(list(finite.values()))
    edges = np.linspace(pooled.min(), pooled.max(), 41)  # 40 equal bins from the smallest to the largest finite value
    path = plots.save_histograms(named, tmp_path / "h" / "hist.png", title="log f", xlabel="log f")
    _open_png(path)
    (ax,) = drawn[-1]
    assert [text.get_text() for text in ax.get_legend().get_texts()] == [f"{name} (n={values.size})"
                                                                      for name, values in finite.items()]
    assert len(ax.containers) == len(named)
    for bars, values in zip(ax.containers, finite.values()):
        left = np.array([bar.get_x() for bar in bars])
        widths = np.array([bar.get_width() for bar in bars])
        assert np.allclose(left, edges[:-1], rtol=0, atol=1e-12) and np.allclose(widths, np.diff(edges), rtol=0, atol=1e-12)
        # density: the count in each bin [e_i, e_i+1) (the last one closed) over n times the bin width
        index = np.minimum(np.searchsorted(edges, values, side="right") - 1, len(edges) - 2)
        counts = np.bincount(index, minlength=len(edges) - 1)
        assert np.allclose([bar.get_height() for bar in bars], counts / (values.size * np.diff(edges)), rtol=1e-12, atol=0)
    # a KDE line, in its series' colour, for the series with two or more distinct values only
    from matplotlib.colors import to_rgb
    from scipy.stats import gaussian_kde

    assert len(ax.lines) == 3
    for line, name in zip(ax.lines, ["model", "ground truth", "with nan"]):
        assert to_rgb(line.get_color()) == ax.containers[list(named).index(name)][0].get_facecolor()[:3]
        grid = line.get_xdata()
        assert grid[0] == edges[0] and grid[-1] == edges[-1]
        assert np.allclose(line.get_ydata(), gaussian_kde(finite[name])(grid), rtol=1e-12, atol=0)

    # all values equal: one bar of width 1 centred on them, of density 1
    plots.save_histograms({"all equal": [2.0, 2.0]}, tmp_path / "equal.png")
    (ax,) = drawn[-1]
    (bars,) = ax.containers
    assert [(bar.get_x(), bar.get_width(), bar.get_height()) for bar in bars] == [(1.5, 1.0, 1.0)]
    assert len(ax.lines) == 0  # no KDE for zero variance
    with pytest.raises(ValueError, match="empty"):
        plots.save_histograms({}, tmp_path / "none.png")


def test_save_histograms_png_shows_where_the_mass_is(tmp_path):
    # three of four values at 0 and one at 1 (and the mirror image): the bar at 0 is three times as tall as the bar at 1.
    # Read back as the longest run of bar-fill pixels per column (the fill is C0 at alpha 0.35, blue minus red about 50;
    # the KDE line, about 150, is left out): measured ratios 3.02 and 1 / 3.05, a pixel or two of rounding on 94 px.
    for values, ratio in (([0.0, 0.0, 0.0, 1.0], 3.0), ([0.0, 1.0, 1.0, 1.0], 1 / 3.0)):
        image = np.asarray(_open_png(plots.save_histograms({"x": values}, tmp_path / "mass.png")).convert("RGB"))
        runs = tallest_runs(image, 30, 70)
        columns = np.nonzero(runs)[0]
        middle = (columns.min() + columns.max()) // 2
        assert runs[:middle].max() / runs[middle:].max() == pytest.approx(ratio, rel=0.07)


def test_save_scatter_draws_the_finite_pairs_and_the_diagonal(tmp_path, monkeypatch):
    drawn = drawn_axes(monkeypatch)
    x = np.linspace(-100, -50, 20)
    y = x + 1.0
    x[3], y[7] = np.nan, np.inf  # two pairs dropped
    keep = np.isfinite(x) & np.isfinite(y)
    path = plots.save_scatter(torch.tensor(x), y, tmp_path / "scatter.png", "AO-ARM-E", "MaM", "spearman 1.0, pearson 1.0")
    (ax,) = drawn[-1]
    (points,) = ax.collections
    assert np.array_equal(points.get_offsets(), np.stack([x[keep], y[keep]], 1))
    (diagonal,) = ax.lines  # dashed y = x from the smallest to the largest value of either axis
    low, high = min(x[keep].min(), y[keep].min()), max(x[keep].max(), y[keep].max())
    assert list(diagonal.get_xdata()) == [low, high] and list(diagonal.get_ydata()) == [low, high]
    assert diagonal.get_linestyle() == "--"
    (x_low, x_high), (y_low, y_high) = ax.get_xlim(), ax.get_ylim()
    assert x_low <= low and x_high >= high and y_low <= low and y_high >= high
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("AO-ARM-E", "MaM", "spearman 1.0, pearson 1.0")
    _open_png(path)
    with pytest.raises(ValueError, match="same number"):
        plots.save_scatter([1.0, 2.0], [1.0], tmp_path / "bad.png")


def test_save_scatter_png_puts_the_points_where_the_data_are(tmp_path):
    # Points rising along the diagonal vs falling along the anti-diagonal: in the PNG (rows counted downwards) the
    # marker pixels' column and row are anti-correlated for the first and correlated for the second. The markers are
    # the only blue pixels (C0 at alpha 0.7: blue minus red about 100; the y = x line and the text are black); measured
    # correlations -0.9998 and +0.998 over about 420 pixels.
    x = np.linspace(-100, -50, 20)
    for y, sign in ((x + 1.0, -1), (-x, 1)):
        image = np.asarray(_open_png(plots.save_scatter(x, y, tmp_path / "points.png")).convert("RGB")).astype(int)
        rows, columns = np.nonzero(image[..., 2] - image[..., 0] > 60)
        assert rows.size > 100 and sign * np.corrcoef(columns, rows)[0, 1] > 0.99


def test_training_curves(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [
        {"step": 0, "time": 1.0, "loss": 2.0, "phase": "train"},
        {"step": 10, "time": 2.0, "loss": 1.5, "val_bpd": 0.3, "flag": True},
        {"note": "no step here", "loss": 99.0},
        {"step": 20, "time": 3.0, "loss": 1.0},
    ] + [{"step": 30, **{f"extra{i}": float(i) for i in range(12)}}]
    metrics.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    series = plots.read_metrics_jsonl(metrics)
    # strings, booleans, "time" and the step-less line are ignored
    assert list(series)[:2] == ["loss", "val_bpd"] and "phase" not in series and "flag" not in series and "time" not in series
    assert series["loss"][0].tolist() == [0, 10, 20] and series["loss"][1].tolist() == [2.0, 1.5, 1.0]

    path = plots.save_training_curves(metrics, tmp_path / "curves.png")  # 14 keys -> first 9 plotted
    image = _open_png(path)
    three_by_three = image.size
    path_one = plots.save_training_curves(metrics, tmp_path / "one.png", keys=["loss"])
    assert _open_png(path_one).size[1] < three_by_three[1]  # one subplot row instead of three
    with pytest.raises(ValueError, match="available"):
        plots.save_training_curves(metrics, tmp_path / "x.png", keys=["missing"])
    with pytest.raises(ValueError, match="at most 9"):
        plots.save_training_curves(metrics, tmp_path / "x.png", keys=["loss", "val_bpd"] + [f"extra{i}" for i in range(8)])
    metrics.write_text('{"step": 1, "loss": 1}\nnot json\n')
    with pytest.raises(ValueError, match=":2 is not valid JSON"):
        plots.read_metrics_jsonl(metrics)


def test_enumerated_kl_is_exact():
    """KL(q || f/Z) over every state of D=3, K=3, against a direct sum; zero when q is f up to a constant."""
    import math

    from mamlib.evaluation import all_assignments, enumerated_kl

    states = all_assignments(3, 3)
    assert states.shape == (27, 3) and len({tuple(row) for row in states.tolist()}) == 27
    generator = torch.Generator().manual_seed(0)
    log_f, log_q = (torch.randn(27, generator=generator, dtype=torch.float64) for _ in range(2))
    p = (log_f - torch.logsumexp(log_f, 0)).double()
    q = (log_q - torch.logsumexp(log_q, 0)).double()
    direct = float((q.exp() * (q - p)).sum())
    result = enumerated_kl(log_q + 2.5, log_f)  # an unnormalised q: the offset is its log total mass
    assert result["kl"] == pytest.approx(direct, abs=1e-12) and result["log_mass"] == pytest.approx(2.5 + math.log(float(log_q.exp().sum())), abs=1e-9)
    assert enumerated_kl(log_f + 7.0, log_f)["kl"] == pytest.approx(0.0, abs=1e-12)
