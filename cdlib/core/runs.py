"""The run store: one folder per training run, named by its config.

``outputs/runs/<name>-<hash of config>/`` holds ``config.json``, ``metrics.jsonl``
(one line per epoch), ``checkpoint.pt`` while training, and when finished
``model.pt``, ``test_logits.npy``, ``confusions.npz`` (per-epoch train and test
confusion counts) and ``summary.json`` (written last: its presence marks a
finished run). ``get_or_train`` makes every notebook idempotent: finished runs are
loaded, unfinished ones resumed, and a folder whose stored config differs from
the requested one is refused rather than overwritten.

Many workers may share one store (several GPUs, Slurm nodes on a network file
system): a worker trains a run only while it holds the folder's ``lock.json``
(``cdlib.core.locks``). While training, the folder also holds ``attempts.jsonl`` (one
line per training start: host, pid, resumed or not) and, after a failure,
``failed.json`` (the error; cleared when the run is tried again).

Training itself is ``cdlib.core.engine``'s; this layer decides which runs train
(``get_or_train``, ``get_or_train_many``: the only functions that train missing runs),
loads KD teachers from the store (``load_teachers``), and finds finished runs
(``find_run``).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from cdlib import paths
from cdlib.core import engine, locks
from cdlib.core.config import TrainConfig
from cdlib.core.data import DeviceData, hold_out, load_dataset
from cdlib.core.models import build_model
from cdlib.core.util import atomic_write_text, read_json, read_store_file, resolve_device
from cdlib.errors import ArgumentParser, ConfigError, StoreError, UserError, read_json_file

FAILED = "failed.json"
ATTEMPTS = "attempts.jsonl"


class ConfigMismatchError(StoreError):
    pass


class RunNotFoundError(UserError, FileNotFoundError):
    pass


@dataclass
class Run:
    """A finished run in the store. A file that cannot be read raises a ``StoreError`` naming it."""
    dir: Path
    config: TrainConfig

    def _read(self, name: str, reader):
        return read_store_file(self.dir / name, reader, engine.FINISHED_FILE_ADVICE)

    @cached_property
    def summary(self) -> dict:
        return read_json(self.dir / "summary.json", engine.FINISHED_FILE_ADVICE)

    @cached_property
    def metrics(self) -> pd.DataFrame:
        def read(path):
            frame = pd.read_json(path, lines=True)
            if list(frame.get("epoch", [])) != list(range(1, self.config.epochs + 1)):
                raise ValueError(f"it holds epochs {list(frame.get('epoch', []))[:5]}..., not 1..{self.config.epochs}")
            return frame
        return self._read("metrics.jsonl", read)

    def test_logits(self) -> np.ndarray:
        return self._read("test_logits.npy", np.load)

    def confusions(self, split: str = "test") -> np.ndarray:
        """(epochs, C, C) confusion counts after each epoch: ``test``, the ``train`` batches, and where the run
        has them ``validation`` and ``train_eval`` (the eval-mode pass over the training images)."""
        def read(path):
            with np.load(path) as z:
                return z[split]
        return self._read("confusions.npz", read)

    def load_model(self, device="cpu") -> torch.nn.Module:
        model = build_model(self.config.arch, self.summary["num_classes"], self.config.width)
        self._read("model.pt", lambda path: model.load_state_dict(
            torch.load(path, map_location="cpu", weights_only=True)))
        return model.to(device).eval()


def run_dir(config: TrainConfig, root: Path | None = None) -> Path:
    return Path(root or paths.runs()) / config.run_id()


def is_finished(folder: Path) -> bool:
    return (Path(folder) / "summary.json").is_file()


def split_finished(configs: Iterable[TrainConfig], root: Path | None = None) -> tuple[list[Run], list[str]]:
    """The finished runs of ``configs``, in order, and the run ids of the others."""
    done, missing = [], []
    for config in configs:
        folder = run_dir(config, root)
        if is_finished(folder):
            done.append(Run(folder, config))
        else:
            missing.append(config.run_id())
    return done, missing


def _tidy(folder: Path) -> None:
    """Remove what a worker killed after finishing a run leaves behind: its checkpoint and its lock."""
    engine.remove_leftover_checkpoint(folder)
    with contextlib.suppress(OSError):  # a read-only store still serves its runs
        locks.clear_stale(folder)


def _check_stored_config(folder: Path, config: TrainConfig) -> None:
    stored_path = folder / "config.json"
    if not stored_path.is_file():
        return
    stored = read_json(stored_path, f"The folder's name fixes its config, so if it is the run {folder.name} you "
                                    f"meant, delete config.json and it is written again; else move the folder away.")
    if stored != config.to_dict():
        diff = {k: (stored.get(k), v) for k, v in config.to_dict().items() if stored.get(k) != v}
        raise ConfigMismatchError(
            f"run folder {folder} holds a different config (stored vs requested: {diff}). Nothing was "
            f"changed. Move or delete that folder if it is stale, or point CDLIB_OUTPUTS elsewhere.")


def load_teachers(configs: Iterable[TrainConfig], device=None, root: Path | None = None) -> dict[str, torch.nn.Module]:
    """The KD teachers the configs name (``objective_args["teacher"]``: a run id or folder), loaded once
    each, after checking that each is a finished run of its students' data set."""
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


def _prepare(folder: Path, config: TrainConfig) -> None:
    """Before training a claimed run: its config on disk, the last failure cleared, the attempt logged."""
    if not (folder / "config.json").is_file():
        atomic_write_text(folder / "config.json", json.dumps(config.to_dict(), indent=1))
    (folder / FAILED).unlink(missing_ok=True)
    _log_attempt(folder)


def get_or_train(config: TrainConfig, device=None, data_root=None, progress: bool = True,
                 root: Path | None = None, data=None, on_locked: str = "wait", strategy: str | None = None) -> Run:
    """Return the finished run of ``config``; train it (or resume it) first if needed.

    Training happens only under the run's lock. If another live worker holds it,
    ``on_locked="wait"`` (the default) waits for that worker and then returns its run;
    ``"skip"`` raises :class:`cdlib.core.locks.RunLockedError` at once.
    """
    folder = run_dir(config, root)
    _check_stored_config(folder, config)
    if is_finished(folder):
        _tidy(folder)
        return Run(folder, config)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise locks.RunStoreError(
            f"cannot create run folder {folder}: {err.strerror or err}. Make {folder.parent} writable, or point "
            f"CDLIB_OUTPUTS at a writable folder. No run was changed.") from err
    with locks.claim(folder, on_locked):
        _check_stored_config(folder, config)  # another worker may have created the folder meanwhile
        if not is_finished(folder):            # ... or finished the run while we waited
            _prepare(folder, config)
            try:
                engine.fit(config, folder, device=device, data_root=data_root, progress=progress, data=data,
                           strategy=strategy, teachers=load_teachers([config], device, root))
            except Exception as err:
                _mark_failed(folder, err)
                raise
    return Run(folder, config)


def _log_attempt(folder: Path) -> None:
    """Add a line to ``attempts.jsonl``, rewriting the file whole so a kill never leaves half a line."""
    line = {"host": socket.gethostname(), "pid": os.getpid(), "job": locks.JOB_KEY, "time": time.time(),
            "resumed": (folder / engine.CHECKPOINT).is_file()}
    before = "".join(json.dumps(a) + "\n" for a in attempts(folder))
    atomic_write_text(folder / ATTEMPTS, before + json.dumps(line) + "\n")


def attempts(folder: Path) -> list[dict]:
    """The training starts logged in ``folder`` (a log for people: lines that do not parse are skipped)."""
    path = Path(folder) / ATTEMPTS
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    found = []
    for line in lines:
        with contextlib.suppress(ValueError):
            found.append(json.loads(line))
    return found


def _mark_failed(folder: Path, err: Exception) -> None:
    """Record why the run stopped, for ``python -m cdlib plan --status`` and other workers."""
    record = {"error": type(err).__name__, "message": str(err), "host": socket.gethostname(),
              "pid": os.getpid(), "time": time.time()}
    try:
        atomic_write_text(folder / FAILED, json.dumps(record, indent=1))
    except OSError:
        pass  # the store itself is the problem; the error is still raised to the caller


def failure(folder: Path) -> dict | None:
    """The recorded failure of an unfinished run, or None."""
    try:
        return json.loads((Path(folder) / FAILED).read_text())
    except (FileNotFoundError, ValueError):
        return None


def find_run(run: str | Path, root: Path | None = None) -> Run:
    """A finished run by folder path or run id (``<name>-<hash>``): the one function that finds runs."""
    folder = Path(run)
    if not folder.is_dir():
        folder = Path(root or paths.runs()) / str(run)
    if not is_finished(folder):
        raise RunNotFoundError(f"no finished run at {folder}; train it first (get_or_train) or check the name.")
    stored = read_json(folder / "config.json", engine.FINISHED_FILE_ADVICE)
    try:
        config = TrainConfig.from_dict(stored)
    except (ConfigError, TypeError) as err:
        raise StoreError(f"{folder / 'config.json'} of run {folder.name} is not a config this cdlib reads ({err}); "
                         f"it was written by another version of cdlib or altered. Use that version, or restore "
                         f"the file.") from err
    return Run(folder, config)


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


# Members per fused group on CUDA (strategy "fused"). Unmeasured: benchmarks/gpu_check.py times them.
FUSED_GROUP_SIZES = {"resnet18": 8, "resnet34": 8, "resnet50": 4, "resnet101": 4, "resnet152": 4,
                     "densenet121": 4}


def default_group_size(strategy: str, arch: str) -> int:
    """Runs per ``engine.train`` call: fused groups for ``fused``, one run at a time otherwise."""
    return FUSED_GROUP_SIZES.get(arch, 4) if strategy == "fused" else 1


def plan_groups(configs: Sequence[TrainConfig], group_size: int | None = None,
                strategy: str = "eager") -> list[list[TrainConfig]]:
    """Split ``configs`` into groups that can train together, keeping the training order.

    Configs with equal ``engine.recipe_key`` are split into near-equal consecutive chunks
    of at most ``group_size`` (default ``default_group_size(strategy, arch)``); groups are
    returned in the order of their first member, so runs listed before others (KD
    teachers before their students) are trained first.
    """
    buckets: dict[str, list[int]] = {}
    for position, config in enumerate(configs):
        buckets.setdefault(engine.recipe_key(config), []).append(position)
    groups = []
    for positions in buckets.values():
        size = group_size or default_group_size(strategy, configs[positions[0]].arch)
        if size < 1:
            raise ValueError(f"group_size must be at least 1, got {size}")
        count = math.ceil(len(positions) / size)
        groups += [[int(p) for p in chunk] for chunk in np.array_split(positions, count)]
    groups.sort(key=lambda g: g[0])
    return [[configs[p] for p in g] for g in groups]


def get_or_train_many(configs: Iterable[TrainConfig], device=None, data_root=None, progress: bool = True,
                      root: Path | None = None, data=None, group_size: int | None = None,
                      strategy: str | None = None) -> list[Run]:
    """The finished runs of ``configs`` (in their order), training the unfinished ones.

    Finished runs are skipped. Unfinished runs that share their recipe (they may differ
    in seed, objective_args and name) train together in one ``engine.train`` call, at
    most ``group_size`` at a time (``plan_groups``; with the default strategy, one run
    at a time). Groups start in the order of their first run, so KD teachers listed
    before their students finish first. Each member of a group is claimed with the run
    store's lock; members that another worker holds are waited for at the end. Runs
    whose loss turned non-finite are reported together at the end
    (``NonFiniteLossError``) after every other run was trained.
    """
    configs = list(configs)
    dev = resolve_device(device)
    strategy = strategy or engine.default_strategy(dev)
    for config in configs:
        folder = run_dir(config, root)
        _check_stored_config(folder, config)
        if is_finished(folder):
            _tidy(folder)
    todo = list({c.run_id(): c for c in configs if not is_finished(run_dir(c, root))}.values())
    loaded: dict = {}

    def data_for(config: TrainConfig):
        if data is not None:
            return data
        key = (config.dataset, config.rotation, config.validation)
        if key not in loaded:  # read each data set once for all runs
            loaded[key] = DeviceData(hold_out(load_dataset(config.dataset, data_root), config.validation), dev,
                                     config.rotation)
        return loaded[key]

    diverged: list[Exception] = []
    deferred: list[TrainConfig] = []
    for members in plan_groups(todo, group_size, strategy):
        with contextlib.ExitStack() as held:
            claimed = []
            for config in members:
                folder = run_dir(config, root)
                folder.mkdir(parents=True, exist_ok=True)
                try:
                    held.enter_context(locks.claim(folder, "skip"))
                except locks.RunLockedError:
                    deferred.append(config)
                    continue
                _check_stored_config(folder, config)
                if not is_finished(folder):
                    _prepare(folder, config)
                    claimed.append(config)
            if not claimed:
                continue
            folders = [run_dir(c, root) for c in claimed]
            try:
                engine.train(claimed, folders, data=data_for(claimed[0]), device=dev, data_root=data_root,
                             strategy=strategy, teachers=load_teachers(claimed, dev, root), progress=progress)
            except engine.MembersDivergedError as err:
                for run_id, error in err.failures.items():
                    _mark_failed(run_dir(next(c for c in claimed if c.run_id() == run_id), root), error)
                diverged.append(err)
            except engine.NonFiniteLossError as err:  # a group of one
                _mark_failed(folders[0], err)
                diverged.append(err)
            except Exception as err:
                for folder in folders:
                    if not is_finished(folder):
                        _mark_failed(folder, err)
                raise
    for config in deferred:  # held by another worker: wait for it (or take over a dead worker's run)
        get_or_train(config, dev, data_root, progress, root, data_for(config), strategy=strategy)
    if diverged:
        raise engine.NonFiniteLossError(" | ".join(str(e) for e in diverged))
    return [Run(run_dir(c, root), c) for c in configs]


def main(argv=None) -> None:
    """``python -m cdlib train CONFIG.json RUN_DIR``: train one run in RUN_DIR (workers and tests use it)."""
    parser = ArgumentParser(prog="python -m cdlib train", description=main.__doc__)
    parser.add_argument("config")
    parser.add_argument("run_dir")
    parser.add_argument("--device", default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--strategy", default=None, choices=engine.STRATEGIES)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    config = TrainConfig.from_dict(read_json_file(args.config, "the config file"))
    engine.fit(config, args.run_dir, device=args.device, data_root=args.data_root, strategy=args.strategy,
               teachers=load_teachers([config], args.device), progress=not args.quiet)

