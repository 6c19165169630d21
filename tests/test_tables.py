"""Written tables (pandas' to_markdown and Styler.to_latex): floats to 2 decimals, missing values empty,
text cells kept as they are, and the characters Markdown and LaTeX treat specially escaped."""
from __future__ import annotations

import numpy as np
import pandas as pd

from cdlib.experiments import tables

FRAME = pd.DataFrame({
    "method_name": ["CD-300", "a|b"],
    "top-1": [76.4, np.nan],      # written 76.40, not re-read as a number and printed 76.4
    "p": ["0.001", "n/a"],        # text that looks like a number stays as written
    "n": [3, 2],
    "note": [None, "50% & more"],
})


def test_markdown_cells():
    lines = tables.to_markdown(FRAME).splitlines()
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]
    assert rows[0] == ["method_name", "top-1", "p", "n", "note"]
    assert rows[2] == ["CD-300", "76.40", "0.001", "3", ""]
    assert rows[3] == [r"a\|b", "", "n/a", "2", "50% & more"]  # a bare pipe would split the cell
    assert len(lines) == 4 and set(lines[1]) <= set("|:- ")


def test_latex_cells_header_and_caption_are_escaped():
    tex = tables.to_latex(FRAME, caption="tiny 50% test_x")
    assert r"\caption{tiny 50\% test\_x}" in tex and r"\begin{tabular}{lllll}" in tex
    assert r"method\_name & top-1 & p & n & note \\" in tex
    assert r"CD-300 & 76.40 & 0.001 & 3 &  \\" in tex
    assert r"a|b &  & n/a & 2 & 50\% \& more \\" in tex
    assert "caption" not in tables.to_latex(FRAME)
