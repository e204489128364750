"""Figures for reports: image grids, histograms with KDEs, scatter plots, training curves.

Every function writes one PNG to ``path`` (parent folders are created), closes its figure and
returns ``path`` as a :class:`pathlib.Path`. Inputs may be numpy arrays, torch tensors or lists.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .files import atomic_write

# Colours of the image grid, RGB in [0, 1].
MISSING_RGB = (0.65, 0.4, 0.4)  # a missing pixel (-1): mid-grey (mean 0.48) tinted red
PAD_RGB = (0.2, 0.3, 0.6)  # the border between tiles: blue, so it is never mistaken for a pixel value
MAX_CURVE_KEYS = 9
IGNORED_CURVE_KEYS = ("step", "time")  # "time" is the wall-clock stamp RunLogger adds to every line


def _pyplot():
    """matplotlib.pyplot on the headless backend, imported on first use: it costs every run 50+ MiB otherwise."""
    import matplotlib

    matplotlib.use("Agg")  # no display on the training machines
    import matplotlib.pyplot as plt

    return plt


def _as_numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _prepare_path(path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _save_figure(fig, path: Path) -> Path:
    try:
        atomic_write(path, lambda handle: fig.savefig(handle, format=path.suffix.lstrip(".") or "png", dpi=100,
                                                      bbox_inches="tight"))
    finally:
        _pyplot().close(fig)
    return path


def save_image_grid(images, path, nrow: int | None = None, scale: int = 4, pad: int = 1) -> Path:
    """Tile (N, H, W) images (or (N, 1, H, W)) with values in [0, 1] into one RGB PNG.

    ``nrow`` is the number of images per grid row (as in torchvision), default ceil(sqrt(N)).
    Each pixel becomes a ``scale`` x ``scale`` block (nearest upscaling); ``pad`` output pixels of
    PAD_RGB separate the tiles and frame the grid, so the PNG is
    ``nrow*W*scale + (nrow+1)*pad`` wide and ``rows*H*scale + (rows+1)*pad`` high.
    The value -1 marks a missing pixel and is drawn as MISSING_RGB (red-tinted mid-grey).
    """
    array = _as_numpy(images).astype(np.float64)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 3 or array.shape[0] == 0:
        raise ValueError(f"images must have shape (N, H, W) or (N, 1, H, W) with N >= 1, got {array.shape}")
    if scale < 1 or pad < 0:
        raise ValueError(f"need scale >= 1 and pad >= 0, got scale={scale}, pad={pad}")
    missing = array == -1
    present = array[~missing]
    if not np.all(np.isfinite(present)) or present.min(initial=0.0) < 0.0 or present.max(initial=0.0) > 1.0:
        raise ValueError("image values must lie in [0, 1] (or be -1 for missing); rescale the images first")
    count, height, width = array.shape
    per_row = nrow if nrow is not None else math.ceil(math.sqrt(count))
    if per_row < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    grid_rows = math.ceil(count / per_row)

    rgb = np.repeat(array[..., None], 3, axis=-1)
    rgb[missing] = MISSING_RGB
    rgb = rgb.repeat(scale, axis=1).repeat(scale, axis=2)
    tile_h, tile_w = height * scale, width * scale
    canvas = np.empty((grid_rows * tile_h + (grid_rows + 1) * pad, per_row * tile_w + (per_row + 1) * pad, 3))
    canvas[:] = PAD_RGB
    for index in range(count):
        row, col = divmod(index, per_row)
        top, left = pad + row * (tile_h + pad), pad + col * (tile_w + pad)
        canvas[top:top + tile_h, left:left + tile_w] = rgb[index]
    path = _prepare_path(path)
    from PIL import Image

    image = Image.fromarray(np.round(canvas * 255).astype(np.uint8))
    atomic_write(path, lambda handle: image.save(handle, format="PNG"))
    return path


def save_regenerated_panel(variants, observed, annotations, image_shape, path) -> Path:
    """Figure-4 panel: per variant, the censored input (missing pixels tinted) above its regeneration.

    ``annotations`` holds (masked count, MaM log-likelihood, AO-ARM-E log-likelihood) per variant.
    """
    variants, observed = _as_numpy(variants).astype(np.float64), _as_numpy(observed).astype(bool)
    count = len(variants)
    fig, axes = _pyplot().subplots(2, count, figsize=(1.9 * count, 4.2), squeeze=False)
    for column, (image, mask, (steps, mam, reference)) in enumerate(zip(variants, observed, annotations)):
        censored = np.where(mask, image, np.nan).reshape(image_shape)
        axes[0, column].imshow(np.ma.masked_invalid(censored), cmap="gray", vmin=0, vmax=1)
        axes[0, column].set_facecolor(MISSING_RGB)
        axes[0, column].set_title(f"{steps} masked", fontsize=8)
        axes[1, column].imshow(image.reshape(image_shape), cmap="gray", vmin=0, vmax=1)
        axes[1, column].set_title(f"MaM {mam:.1f}\nAO-ARM-E {reference:.1f}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return _save_figure(fig, _prepare_path(path))


def _finite_1d(values) -> np.ndarray:
    array = _as_numpy(values).astype(np.float64).reshape(-1)
    return array[np.isfinite(array)]


def save_histograms(named_values: dict, path, title: str = "", xlabel: str = "") -> Path:
    """Overlaid density histograms (shared bins) plus a Gaussian KDE line per series.

    Non-finite values are dropped; the legend shows how many values each series kept. The KDE is
    skipped for a series with fewer than 2 values or zero variance (gaussian_kde is singular there).
    """
    if not named_values:
        raise ValueError("named_values is empty; pass a dict like {'model': samples, 'ground truth': samples}")
    series = {name: _finite_1d(values) for name, values in named_values.items()}
    pooled = np.concatenate(list(series.values()))
    if pooled.size and pooled.min() < pooled.max():
        edges = np.histogram_bin_edges(pooled, bins=40)
    else:  # all values equal (or none): one bin of width 1 around them
        centre = pooled[0] if pooled.size else 0.0
        edges = np.array([centre - 0.5, centre + 0.5])
    grid = np.linspace(edges[0], edges[-1], 400)
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    for index, (name, values) in enumerate(series.items()):
        colour = f"C{index % 10}"
        ax.hist(values, bins=edges, density=True, alpha=0.35, color=colour, label=f"{name} (n={values.size})")
        if values.size >= 2 and np.ptp(values) > 0:
            try:
                from scipy.stats import gaussian_kde

                ax.plot(grid, gaussian_kde(values)(grid), color=colour, linewidth=1.5)
            except np.linalg.LinAlgError:  # near-singular data despite ptp > 0
                pass
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return _save_figure(fig, _prepare_path(path))


def save_scatter(x, y, path, xlabel: str = "", ylabel: str = "", title: str = "") -> Path:
    """Scatter of y against x with the dashed y = x line; pairs with a non-finite value are dropped."""
    x_values = _as_numpy(x).astype(np.float64).reshape(-1)
    y_values = _as_numpy(y).astype(np.float64).reshape(-1)
    if x_values.shape != y_values.shape:
        raise ValueError(f"x and y must have the same number of values, got {x_values.size} and {y_values.size}")
    keep = np.isfinite(x_values) & np.isfinite(y_values)
    x_values, y_values = x_values[keep], y_values[keep]
    fig, ax = _pyplot().subplots(figsize=(5, 5))
    ax.scatter(x_values, y_values, s=10, alpha=0.7)
    if x_values.size:
        low = min(x_values.min(), y_values.min())
        high = max(x_values.max(), y_values.max())
        ax.plot([low, high], [low, high], "k--", linewidth=1, label="y = x")
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    return _save_figure(fig, _prepare_path(path))


def save_bars(named_values: dict, path, ylabel: str = "", title: str = "", log_scale: bool = False) -> Path:
    """One bar per name, its value printed above it."""
    names, values = list(named_values), [float(v) for v in named_values.values()]
    fig, ax = _pyplot().subplots(figsize=(1.6 * max(len(names), 2) + 1, 4))
    bars = ax.bar(names, values, color="tab:blue")
    for bar, value in zip(bars, values):
        ax.annotate(f"{value:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    if log_scale and all(v > 0 for v in values):
        ax.set_yscale("log")
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    return _save_figure(fig, _prepare_path(path))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics_jsonl(metrics_jsonl_path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Numeric series of a metrics.jsonl: {key: (steps, values)} in first-seen key order.

    Lines without a numeric "step", blank lines and non-numeric fields are skipped; "step" and
    "time" are not series.
    """
    series: dict[str, tuple[list, list]] = {}
    with open(metrics_jsonl_path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                if not line.endswith("\n"):  # a last line cut short by a kill: the records before it stand
                    continue
                raise ValueError(f"{metrics_jsonl_path}:{line_number} is not valid JSON ({error}); fix or delete that line") from None
            if not isinstance(record, dict) or not _is_number(record.get("step")):
                continue
            for key, value in record.items():
                if key in IGNORED_CURVE_KEYS or not _is_number(value):
                    continue
                steps, values = series.setdefault(key, ([], []))
                steps.append(record["step"])
                values.append(float(value))
    return {key: (np.asarray(steps), np.asarray(values)) for key, (steps, values) in series.items()}


def save_training_curves(metrics_jsonl_path, path, keys: list[str] | None = None) -> Path:
    """One subplot per numeric metric against step (at most 9; default: the first 9 keys seen)."""
    series = read_metrics_jsonl(metrics_jsonl_path)
    if keys is None:
        keys = list(series)[:MAX_CURVE_KEYS]
    else:
        keys = list(keys)
        unknown = [key for key in keys if key not in series]
        if unknown:
            raise ValueError(f"keys {unknown} have no numeric values in {metrics_jsonl_path}; available: {sorted(series)}")
        if len(keys) > MAX_CURVE_KEYS:
            raise ValueError(f"at most {MAX_CURVE_KEYS} keys per figure, got {len(keys)}; split them over several calls")
    if not keys:
        raise ValueError(f"{metrics_jsonl_path} has no numeric metrics with a step; nothing to plot")
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig, axes = _pyplot().subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        steps, values = series[key]
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return _save_figure(fig, _prepare_path(path))
