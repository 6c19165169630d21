"""Figures of Confusion Distillation (notebook 05): the EMA confusion targets over training.

:func:`plot_cd_ema` shows what a CD run distils from: its EMA confusion matrix Q~
(``distillation_results.replay_cd_ema``) as heatmaps at the end of each hard/soft
phase, and the off-diagonal mass of Q~ per epoch with the soft phases shaded.
Figure 3a/3b (baseline vs CD feature usage) use ``cdlib.experiments.interaction_figures``.
"""
from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.patches import Patch

from cdlib.core import confusion
from cdlib.experiments import distillation_results as results
from cdlib.experiments.distillation_results import offdiagonal_mass
from cdlib.experiments.figures import GROUP_COLORS, save_figure

SOFT_COLOR = "#f2e6c9"   # shading of soft phases


def phase_ends(schedule: Sequence[int]) -> list[int]:
    """1-based epochs at which each hard/soft segment of ``schedule`` ends."""
    return list(itertools.accumulate(int(s) for s in schedule))


def default_heatmap_epochs(schedule: Sequence[int], at_most: int = 5) -> list[int]:
    """The end of every phase (at most ``at_most`` of them, spread evenly, the last always kept)."""
    ends = phase_ends(schedule)
    if len(ends) <= at_most:
        return ends
    picks = np.unique(np.round(np.linspace(0, len(ends) - 1, at_most)).astype(int))
    return [ends[i] for i in picks]


def shade_phases(ax, schedule: Sequence[int], label: bool = True) -> None:
    """Shade the soft segments of ``schedule`` on an epoch axis (epoch e covers (e - 1, e])."""
    start = 0
    for i, length in enumerate(schedule):
        if i % 2 == 1:
            ax.axvspan(start, start + length, color=SOFT_COLOR, lw=0, zorder=0)
        start += length
    ax.set_xlim(0, start)


def _superclass_lines(ax, superclass_of, order) -> None:
    sorted_super = np.asarray(superclass_of)[order]
    for pos in np.flatnonzero(np.diff(sorted_super)) + 0.5:
        ax.axhline(pos, color="white", lw=0.3)
        ax.axvline(pos, color="white", lw=0.3)


def plot_cd_ema(
    ema: np.ndarray,
    schedule: Sequence[int],
    *,
    superclass_of=None,
    epochs: Sequence[int] | None = None,
    source_mass: np.ndarray | None = None,
    compare: Mapping[str, np.ndarray] | None = None,
    eps: float = 0.1,
    gamma: float = 0.5,
    title: str | None = None,
    name: str | None = None,
    folder=None,
):
    """The EMA confusion targets of one CD run.

    Top: Q~ after each epoch in ``epochs`` (1-based; default the end of every phase),
    classes ordered by super-class (white lines at super-class boundaries), the
    diagonal in grey and left out of the colour scale, one power-norm scale shared by
    all panels so they can be compared. Bottom: mean off-diagonal mass of Q~ per
    epoch (1 - mean diagonal), soft phases shaded; the label-smoothing start value
    eps (C - 1) / C dotted; ``source_mass`` (the per-epoch mass of the confusion Q(t)
    fed to the EMA) dashed; ``compare`` adds other runs' Q~ masses (label -> (E, C, C)
    or (E,)).
    """
    ema = np.asarray(ema, dtype=np.float64)
    E, C, _ = ema.shape
    if sum(schedule) != E:
        raise ValueError(f"schedule {list(schedule)} covers {sum(schedule)} epochs, ema has {E}")
    epochs = list(epochs) if epochs is not None else default_heatmap_epochs(schedule)
    if any(not 1 <= e <= E for e in epochs):
        raise ValueError(f"epochs must lie in 1..{E}, got {epochs}")
    order = confusion.superclass_order(superclass_of, C)
    ends = phase_ends(schedule)

    fig = plt.figure(figsize=(max(7.0, 1.5 * len(epochs) + 0.9), 4.4), layout="constrained")
    grid = fig.add_gridspec(2, len(epochs), height_ratios=[1.0, 0.95])
    mask = np.eye(C, dtype=bool)
    vmax = max(ema[e - 1][~mask].max() for e in epochs)
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.8")
    heat_axes = []
    for i, e in enumerate(epochs):
        ax = fig.add_subplot(grid[0, i])
        shown = np.ma.masked_array(ema[e - 1][np.ix_(order, order)], mask=mask)
        image = ax.imshow(shown, cmap=cmap, norm=PowerNorm(gamma, vmin=0, vmax=vmax), interpolation="nearest")
        if superclass_of is not None:
            _superclass_lines(ax, superclass_of, order)
        phase = "hard" if next(j for j, end in enumerate(ends) if e <= end) % 2 == 0 else "soft"
        ax.set_title(f"after epoch {e}\n({phase} phase)")
        ax.set_xticks([])
        ax.set_yticks([])
        heat_axes.append(ax)
    heat_axes[0].set_ylabel("true class")
    for ax in heat_axes:
        ax.set_xlabel("target class")
    fig.colorbar(image, ax=heat_axes, shrink=0.9, pad=0.02, label=r"$\tilde{Q}$ (off-diagonal entries)")

    ax = fig.add_subplot(grid[1, :])
    shade_phases(ax, schedule)
    x = np.arange(1, E + 1)
    ax.plot(x, offdiagonal_mass(ema), color=GROUP_COLORS["cd"], lw=1.6, marker="o" if E <= 40 else None,
            ms=3, label=r"$\tilde{Q}$ (EMA targets)", zorder=3)
    if source_mass is not None:
        ax.plot(x, np.asarray(source_mass), color="0.35", lw=1.0, ls="--", label=r"$Q(t)$ fed to the EMA", zorder=2)
    for i, (label, other) in enumerate((compare or {}).items()):
        other = np.asarray(other, dtype=np.float64)
        mass = offdiagonal_mass(other) if other.ndim == 3 else other
        ax.plot(np.arange(1, len(mass) + 1), mass, color=f"C{i + 1}", lw=1.2, label=label, zorder=2)
    ax.axhline(eps * (C - 1) / C, color="k", ls=":", lw=0.8, label=f"start: label smoothing (eps {eps:g})")
    for e in epochs:
        ax.axvline(e, color="0.6", lw=0.5, zorder=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("off-diagonal mass\n(mean over classes)")
    ax.set_ylim(bottom=0)
    handles, labels = ax.get_legend_handles_labels()
    handles.append(Patch(color=SOFT_COLOR, label="soft phase"))
    fig.legend(handles=handles, frameon=False, fontsize=7, loc="outside lower center", ncols=3)
    if title:
        fig.suptitle(title)
    if name:
        save_figure(fig, name, folder)
    return fig


def plot_run_ema(run, *, superclass_of=None, compare: Mapping[str, object] | None = None,
                 epochs: Sequence[int] | None = None, name: str | None = None, folder=None):
    """:func:`plot_cd_ema` for a finished CD run: Q~ replayed from its stored confusions
    (``replay_cd_ema``), the off-diagonal mass of the Q(t) it was fed, and ``compare``
    (label -> other CD runs) as extra mass curves."""
    ema = results.replay_cd_ema(run)
    frame = results.cd_ema_frame(run, ema)
    others = {label: results.replay_cd_ema(other) for label, other in (compare or {}).items()}
    args = run.config.objective_args
    title = (f"{run.config.run_id()}: source {args.get('source', 'train')}, "
             f"targets {args.get('targets', 'confusion')}")
    return plot_cd_ema(ema, args["schedule"], superclass_of=superclass_of, epochs=epochs,
                       source_mass=frame["off-diagonal mass of Q(t)"].to_numpy(), compare=others,
                       eps=args.get("eps", 0.1), title=title, name=name, folder=folder)


KD_GROUP_COLORS = {"teacher": GROUP_COLORS["teacher"], "KD student": GROUP_COLORS["student"],
                   "baseline": GROUP_COLORS["baseline"]}


def plot_kd_learning_curves(metrics, name: str | None = None, folder=None):
    """``figures.plot_learning_curves`` of ``distillation_results.kd_metrics`` (by ``group``), in the
    project's group colours (teacher green, student red, baseline blue), one legend below both panels."""
    from cdlib.experiments.figures import plot_learning_curves
    fig = plot_learning_curves(metrics, by="group")
    groups = list(dict.fromkeys(metrics["group"]))
    for ax in fig.axes:
        for group, line, band in zip(groups, ax.get_lines(), ax.collections):
            color = next((c for prefix, c in KD_GROUP_COLORS.items() if group.startswith(prefix)), None)
            if color:
                line.set_color(color)
                band.set_color(color)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.axes[0].get_legend().remove()
    fig.legend(handles, labels, frameon=False, loc="upper center", bbox_to_anchor=(0.5, 0.02), ncols=3)
    if name:
        save_figure(fig, name, folder)
    return fig
