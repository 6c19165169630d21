"""The run-time estimate (cdlib.scaleout.estimate) on the CPU: sane, finite, store-aware numbers."""
from __future__ import annotations

import json
import math

import pytest

from cdlib.core import runs
from cdlib.experiments.profiles import get_profile
from cdlib.scaleout import estimate


def test_estimate_prints_sane_numbers(isolated_outputs, capsys):
    profile = get_profile("smoke")
    by_notebook = estimate.notebook_runs(profile)
    every = [c for cs in by_notebook.values() for c in cs]
    assert len({c.run_id() for c in every}) == len(every)
    # A finished run in the store: it costs nothing, and its measured seconds are used.
    done = next(c for c in every if c.objective == "ce" and c.arch == profile.student_arch)
    folder = runs.run_dir(done)
    folder.mkdir(parents=True)
    (folder / runs.CONFIG).write_text(json.dumps(done.to_dict()))
    (folder / runs.SUMMARY).write_text(json.dumps({"device": "cpu"}))
    (folder / runs.METRICS).write_text("".join(
        json.dumps({"epoch": e + 1, "seconds": 1.5 + e % 2}) + "\n" for e in range(done.epochs)))
    # Half an unfinished run: only its remaining epochs count.
    partial = next(c for c in every if c.objective == "kd")
    runs.run_dir(partial).mkdir(parents=True)
    runs.write_metrics(runs.run_dir(partial), [{"epoch": e + 1, "seconds": 9.0} for e in range(2)])

    report = estimate.estimate(profile, device="cpu", steps=1, timing_batch=8, log=lambda s: None)
    total = report["total"]
    assert total["runs"] == len(every) and total["to_train"] == len(every) - 1
    assert total["epochs"] == sum(c.epochs for c in every) - done.epochs - 2
    assert math.isfinite(total["seconds"]) and total["seconds"] > 0
    assert sum(v["seconds"] for v in report["notebooks"].values()) == pytest.approx(total["seconds"])
    assert 0 < total["floor_seconds"] < total["seconds"]
    stored = report["per_epoch"][f"{done.arch} x{done.width:g} ce"]
    assert stored["seconds"] == pytest.approx(1.5 if done.epochs % 2 else 2.0)  # the median epoch
    assert stored["source"].startswith("store (1 runs)") and stored["checkpoint_seconds"] > 0
    measured = {k: v for k, v in report["per_epoch"].items() if v["source"] == "measured"}
    assert all(v["seconds"] > 0 and v["checkpoint_seconds"] > 0 for v in measured.values())
    # Objectives pay for the extra forwards they declare: a KD teacher's, a CS-KD partner's (LS has none).
    student = f"{done.arch} x{done.width:g}"
    assert measured[f"{student} kd"]["seconds"] > measured[f"{student} ls"]["seconds"]
    assert measured[f"{student} cskd"]["seconds"] > measured[f"{student} ls"]["seconds"]

    assert estimate.main(["--profile", "smoke", "--device", "cpu", "--steps", "1", "--timing-batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "seconds per epoch of a run" in out and "store (1 runs)" in out


def test_measure_times_training_and_forwards_through_fit():
    """One timing: the training step per image costs more than a forward, and both are positive."""
    spec = estimate.DataSpec(16, 16, 16, 4)
    t = estimate.measure("resnet18", 0.0625, spec, "cpu", steps=2, batch=8)
    assert 0 < t.forward < t.train
    assert estimate.checkpoint_seconds("resnet18", 0.0625, 4, 3, "cpu") > 0
