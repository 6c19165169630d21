"""Saving figures for papers, and the training-curve figure of notebook 01.

Every figure is written as PNG (for notebooks and the README) and PDF (vector, for
a paper) under ``outputs/figures``. Analysis modules keep their own plotting
functions next to their statistics; they all save through :func:`save_figure`.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from cdlib import paths

PAPER_STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 300,
    "savefig.bbox": "tight",
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
plt.rcParams.update(PAPER_STYLE)

# One colour per model group, used by every figure so groups read the same everywhere.
GROUP_COLORS = {
    "baseline": "#1f77b4",
    "student": "#d62728",
    "teacher": "#2ca02c",
    "cd": "#9467bd",
}


def save_figure(fig, name: str, folder: Path | None = None) -> list[Path]:
    """Write ``fig`` as ``<name>.png`` and ``<name>.pdf``; return both paths."""
    folder = Path(folder) if folder is not None else paths.figures()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for ext in ("png", "pdf"):
        path = folder / f"{name}.{ext}"
        fig.savefig(path)
        written.append(path)
    return written


def plot_learning_curves(metrics, by: str = "arch", name: str | None = None):
    """Test top-1 and training loss per epoch; mean over seeds with a min-max band per ``by`` group.

    ``metrics`` is the long frame of ``tables.metrics_frame``.
    """
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(7, 2.6))
    for key, group in metrics.groupby(by, sort=False):
        per_epoch = group.groupby("epoch")
        for ax, column in ((ax_acc, "test_top1"), (ax_loss, "train_loss")):
            stats = per_epoch[column].agg(["mean", "min", "max"])
            line, = ax.plot(stats.index, stats["mean"], label=f"{key} (n={group['run_id'].nunique()})")
            ax.fill_between(stats.index, stats["min"], stats["max"], color=line.get_color(), alpha=0.2, lw=0)
    ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)")
    ax_loss.set(xlabel="epoch", ylabel="training loss")
    ax_acc.legend(frameon=False)
    fig.tight_layout()
    if name:
        save_figure(fig, name)
    return fig
