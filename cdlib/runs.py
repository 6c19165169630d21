"""The run store: one folder per training run, named by its config.

``outputs/runs/<name>-<hash of config>/`` holds ``config.json``, ``metrics.jsonl``
(one line per epoch), ``checkpoint.pt`` while training, and when finished
``model.pt``, ``test_logits.npy``, ``confusions.npz`` (per-epoch train and test
confusion counts) and ``summary.json`` (written last: its presence marks a
finished run). ``get_or_train`` makes every notebook idempotent: finished runs are
loaded, unfinished ones resumed, and a folder whose stored config differs from
the requested one is refused rather than overwritten.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch

from . import paths
from .config import TrainConfig
from .train import atomic_write_text, fit


class ConfigMismatchError(RuntimeError):
    pass


@dataclass
class Run:
    """A finished run in the store."""
    dir: Path
    config: TrainConfig

    @cached_property
    def summary(self) -> dict:
        return json.loads((self.dir / "summary.json").read_text())

    @cached_property
    def metrics(self) -> pd.DataFrame:
        return pd.read_json(self.dir / "metrics.jsonl", lines=True)

    def test_logits(self) -> np.ndarray:
        return np.load(self.dir / "test_logits.npy")

    def confusions(self, split: str = "test") -> np.ndarray:
        """(epochs, C, C) confusion counts after each epoch, on ``test`` or the ``train`` batches."""
        with np.load(self.dir / "confusions.npz") as z:
            return z[split]

    def load_model(self, device="cpu") -> torch.nn.Module:
        from .models import build_model
        model = build_model(self.config.arch, self.summary["num_classes"], self.config.width)
        model.load_state_dict(torch.load(self.dir / "model.pt", map_location="cpu", weights_only=True))
        return model.to(device).eval()


def run_dir(config: TrainConfig, root: Path | None = None) -> Path:
    return Path(root or paths.runs()) / config.run_id()


def is_finished(folder: Path) -> bool:
    return (Path(folder) / "summary.json").is_file()


def _check_stored_config(folder: Path, config: TrainConfig) -> None:
    stored_path = folder / "config.json"
    if not stored_path.is_file():
        return
    stored = json.loads(stored_path.read_text())
    if stored != config.to_dict():
        diff = {k: (stored.get(k), v) for k, v in config.to_dict().items() if stored.get(k) != v}
        raise ConfigMismatchError(
            f"run folder {folder} holds a different config (stored vs requested: {diff}). Nothing was "
            f"changed. Move or delete that folder if it is stale, or point CDLIB_OUTPUTS elsewhere.")


def get_or_train(config: TrainConfig, device=None, data_root=None, progress: bool = True,
                 root: Path | None = None, data=None) -> Run:
    """Return the finished run of ``config``; train it (or resume it) first if needed."""
    folder = run_dir(config, root)
    _check_stored_config(folder, config)
    if not is_finished(folder):
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "config.json").is_file():
            atomic_write_text(folder / "config.json", json.dumps(config.to_dict(), indent=1))
        fit(config, folder, device=device, data_root=data_root, progress=progress, data=data)
    return Run(folder, config)


def find_run(run: str | Path, root: Path | None = None) -> Run:
    """A finished run by folder path or run id (``<name>-<hash>``)."""
    folder = Path(run)
    if not folder.is_dir():
        folder = Path(root or paths.runs()) / str(run)
    if not is_finished(folder):
        raise FileNotFoundError(f"no finished run at {folder}; train it first (get_or_train) or check the name.")
    config = TrainConfig.from_dict(json.loads((folder / "config.json").read_text()))
    return Run(folder, config)


def load_model(run: str | Path, device="cpu") -> torch.nn.Module:
    """The trained network of a finished run, in eval mode (used for KD teachers)."""
    return find_run(run).load_model(device)


def runs_frame(runs: Iterable[Run]) -> pd.DataFrame:
    """One row per run: its config fields and its summary, ready for ``tables.summarise``."""
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
