"""Figures of the confusion analysis (``cdlib.core.confusion``).

Each function returns its figure and, when ``name`` is given, also saves it as
PNG and PDF through :func:`cdlib.experiments.figures.save_figure`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import PowerNorm

from cdlib.core import confusion
from cdlib.experiments import paper
from cdlib.experiments.figures import GROUP_COLORS, save_figure


def _color(name: str, i: int) -> str:
    """The project colour of a model group when ``name`` is one, else the default cycle."""
    return GROUP_COLORS.get(name.lower(), f"C{i % 10}")


def _finish(fig, name: str | None, folder):
    if name is not None:
        save_figure(fig, name, folder)
    return fig


def plot_confusion_heatmaps(
    matrices: Mapping[str, np.ndarray],
    superclass_of=None,
    superclass_names: Sequence[str] | None = None,
    gamma: float = 0.5,
    name: str | None = None,
    folder=None,
):
    """Side-by-side heatmaps (e.g. ``{"teacher M": M, "baseline Q": Q}``), classes
    ordered by super-class, with thin lines at super-class boundaries.

    The diagonal is one to two orders of magnitude larger than any confusion, so it
    is drawn grey and left out of the colour scale; a power norm (``gamma`` < 1)
    lifts the small off-diagonal values. Each panel has its own scale because M and
    Q put different total mass off the diagonal.
    """
    mats = {k: confusion.as_matrix(v) for k, v in matrices.items()}
    c = next(iter(mats.values())).shape[0]
    order = confusion.superclass_order(superclass_of, c)
    fig, axes = plt.subplots(1, len(mats), figsize=(3.4 * len(mats) + 0.8, 3.6), squeeze=False,
                             layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.85")
    for ax, (title, a) in zip(axes[0], mats.items()):
        a = a[np.ix_(order, order)]
        shown = np.ma.masked_array(a, mask=np.eye(c, dtype=bool))
        im = ax.imshow(shown, cmap=cmap, norm=PowerNorm(gamma, vmin=0, vmax=shown.max()),
                       interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        ax.set_title(title)
        ax.set_xlabel("predicted class")
        if superclass_of is not None:
            _superclass_grid(ax, np.asarray(superclass_of)[order], superclass_names)
    # Panels share the class order, so only the first one labels the rows.
    axes[0, 0].set_ylabel("true class")
    for ax in axes[0, 1:]:
        ax.tick_params(labelleft=False)
    return _finish(fig, name, folder)


def _superclass_grid(ax, sorted_superclass: np.ndarray, names: Sequence[str] | None) -> None:
    """Boundary lines between super-classes and one tick per super-class."""
    change = np.flatnonzero(np.diff(sorted_superclass)) + 1
    for pos in change - 0.5:
        ax.axhline(pos, color="white", lw=0.4)
        ax.axvline(pos, color="white", lw=0.4)
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [len(sorted_superclass)]])
    mids = (starts + ends - 1) / 2
    labels = [names[s] if names is not None else str(s) for s in sorted_superclass[starts]]
    ax.set_xticks(mids, labels, rotation=90, fontsize=5)
    ax.set_yticks(mids, labels, fontsize=5)
    ax.tick_params(length=0)


def plot_similarity_over_epochs(
    runs: Mapping[str, pd.DataFrame],
    measures: Sequence[str] = ("pearson", "cosine", "soft_jaccard"),
    name: str | None = None,
    folder=None,
):
    """One panel per measure, one curve per run (tables of
    ``confusion.similarity_over_epochs``), the paper's value as a dashed line."""
    fig, axes = plt.subplots(1, len(measures), figsize=(3.0 * len(measures), 2.6), squeeze=False)
    for ax, measure in zip(axes[0], measures):
        for i, (run, table) in enumerate(runs.items()):
            ax.plot(table.index, table[measure], color=_color(run, i), lw=1.2, label=run)
        if measure in paper.CONFUSION_SIMILARITY:
            ax.axhline(paper.CONFUSION_SIMILARITY[measure], color="k", ls="--", lw=0.8, label="paper")
        ax.set_title(measure.replace("_", " "))
        ax.set_xlabel("epoch")
    axes[0, 0].set_ylabel("similarity to teacher M")
    axes[0, -1].legend(frameon=False)
    fig.tight_layout()
    return _finish(fig, name, folder)


def plot_spectra(
    matrices: Mapping[str, np.ndarray],
    top: int | None = None,
    floor: float | None = 1e-4,
    styles: Mapping[str, dict] | None = None,
    name: str | None = None,
    folder=None,
):
    """Normalised singular values of each matrix's off-diagonal part against rank
    (log scale), with the effective rank in the legend. ``top`` limits the ranks shown;
    ``floor`` cuts the axis at that fraction of the largest value, so that numerically
    zero singular values (a matrix of rank < C) do not squash the rest; ``styles`` maps
    a label to extra line properties (colour, linestyle)."""
    fig, ax = plt.subplots(figsize=(3.6, 2.8))
    largest = 0.0
    for i, (label, a) in enumerate(matrices.items()):
        s = confusion.offdiag_spectrum(a)[:top]
        largest = max(largest, float(s.max()) if s.size else 0.0)
        style = {"color": _color(label, i), "lw": 1.2, **(styles or {}).get(label, {})}
        ax.semilogy(np.arange(1, len(s) + 1), s, label=f"{label} (eff. rank {confusion.effective_rank(a):.1f})",
                    **style)
    if floor is not None and largest > 0:
        ax.set_ylim(bottom=floor * largest, top=2 * largest)
    ax.set_xlabel("rank")
    ax.set_ylabel("singular value / sum")
    ax.legend(frameon=False)
    return _finish(fig, name, folder)


_GROUP_NAMES = {"cd": "CD"}
_LABELS = {"pearson": "Pearson", "cosine": "cosine", "soft_jaccard": "soft Jaccard",
           "spearman": "Spearman", "spectral_overlap": "spectral overlap"}


def plot_shuffled_control(
    null: pd.DataFrame,
    observed: Mapping[str, float],
    ceiling: Mapping[str, float] | None = None,
    measures: Sequence[str] = ("pearson", "cosine", "soft_jaccard", "spearman"),
    name: str | None = None,
    folder=None,
):
    """One panel per measure: the histogram of the shuffled-Q null distribution (``null``, a
    column per measure, e.g. ``confusion.shuffled_values``), the observed value (solid), the
    teacher-vs-teacher ceiling (dotted) and the paper's value (dashed) where there is one."""
    fig, axes = plt.subplots(1, len(measures), figsize=(2.1 * len(measures) + 0.4, 2.3), squeeze=False,
                             layout="constrained")
    for ax, measure in zip(axes[0], measures):
        ax.hist(null[measure], bins=20, color="0.6", label="shuffled Q")
        ax.axvline(observed[measure], color=GROUP_COLORS["baseline"], lw=1.5, label="baseline Q")
        if ceiling is not None and measure in ceiling:
            ax.axvline(ceiling[measure], color=GROUP_COLORS["teacher"], lw=1.2, ls=":", label="teacher' M")
        if measure in paper.CONFUSION_SIMILARITY:
            ax.axvline(paper.CONFUSION_SIMILARITY[measure], color="k", lw=0.8, ls="--", label="paper")
        ax.set_title(_LABELS.get(measure, measure))
        ax.set_xlabel("similarity to teacher M")
        ax.set_yticks([])
        ax.spines["left"].set_visible(False)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if "paper" not in labels:  # take the paper's line from a panel that has one
        for ax in axes[0]:
            h, lab = ax.get_legend_handles_labels()
            if "paper" in lab:
                handles, labels = h, lab
                break
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    return _finish(fig, name, folder)


def plot_similarity_curves(
    epochs: pd.DataFrame,
    measures: Sequence[str] = ("pearson", "cosine", "soft_jaccard"),
    control: Mapping[str, tuple[float, float]] | None = None,
    name: str | None = None,
    folder=None,
):
    """Measures over training epochs, one colour per model group: the mean over the group's
    runs with a min-max band (``epochs`` is the long frame of ``dark_knowledge.analyse``:
    columns group, run_id, epoch and the measures), the paper's value dashed and, if
    given, the shuffled control of the final matrices as a grey mean ± 2 std band."""
    groups = list(dict.fromkeys(epochs["group"]))
    fig, axes = plt.subplots(1, len(measures), figsize=(2.6 * len(measures) + 0.4, 2.5), squeeze=False,
                             layout="constrained")
    for ax, measure in zip(axes[0], measures):
        if control is not None and measure in control:
            mean, std = control[measure]
            ax.axhspan(mean - 2 * std, mean + 2 * std, color="0.85", lw=0, label="shuffled Q (±2 std)")
        for i, group in enumerate(groups):
            frame = epochs[epochs["group"] == group]
            stats = frame.groupby("epoch")[measure].agg(["mean", "min", "max"])
            n = frame["run_id"].nunique()
            color = _color(group, i)
            ax.plot(stats.index, stats["mean"], color=color, lw=1.3, label=f"{_GROUP_NAMES.get(group, group)} (n={n})")
            if n > 1:
                ax.fill_between(stats.index, stats["min"], stats["max"], color=color, alpha=0.2, lw=0)
        if measure in paper.CONFUSION_SIMILARITY:
            ax.axhline(paper.CONFUSION_SIMILARITY[measure], color="k", ls="--", lw=0.8, label="paper")
        ax.set_title(_LABELS.get(measure, measure))
        ax.set_xlabel("epoch")
    axes[0, 0].set_ylabel("similarity to teacher M")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    return _finish(fig, name, folder)
