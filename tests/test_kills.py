"""Kills, damaged files and a full disk in the run store: finished work is never lost.

- Seeded random kills: a real training process (``kill_harness.py``: two runs trained
  one after the other through ``executors.train_run``) SIGKILLs itself at one of its events, at
  least once in every phase (lock, config, attempts log, training step, evaluation,
  metrics, checkpoint, each rename, each final artefact, the checkpoint's removal), inside
  writes at a random byte. Every killed store is then resumed, and every run must end with
  the weights (``torch.equal``), logits, confusions and metrics of an uninterrupted run.
- Truncation: each file of an interrupted and of a finished run folder is cut at random
  offsets. The run then resumes exactly, or stops with a ``UserError`` that names the file
  and the run and says what to do; no file is deleted, and a finished run's files stay
  byte for byte as they were.
- Disk full: a file-size limit (``RLIMIT_FSIZE``) makes the checkpoint or a final artefact
  fail to write; ``python -m cdlib train`` stops with one line on stderr and exit code 2,
  keeps the last good checkpoint, and resumes exactly once space is back.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cdlib.core import runs
from cdlib.scaleout import locks
from cdlib.errors import UserError
from kill_harness import RUNS, train  # noqa: E402  (tests/ is on sys.path under pytest)

HARNESS = Path(__file__).with_name("kill_harness.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "CDLIB_PROGRESS": "0"}
EXTRA_TRIALS = 3  # random events beyond one per phase
# Fields that say how long a run trained, not what it learnt.
NOT_RESULTS = ("seconds", "train_seconds", "seconds_this_session")


def _harness(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HARNESS), *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted store and its event stream."""
    root = tmp_path_factory.mktemp("reference")
    process = _harness("record", root / "store", root / "events.json")
    output = process.communicate()[0]
    assert process.returncode == 0, output
    return root / "store", json.loads((root / "events.json").read_text())


def _phase(event) -> str:
    """What an event is doing; the two checkpoint renames (runs a and b) are phases of their own."""
    kind, name, _ = event
    if "/" not in name:  # a training step or an evaluation batch
        return kind
    file = name.split("/", 1)[1]
    return f"{kind} {name}" if (kind, file) == ("replace", "checkpoint.pt") else f"{kind} {file}"


def _trials(events, seed=2026) -> list[tuple[int, float, str]]:
    """(1-based event number, byte fraction, phase): one per phase, then EXTRA_TRIALS anywhere."""
    rng = np.random.default_rng(seed)
    phases: dict[str, list[int]] = {}
    for number, event in enumerate(events, 1):
        phases.setdefault(_phase(event), []).append(number)
    chosen = [int(rng.choice(numbers)) for numbers in phases.values()]
    chosen += [int(n) for n in rng.choice(len(events), EXTRA_TRIALS, replace=False) + 1]
    return [(n, float(rng.random()), _phase(events[n - 1])) for n in chosen]


def _run_all(commands: list[tuple], parallel: int = 2) -> list[tuple[int, str]]:
    """Run harness commands, ``parallel`` at a time; (return code, output) of each."""
    results, running = [None] * len(commands), []
    for i, args in enumerate(commands):
        running.append((i, _harness(*args)))
        while len(running) >= parallel or (i == len(commands) - 1 and running):
            j, process = running.pop(0)
            output = process.communicate()[0]
            results[j] = (process.returncode, output)
    return results


def _differences(store: Path, reference: Path) -> list[str]:
    """How the runs in ``store`` differ from the uninterrupted ones (empty: identical)."""
    found = []
    for config in RUNS:
        got, want = store / config.run_id(), reference / config.run_id()
        if not got.is_dir():
            found.append(f"{config.name}: not started")
            continue
        extra = {p.name for p in got.iterdir()} - {p.name for p in want.iterdir()}
        extra = {name for name in extra if not name.startswith(f".{locks.LOCK}.")}  # see locks: harmless
        if extra:
            found.append(f"{config.name}: extra files {sorted(extra)}")
        if not runs.is_finished(got):
            found.append(f"{config.name}: not finished")
            continue
        a = torch.load(got / "model.pt", weights_only=True)
        b = torch.load(want / "model.pt", weights_only=True)
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            found.append(f"{config.name}: weights differ")
        if not np.array_equal(np.load(got / "test_logits.npy"), np.load(want / "test_logits.npy")):
            found.append(f"{config.name}: test logits differ")
        with np.load(got / "confusions.npz") as x, np.load(want / "confusions.npz") as y:
            if any(not np.array_equal(x[k], y[k]) for k in ("train", "test")):
                found.append(f"{config.name}: confusions differ")
        for name in ("metrics.jsonl", "summary.json"):
            lines = [[{k: v for k, v in json.loads(line).items() if k not in NOT_RESULTS}
                      for line in (folder / name).read_text().splitlines()] if name.endswith("l") else
                     {k: v for k, v in json.loads((folder / name).read_text()).items() if k not in NOT_RESULTS}
                     for folder in (got, want)]
            if lines[0] != lines[1]:
                found.append(f"{config.name}: {name} differs")
        if (got / "config.json").read_bytes() != (want / "config.json").read_bytes():
            found.append(f"{config.name}: config.json differs")
    return found


def test_random_kills_resume_to_the_weights_of_an_uninterrupted_run(reference, tmp_path, record_fault, capsys):
    reference_store, events = reference
    trials = _trials(events)
    assert len(trials) >= 20 and len({phase for *_, phase in trials}) == len({_phase(e) for e in events})
    stores = [tmp_path / f"trial-{i:02d}" for i in range(len(trials))]
    killed = _run_all([("kill", store, number, fraction) for store, (number, fraction, _) in zip(stores, trials)])
    resumed = _run_all([("resume", *stores)], parallel=1)[0]
    assert resumed[0] == 0, resumed[1]
    rows, failures = [], []
    for (number, fraction, phase), store, (code, output) in zip(trials, stores, killed):
        differences = [] if code == -9 else [f"the process was not killed (exit {code}): {output[-500:]}"]
        differences += _differences(store, reference_store)
        size = events[number - 1][2]
        where = f"byte {int(fraction * size)} of {size}" if events[number - 1][0] == "write" else "before/after it"
        rows.append(f"  {number:>5}  {phase:<32} {where:<22} {'resumed exactly' if not differences else differences}")
        record_fault(f"kill at event {number:>4}: {phase}", "resumed exactly" if not differences
                     else "; ".join(differences), not differences)
        if differences:
            failures.append((number, phase, differences))
    with capsys.disabled():
        print(f"\n{len(trials)} seeded random kills of a training process, each resumed:")
        print("\n".join(rows))
    assert not failures, failures


# --------------------------------------------------------------------------- truncated files

@pytest.fixture(scope="module")
def interrupted(reference, tmp_path_factory):
    """A store killed at a training step of run a's epoch 2 of 2: its checkpoint at epoch 1, a lock of a dead
    process; run b not started."""
    _, events = reference
    first_checkpoint = next(n for n, e in enumerate(events, 1) if e[:2] == ["replace", "a/checkpoint.pt"])
    step = next(n for n, e in enumerate(events, 1) if n > first_checkpoint and e[0] == "step") + 5
    store = tmp_path_factory.mktemp("interrupted") / "store"
    (code, output), = _run_all([("kill", store, step, 0.0)], parallel=1)
    assert code == -9, output
    folder = store / RUNS[0].run_id()
    assert {"checkpoint.pt", "metrics.jsonl", "config.json", "attempts.jsonl", locks.LOCK} <= set(os.listdir(folder))
    return store


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _truncations(folder: Path, seed: int, per_file: int = 2) -> list[tuple[str, int]]:
    rng = np.random.default_rng(seed)
    cases = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        size = path.stat().st_size
        cases += [(path.name, int(offset)) for offset in sorted({0, *rng.integers(0, size, per_file - 1)})]
    return cases


def _truncate(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(offset)
    if path.name == locks.LOCK:  # damaged a while ago: a lock being written is readable within microseconds
        old = path.stat().st_mtime - 2 * locks.UNREADABLE_STALE_S
        os.utime(path, (old, old))


def _named_error(err: UserError, file: str, folder: Path) -> list[str]:
    text = str(err)
    missing = [] if file in text else [f"the file {file}"]
    missing += [] if folder.name in text else [f"the run {folder.name}"]
    missing += [] if any(w in text for w in ("delete", "Delete", "restore", "Restore", "move", "Move")) else ["a fix"]
    return missing


def _short(err: Exception) -> str:
    """The start of the error's message, without the temporary folders."""
    return re.sub(r"/\S*/", "…/", str(err))[:90]


def _read_everything(store: Path) -> None:
    for config in RUNS:
        run = runs.find_run(config.run_id(), store)
        run.summary, run.metrics, run.test_logits(), run.confusions("train"), run.confusions("test")
        run.load_model()


@pytest.mark.parametrize("state", ["interrupted", "finished"])
def test_truncated_store_files_resume_exactly_or_name_the_file(state, reference, interrupted, tmp_path, record_fault):
    reference_store = reference[0]
    source = interrupted if state == "interrupted" else reference_store
    folder_name = RUNS[0].run_id()
    failures = []
    for i, (file, offset) in enumerate(_truncations(source / folder_name, seed=7 if state == "finished" else 8)):
        store = tmp_path / f"case-{i:02d}"
        shutil.copytree(source, store)
        folder = store / folder_name
        _truncate(folder / file, offset)
        before = _digest(folder)
        try:
            train(store)
            _read_everything(store)
            problems = _differences(store, reference_store)
            outcome = "resumed exactly" if state == "interrupted" else "still read exactly"
            if problems:
                outcome = f"read wrong results without an error: {problems}"
        except UserError as err:
            problems = _named_error(err, file, folder)
            outcome = (f"{type(err).__name__}: {_short(err)}" if not problems
                       else f"an error that lacks {problems}: {err}")
            # Nothing of the run may go; the dead worker's lock is not work (it is taken over).
            lost = sorted(set(before) - set(_digest(folder)) - {locks.LOCK})
            problems += [f"deleted {lost}"] if lost else []
        if state == "finished" and _digest(folder) != before:
            problems.append("the finished run's files changed")
        record_fault(f"{state} run, {file} cut at byte {offset}", outcome, not problems)
        if problems:
            failures.append((file, offset, outcome, problems))
    assert not failures, failures


# --------------------------------------------------------------------------- a full disk

def _limited(limit: int):
    def set_limit():  # in the child only: a file may not grow beyond `limit` bytes (EFBIG, like ENOSPC)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return set_limit


def _train_cli(config_file: Path, folder: Path, limit: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cdlib", "train", str(config_file), str(folder), "--quiet",
                           "--device", "cpu"], env=ENV, capture_output=True, text=True,
                          preexec_fn=_limited(limit) if limit else None)


@pytest.fixture(scope="module")
def before_final_artefacts(reference, tmp_path_factory):
    """A store killed after the last epoch's checkpoints, before any final artefact was written."""
    _, events = reference
    first_artefact = next(n for n, e in enumerate(events, 1) if e[:2] == ["write", "a/test_logits.npy.tmp"])
    store = tmp_path_factory.mktemp("before-final") / "store"
    (code, output), = _run_all([("kill", store, first_artefact, 0.0)], parallel=1)
    assert code == -9, output
    return store


# The limit lets metrics.jsonl (< 1 KB) through and stops the checkpoint (~450 KB) or the test logits (40 KB).
@pytest.mark.parametrize("moment, source, limit", [("the checkpoint", "interrupted", 64 * 1024),
                                                   ("the final test logits", "before_final_artefacts", 30 * 1024)])
def test_a_full_disk_stops_the_run_and_keeps_its_last_checkpoint(moment, source, limit, reference, tmp_path,
                                                                   record_fault, request):
    config = RUNS[0]
    store = tmp_path / "store"
    shutil.copytree(request.getfixturevalue(source), store)
    folder = store / config.run_id()
    checkpoint = (folder / runs.CHECKPOINT).read_bytes()
    result = _train_cli(folder / "config.json", folder, limit)
    # The killed worker's lock is taken over, which the CLI says in a line of its own.
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("taking over run")]
    record_fault(f"disk full while writing {moment}", lines[-1] if lines else result.stderr, True)
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "cannot write" in lines[0] and "Free space" in lines[0], result.stderr
    assert (folder / runs.CHECKPOINT).read_bytes() == checkpoint, "the last good checkpoint changed"
    assert not list(folder.glob("*.tmp")), "a temporary file was left behind"
    assert _train_cli(folder / "config.json", folder).returncode == 0
    assert not (folder / locks.LOCK).exists()  # released: `python -m cdlib train` trains a folder under its lock
    assert not [d for d in _differences(store, reference[0]) if d.startswith(f"{config.name}:")]
