"""The run store: one folder per training run, named by its config. It trains nothing.

``outputs/runs/<name>-<hash of config>/`` holds:

    config.json      the run's config; its hash must be the folder name's (checked by every reader)
    metrics.jsonl    one line per finished epoch (a view of the checkpoint's history)
    checkpoint.pt    while training: everything a resume needs
    model.pt, test_logits.npy, confusions.npz (per-epoch confusion counts by split)
    summary.json     written last: its presence marks a finished run
    attempts.jsonl   one line per training start (host, pid, resumed or not)
    failed.json      after a failure: the error (cleared when the run is tried again)
    lock.json        while a worker trains it (``cdlib.scaleout.locks``)

This module alone knows those files: it writes them (each atomically, through
``util.atomic_write``: a kill leaves every file whole, old or new), reads them (a damaged file is
a ``StoreError`` naming it and what to do), and finds finished runs (``find_run``,
``split_finished``, ``load_teachers``). Training is ``cdlib.core.train.fit``'s; which runs train,
under which lock, is the scheduler's (``cdlib.scaleout.executors``).
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import socket
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch

from cdlib import paths
from cdlib.core.config import TrainConfig
from cdlib.core.models import build_model
from cdlib.core.util import atomic_save, atomic_write, atomic_write_text, read_json, read_store_file, resolve_device
from cdlib.errors import ConfigError, StoreError, UserError

CONFIG, METRICS, CHECKPOINT, SUMMARY = "config.json", "metrics.jsonl", "checkpoint.pt", "summary.json"
MODEL, TEST_LOGITS, CONFUSIONS = "model.pt", "test_logits.npy", "confusions.npz"
ATTEMPTS, FAILED = "attempts.jsonl", "failed.json"
CHECKPOINT_FORMAT = 2  # 2: the checkpoint carries the metrics history
CHECKPOINT_KEYS = ("config", "epoch", "history", "model", "optimizer", "objective", "train_confusions",
                   "test_confusions")
# What to do about a damaged file of a finished run: its other files are finished work, never deleted.
FINISHED_FILE_ADVICE = ("The run's other files are untouched. Restore the file from a backup, or move the run folder "
                        "away to train the run again.")
TRAIN_COMMAND = "python -m cdlib pipeline --profile P --train-only (or the notebook that trains it)"


class ConfigMismatchError(StoreError):
    pass


class CheckpointError(StoreError):
    """A checkpoint cannot be resumed: damaged, unsafe, another run's, another device's or version's."""


class RunNotFoundError(UserError, FileNotFoundError):
    pass


@dataclass
class Run:
    """A finished run in the store. A file that cannot be read raises a ``StoreError`` naming it."""
    dir: Path
    config: TrainConfig

    def _read(self, name: str, reader):
        return read_store_file(self.dir / name, reader, FINISHED_FILE_ADVICE)

    @cached_property
    def summary(self) -> dict:
        return read_summary(self.dir)

    @cached_property
    def metrics(self) -> pd.DataFrame:
        def read(path):
            frame = pd.read_json(path, lines=True)
            if list(frame.get("epoch", [])) != list(range(1, self.config.epochs + 1)):
                raise ValueError(f"it holds epochs {list(frame.get('epoch', []))[:5]}..., not 1..{self.config.epochs}")
            return frame
        return self._read(METRICS, read)

    def test_logits(self) -> np.ndarray:
        return self._read(TEST_LOGITS, np.load)

    def confusions(self, split: str = "test") -> np.ndarray:
        """(epochs, C, C) confusion counts after each epoch: ``test``, the ``train`` batches, and where the run
        has them ``validation`` and ``train_eval`` (the eval-mode pass over the training images)."""
        def read(path):
            with np.load(path) as z:
                return z[split]
        return self._read(CONFUSIONS, read)

    def load_model(self, device="cpu") -> torch.nn.Module:
        model = build_model(self.config.arch, self.summary["num_classes"], self.config.width)
        self._read(MODEL, lambda path: model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)))
        return model.to(device).eval()


# --------------------------------------------------------------------------- finding runs

def run_dir(config: TrainConfig, root: Path | None = None) -> Path:
    return Path(root or paths.runs()) / config.run_id()


def is_finished(folder: Path) -> bool:
    return (Path(folder) / SUMMARY).is_file()


def read_summary(folder: Path) -> dict:
    return read_json(Path(folder) / SUMMARY, FINISHED_FILE_ADVICE)


def epochs_done(folder: Path) -> int:
    """Epochs an unfinished run has recorded (lines of ``metrics.jsonl``; 0 without one)."""
    path = Path(folder) / METRICS
    return len(path.read_text(errors="replace").splitlines()) if path.is_file() else 0


def stored_config(folder: Path, expected: TrainConfig | None = None) -> TrainConfig | None:
    """The config in ``folder/config.json`` (None without one), refused unless its hash is the folder name's.

    A config edited by hand after training would otherwise pass for the run of another config: a KD
    teacher trained on every image would be taken for one that held its student's validation images
    out. ``expected``: the config the folder's name stands for, to name the fields that differ.
    """
    folder = Path(folder)
    path = folder / CONFIG
    if not path.is_file():
        return None
    stored = read_json(path, f"The folder's name fixes its config: if it is the run {folder.name} you meant, "
                             f"restore config.json from a backup; else move the folder away.")
    try:
        config = TrainConfig.from_dict(stored)
    except (ConfigError, TypeError) as err:
        raise StoreError(f"{path} of run {folder.name} is not a config this cdlib reads ({err}); it was written "
                         f"by another version of cdlib or altered. Use that version, or restore the file.") from err
    if config.run_id() != folder.name:
        diff = "" if expected is None else " (stored vs the folder's: {})".format(
            {k: (stored.get(k), v) for k, v in expected.to_dict().items() if stored.get(k) != v})
        raise ConfigMismatchError(
            f"{path} holds the config of run {config.run_id()}, not of the folder's run {folder.name}{diff}: it was "
            f"edited after the run was made, so the run's files cannot be trusted to belong to either config. "
            f"Nothing was changed. Restore config.json from a backup, or move the folder away and train the run "
            f"again (or point CDLIB_OUTPUTS elsewhere).")
    return config


def split_finished(configs: Iterable[TrainConfig], root: Path | None = None) -> tuple[list[Run], list[str]]:
    """The finished runs of ``configs``, in order, and the run ids of the others."""
    done, missing = [], []
    for config in configs:
        folder = run_dir(config, root)
        if is_finished(folder):
            stored_config(folder, config)  # refuses a config.json edited after training
            done.append(Run(folder, config))
        else:
            missing.append(config.run_id())
    return done, missing


def finished_runs(configs: Iterable[TrainConfig], root: Path | None = None) -> list[Run]:
    """The finished runs of ``configs``, in order; a missing one is an error naming how to train it."""
    done, missing = split_finished(configs, root)
    if missing:
        raise RunNotFoundError(f"{len(missing)} run(s) are not finished in {Path(root or paths.runs())}: "
                               f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Train them first: "
                               f"{TRAIN_COMMAND}.")
    return done


def find_run(run: str | Path, root: Path | None = None) -> Run:
    """A finished run by folder path or run id (``<name>-<hash>``)."""
    folder = Path(run)
    if not folder.is_dir():
        folder = Path(root or paths.runs()) / str(run)
    if not is_finished(folder):
        raise RunNotFoundError(f"no finished run at {folder}; train it first ({TRAIN_COMMAND}) or check the name.")
    config = stored_config(folder)
    if config is None:
        raise StoreError(f"{folder / CONFIG} of finished run {folder.name} is missing. {FINISHED_FILE_ADVICE}")
    return Run(folder, config)


def load_teachers(configs: Iterable[TrainConfig], device=None, root: Path | None = None) -> dict[str, torch.nn.Module]:
    """The KD teachers the configs name (``objective_args["teacher"]``: a run id or folder), loaded once
    each, after checking that each is a finished run of its students' data set and validation split."""
    students: dict[str, list[TrainConfig]] = {}
    for c in configs:
        if "teacher" in c.objective_args:
            students.setdefault(c.objective_args["teacher"], []).append(c)
    teachers = {}
    for name, of in sorted(students.items()):
        try:
            teacher = find_run(name, root)
        except RunNotFoundError as err:  # a damaged teacher folder's StoreError names it already
            raise RunNotFoundError(f"KD teacher {name} of {of[0].run_id()}: {err}") from err
        for student in of:
            if teacher.config.dataset != student.dataset:
                raise ConfigError(f"KD teacher {name} was trained on {teacher.config.dataset!r}, but its student "
                                  f"{student.run_id()} trains on {student.dataset!r}; name a teacher of that data set.")
            if teacher.config.validation != student.validation:
                # A teacher that trained on the student's validation images would carry them into its targets.
                raise ConfigError(f"KD teacher {name} held {teacher.config.validation} training images out for "
                                  f"validation, its student {student.run_id()} {student.validation}; a teacher must "
                                  f"hold out the same split, so that it never saw the student's validation images.")
        try:
            teachers[name] = teacher.load_model(resolve_device(device))
        except StoreError as err:
            raise StoreError(f"KD teacher {name} of {of[0].run_id()} cannot be loaded: {err} The student was not "
                             f"started.") from err
    return teachers


# --------------------------------------------------------------------------- writing a run

def checkpoint_path(folder: Path) -> Path:
    return Path(folder) / CHECKPOINT


def has_checkpoint(folder: Path) -> bool:
    return checkpoint_path(folder).is_file()


def save_checkpoint(folder: Path, state: dict) -> None:
    atomic_save(state, checkpoint_path(folder))


def load_checkpoint(path: Path, config: TrainConfig | None = None, device=None) -> dict:
    """The checkpoint at ``path``, loaded safely (tensors and plain values only) and checked before any
    use: complete, of a format this cdlib reads, ``config``'s, and when ``device`` is given, of that
    device type (generators, optimiser flags and memory layouts differ between devices)."""
    run = f"run {Path(path).parent.name}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refused an arbitrary Python object
        raise CheckpointError(
            f"cannot load checkpoint {path} of {run}: it holds Python objects other than tensors and plain values, and "
            f"loading it could run arbitrary code, so it was refused ({str(err).splitlines()[-1][:200]}). cdlib never "
            f"writes such files: delete it (the run restarts from scratch) unless you trust its source.") from err
    except Exception as err:  # truncated or corrupted archive
        raise CheckpointError(
            f"cannot load checkpoint {path} of {run}: {type(err).__name__}: {str(err)[:300]}. The file is truncated "
            f"or damaged (a copy that stopped, a full disk, another program): delete it to restart that run from "
            f"scratch (other runs are unaffected).") from err
    state = state if isinstance(state, dict) else {}
    if config is not None and state.get("config") != config.to_dict():
        raise CheckpointError(f"checkpoint {path} was written for another config ({state.get('config')}), not "
                              f"{config.to_dict()}. Move it away or delete it; it will not be resumed.")
    written_on = state.get("device_type", "cpu")
    if device is not None and written_on != torch.device(device).type:
        raise CheckpointError(
            f"checkpoint {path} was written on {written_on} and cannot resume exactly on {torch.device(device).type}: "
            f"random generators, optimiser flags and memory layouts differ between devices. Resume it on a "
            f"{written_on} device, or delete it to restart the run on this one.")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing or state.get("format", 1) != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} of {run} is not one this cdlib can resume (format {state.get('format', 1)}, this "
            f"cdlib writes {CHECKPOINT_FORMAT}; missing {missing}). Resume it with the cdlib that wrote it, or "
            f"delete it to restart the run.")
    return state


def write_config(folder: Path, config: TrainConfig) -> None:
    if not (Path(folder) / CONFIG).is_file():
        atomic_write_text(Path(folder) / CONFIG, json.dumps(config.to_dict(), indent=1))


def write_metrics(folder: Path, history: list[dict]) -> None:
    """``metrics.jsonl``: one line per finished epoch, rewritten whole so a kill never tears a line."""
    atomic_write_text(Path(folder) / METRICS, "".join(json.dumps(h) + "\n" for h in history))


def write_results(folder: Path, *, logits: torch.Tensor, confusions: dict, model_state: dict, summary: dict) -> None:
    """A run's final files; ``summary.json`` last, since it marks the run finished; then the checkpoint goes."""
    folder = Path(folder)
    atomic_write(folder / TEST_LOGITS, lambda f: np.save(f, logits.numpy()))
    atomic_write(folder / CONFUSIONS, lambda f: np.savez_compressed(
        f, **{split: counts.numpy() for split, counts in confusions.items()}))
    atomic_save(model_state, folder / MODEL)
    atomic_write_text(folder / SUMMARY, json.dumps(summary, indent=1))
    checkpoint_path(folder).unlink()


def remove_leftover_checkpoint(folder: Path) -> None:
    """A finished run's checkpoint is left by a kill between its summary and the checkpoint's removal."""
    with contextlib.suppress(OSError):  # tidying only: a read-only store still serves its runs
        checkpoint_path(folder).unlink(missing_ok=True)


# --------------------------------------------------------------------------- attempts and failures

def log_attempt(folder: Path, job: str = "") -> None:
    """Add a line to ``attempts.jsonl`` and clear the last failure, before a training start."""
    line = {"host": socket.gethostname(), "pid": os.getpid(), "job": job, "time": time.time(),
            "resumed": has_checkpoint(folder)}
    before = "".join(json.dumps(a) + "\n" for a in attempts(folder))
    atomic_write_text(Path(folder) / ATTEMPTS, before + json.dumps(line) + "\n")
    (Path(folder) / FAILED).unlink(missing_ok=True)


def attempts(folder: Path) -> list[dict]:
    """The training starts logged in ``folder`` (a log for people: lines that do not parse are skipped)."""
    path = Path(folder) / ATTEMPTS
    found = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        with contextlib.suppress(ValueError):
            found.append(json.loads(line))
    return found


def mark_failed(folder: Path, err: Exception) -> None:
    """Record why the run stopped, for ``python -m cdlib plan --status`` and other workers."""
    record = {"error": type(err).__name__, "message": str(err), "host": socket.gethostname(),
              "pid": os.getpid(), "time": time.time()}
    with contextlib.suppress(OSError):  # the store itself is the problem; the error still reaches the caller
        atomic_write_text(Path(folder) / FAILED, json.dumps(record, indent=1))


def failure(folder: Path) -> dict | None:
    """The recorded failure of an unfinished run, or None."""
    try:
        return json.loads((Path(folder) / FAILED).read_text())
    except (FileNotFoundError, ValueError):
        return None
