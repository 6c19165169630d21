"""Result tables: mean, spread and confidence over seeds, written as CSV, Markdown and LaTeX."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from scipy import stats

from cdlib import paths
from cdlib.core.runs import Run

ACCURACY_COLUMNS = ("final_top1", "best_top1", "final_top5", "best_top5")
# Summary numbers chosen by looking at test accuracy: tables show them, labelled; no verdict reads them.
# A run without a validation split also has its "selected_*" epoch chosen on test data.
TEST_SELECTED = ("best_top1", "best_top5", "best_epoch")


def mean_std_ci(values) -> tuple[float, float, float, int]:
    """Mean, sample std (ddof=1) and the half-width of the 95% t-interval; NaN spread for one value."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n < 2:
        return float(x.mean()) if n else float("nan"), float("nan"), float("nan"), n
    std = float(x.std(ddof=1))
    return float(x.mean()), std, float(stats.t.ppf(0.975, n - 1) * std / np.sqrt(n)), n


def format_mean_std(mean: float, std: float, digits: int = 2) -> str:
    if np.isnan(std):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def summarise(frame: pd.DataFrame, by: list[str], columns=ACCURACY_COLUMNS) -> pd.DataFrame:
    """One row per group of ``by``: n and, per column, mean, std, 95% CI half-width and 'mean ± std'."""
    rows = []
    for key, group in frame.groupby(by, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(by, key))
        row["n"] = len(group)
        for col in columns:
            mean, std, ci, _ = mean_std_ci(group[col])
            row.update({f"{col}_mean": mean, f"{col}_std": std, f"{col}_ci95": ci,
                        col: format_mean_std(mean, std)})
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table of ``frame`` (pandas' ``to_markdown``), cells as :func:`_text_cells` writes them."""
    escape = lambda text: text.replace("|", "\\|")  # noqa: E731 - a bare pipe would split a Markdown cell
    cells = _text_cells(frame).map(escape).rename(columns=escape)
    # The cells are text already: tabulate must not re-read "76.40" as a number and print 76.4.
    return cells.to_markdown(index=False, disable_numparse=True) + "\n"


def to_latex(frame: pd.DataFrame, caption: str | None = None) -> str:
    """A booktabs LaTeX table of ``frame`` (pandas' ``Styler.to_latex``), cells as :func:`_text_cells` writes them."""
    styler = _text_cells(frame).style.hide(axis="index")
    styler = styler.format(escape="latex").format_index(escape="latex", axis="columns")
    return styler.to_latex(caption=caption and caption.translate(_LATEX_SPECIALS), position="t",
                           position_float="centering", hrules=True, column_format="l" * len(frame.columns),
                           environment="table")


# Styler escapes the cells and the header, not the caption.
_LATEX_SPECIALS = str.maketrans({"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                                 "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                                 "^": r"\textasciicircum{}"})


def _text_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` as text, as every written table shows it: floats to 2 decimals, missing values empty."""
    def text(value) -> str:
        if pd.api.types.is_scalar(value) and pd.isna(value):
            return ""
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    return frame.astype(object).map(text).rename(columns=str)


def write_table(frame: pd.DataFrame, name: str, folder: Path | None = None,
                caption: str | None = None) -> dict[str, Path]:
    """Write ``<name>.csv`` (full precision), ``<name>.md`` and ``<name>.tex`` under ``outputs/tables``."""
    folder = Path(folder) if folder is not None else paths.tables()
    folder.mkdir(parents=True, exist_ok=True)
    written = {"csv": folder / f"{name}.csv", "md": folder / f"{name}.md", "tex": folder / f"{name}.tex"}
    frame.to_csv(written["csv"], index=False)
    written["md"].write_text(to_markdown(frame))
    written["tex"].write_text(to_latex(frame, caption))
    return written


def runs_frame(runs: Iterable[Run]) -> pd.DataFrame:
    """One row per run: its config fields and its summary, ready for ``summarise``."""
    rows = []
    for run in runs:
        row = run.config.to_dict()
        row["objective_args"] = json.dumps(row["objective_args"], sort_keys=True)
        row.update(run.summary)
        row["dir"] = str(run.dir)
        rows.append(row)
    return pd.DataFrame(rows)


def metrics_frame(runs: Iterable[Run]) -> pd.DataFrame:
    """Long table of per-epoch metrics of many runs (columns of ``metrics.jsonl`` plus run fields)."""
    frames = []
    for run in runs:
        m = run.metrics.copy()
        m["run_id"], m["name"], m["arch"], m["seed"] = run.config.run_id(), run.config.name, run.config.arch, run.config.seed
        frames.append(m)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
