"""Figures of the Interaction Tensor analysis (the paper's Figures 1-3).

- Figure 1a / 3a: :func:`plot_feature_frequency` (sorted F_t per group);
- Figure 1b: the same with ``common_only=True`` (features every group uses);
- Figure 2a-c: :func:`plot_confidence_kde` (density of confidence vs num_features);
- Figure 2d / 3b: :func:`plot_features_per_image` (sorted features-per-image curves).

Every function takes plain per-group arrays keyed by group name (in legend order),
so any grouping can be plotted: ``{s.name: s.frequency for s in stats}`` for a list
of :class:`cdlib.core.feature_statistics.GroupStatistics`. Each returns the figure and, given a
``name``, also saves it through :func:`cdlib.experiments.figures.save_figure`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LinearSegmentedColormap
from scipy.ndimage import gaussian_filter

from cdlib.experiments.figures import GROUP_COLORS, save_figure

SINGLE_PANEL = (3.4, 2.5)  # inches: one column of a two-column paper


def group_color(name: str, position: int) -> str:
    """The project's colour for a known group, else the default cycle's colour."""
    return GROUP_COLORS.get(name, f"C{position}")


def _finish(fig, name: str | None, folder: Path | None):
    if name is not None:
        save_figure(fig, name, folder)
    return fig


def _axes(ax):
    if ax is None:
        return plt.subplots(figsize=SINGLE_PANEL)
    return ax.figure, ax


def plot_feature_frequency(
    frequency_by_group: Mapping[str, np.ndarray],
    *,
    common_only: bool = False,
    ax=None,
    name: str | None = None,
    folder: Path | None = None,
):
    """Figure 1a/3a (1b with ``common_only``): each group's F_t > 0, sorted ascending.

    ``frequency_by_group``: group name -> (T,) frequencies over the same T features.
    With ``common_only`` only features every group uses are plotted, so all curves
    have the same length.
    """
    fig, ax = _axes(ax)
    frequencies = {g: np.asarray(f) for g, f in frequency_by_group.items()}
    keep = np.logical_and.reduce([f > 0 for f in frequencies.values()]) if common_only else None
    for position, (group, frequency) in enumerate(frequencies.items()):
        used = np.sort(frequency[keep] if common_only else frequency[frequency > 0])
        label = f"{group} ({used.size} features, mean {used.mean():.0f})" if used.size else f"{group} (none)"
        ax.plot(np.arange(1, used.size + 1), used, color=group_color(group, position), lw=1.5, label=label)
    ax.set_xlabel("Feature (sorted)")
    ax.set_ylabel("occurrences")
    ax.set_title("Features used by all groups" if common_only else "Feature frequency")
    ax.legend(frameon=False, loc="upper left")
    return _finish(fig, name, folder)


def plot_features_per_image(
    features_per_image_by_group: Mapping[str, np.ndarray],
    *,
    ax=None,
    name: str | None = None,
    folder: Path | None = None,
):
    """Figure 2d/3b: each group's features-per-image counts, images sorted ascending."""
    fig, ax = _axes(ax)
    for position, (group, counts) in enumerate(features_per_image_by_group.items()):
        counts = np.sort(np.asarray(counts))
        ax.plot(np.arange(1, counts.size + 1), counts, color=group_color(group, position), lw=1.5,
                label=f"{group} (mean {counts.mean():.1f})")
    ax.set_xlabel("Image (sorted)")
    ax.set_ylabel("Features per image")
    ax.set_title("Features per image")
    ax.legend(frameon=False, loc="upper left")
    return _finish(fig, name, folder)


def plot_confidence_kde(
    points_by_group: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    bins: int = 150,
    name: str | None = None,
    folder: Path | None = None,
):
    """Figure 2a-c: one panel per group, density of (confidence, num_features) over images.

    ``points_by_group``: group name -> (confidence (N,), num_features (N,)). Panels
    share both axes so groups compare directly. The density is a Gaussian kernel
    estimate with Scott's bandwidth computed on a fine 2-D histogram (binning first
    keeps 10,000 points fast and, unlike ``scipy.stats.gaussian_kde``, never fails on
    constant or collinear data: a degenerate direction gets a one-bin kernel).
    """
    if not points_by_group:
        raise ValueError("nothing to plot")
    points = {g: (np.asarray(x, float), np.asarray(y, float)) for g, (x, y) in points_by_group.items()}
    if any(x.size == 0 or x.shape != y.shape for x, y in points.values()):
        raise ValueError("each group needs equally many confidence and num_features values, at least one")
    x_edges = _edges(np.concatenate([x for x, _ in points.values()]), bins, low=0.0, high=1.0)
    y_edges = _edges(np.concatenate([y for _, y in points.values()]), bins)
    x_centres = (x_edges[:-1] + x_edges[1:]) / 2
    y_centres = (y_edges[:-1] + y_edges[1:]) / 2

    fig, axes = plt.subplots(1, len(points), figsize=(2.6 * len(points), 2.5), sharex=True, sharey=True,
                             squeeze=False)
    for position, (ax, (group, (x, y))) in enumerate(zip(axes[0], points.items())):
        density = _smoothed_density(x, y, x_edges, y_edges)
        color = group_color(group, position)
        cmap = LinearSegmentedColormap.from_list(group, ["white", color])
        # Start the fill at 5% of the peak so that empty space stays white.
        levels = np.linspace(0.05, 1.0, 9) * density.max()
        ax.contourf(x_centres, y_centres, density.T, levels=levels, cmap=cmap, extend="max")
        ax.contour(x_centres, y_centres, density.T, levels=levels[::2], colors=color, linewidths=0.4)
        ax.set_title(f"{group}: mean num_features {y.mean():.0f}")
        ax.set_xlabel("Confidence (true-class probability)")
    axes[0, 0].set_ylabel("num_features")
    axes[0, 0].set_xlim(x_edges[0], x_edges[-1])
    axes[0, 0].set_ylim(y_edges[0], y_edges[-1])
    fig.tight_layout()
    return _finish(fig, name, folder)


def _edges(values: np.ndarray, bins: int, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Bin edges covering ``values`` (and [low, high] when given), widened if they are all equal."""
    lo = values.min() if low is None else min(low, values.min())
    hi = values.max() if high is None else max(high, values.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    margin = 0.05 * (hi - lo) if low is None else 0.0
    return np.linspace(lo - margin, hi + margin, bins + 1)


def _smoothed_density(x: np.ndarray, y: np.ndarray, x_edges: np.ndarray, y_edges: np.ndarray) -> np.ndarray:
    counts, _, _ = np.histogram2d(x, y, bins=(x_edges, y_edges))
    # Scott's rule for a 2-D Gaussian KDE: per-axis std * n^(-1/6), here in bins.
    factor = len(x) ** (-1 / 6)
    sigma = [max(np.std(v) * factor / (edges[1] - edges[0]), 1.0) for v, edges in ((x, x_edges), (y, y_edges))]
    return gaussian_filter(counts, sigma, mode="constant") / len(x)
