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
    (folder / "config.json").write_text(json.dumps(done.to_dict()))
    (folder / "summary.json").write_text(json.dumps({"device": "cpu"}))
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": e + 1, "seconds": 1.5, "group_size": 3}) + "\n" for e in range(done.epochs)))

    report = estimate.estimate(profile, device="cpu", steps=1, timing_batch=8, log=lambda s: None)
    total = report["total"]
    assert total["runs"] == len(every) and total["to_train"] == len(every) - 1
    assert total["epochs"] == sum(c.epochs for c in every) - done.epochs
    assert math.isfinite(total["seconds"]) and total["seconds"] > 0
    assert sum(v["seconds"] for v in report["notebooks"].values()) == pytest.approx(total["seconds"])
    assert 0 < total["floor_seconds"] < total["seconds"]
    stored = report["per_epoch"][f"{done.arch} ce (group 1)"]
    assert stored["seconds"] == pytest.approx(0.5) and stored["source"].startswith("store")
    kd = [v for k, v in report["per_epoch"].items() if " kd " in k]
    assert kd and all(v["seconds"] > 0 for v in kd)

    assert estimate.main(["--profile", "smoke", "--device", "cpu", "--steps", "1", "--timing-batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "per-model seconds per epoch" in out
