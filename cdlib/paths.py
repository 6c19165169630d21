"""Where the repository, the data and the outputs live.

Everything that reads or writes files asks this module, so notebooks and scripts
work from any working directory. Two environment variables override defaults:
``CDLIB_DATA`` (folder holding the data sets) and ``CDLIB_OUTPUTS`` (folder for
runs, figures, tables and executed notebooks).
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"


def data_root() -> Path:
    """Folder that holds data sets (``$CDLIB_DATA`` or ``<repo>/data``)."""
    return Path(os.environ.get("CDLIB_DATA", REPO / "data")).expanduser()


def outputs() -> Path:
    """Folder for everything the pipeline writes (``$CDLIB_OUTPUTS`` or ``<repo>/outputs``)."""
    return Path(os.environ.get("CDLIB_OUTPUTS", REPO / "outputs")).expanduser()


def runs() -> Path:
    return outputs() / "runs"


def figures() -> Path:
    return outputs() / "figures"


def tables() -> Path:
    return outputs() / "tables"


def executed_notebooks() -> Path:
    return outputs() / "notebooks"
