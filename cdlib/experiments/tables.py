"""Result tables: mean, spread and confidence over seeds, written as CSV, Markdown and LaTeX."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from cdlib import paths

ACCURACY_COLUMNS = ("final_top1", "best_top1", "final_top5", "best_top5")


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
    cells = ([[_markdown_cell(c) for c in frame.columns]]
             + [[_markdown_cell(v) for v in row] for row in frame.itertuples(index=False)])
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("---" for _ in frame.columns) + "|")
    return "\n".join(lines) + "\n"


def to_latex(frame: pd.DataFrame, caption: str | None = None) -> str:
    escape = lambda s: (str(s).replace("\\", r"\textbackslash{}").replace("&", r"\&").replace("%", r"\%")  # noqa: E731
                        .replace("_", r"\_").replace("#", r"\#").replace("±", r"$\pm$"))
    lines = [r"\begin{table}[t]", r"\centering"]
    if caption:
        lines.append(rf"\caption{{{escape(caption)}}}")
    lines += [r"\begin{tabular}{" + "l" * len(frame.columns) + "}", r"\hline",
              " & ".join(escape(c) for c in frame.columns) + r" \\", r"\hline"]
    lines += [" & ".join(escape(_cell(v)) for v in row) + r" \\" for row in frame.itertuples(index=False)]
    lines += [r"\hline", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:.2f}"
    return str(value)


def _markdown_cell(value) -> str:
    return _cell(value).replace("|", "\\|")  # a bare pipe would split the Markdown cell


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
