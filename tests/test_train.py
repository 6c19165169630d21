import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from cdlib.core import objectives
from cdlib.core.config import TrainConfig
from cdlib.core.engine import NonFiniteLossError, fit, learning_rate, load_checkpoint

TINY = TrainConfig(name="tiny", dataset="synthetic", arch="resnet18", width=0.0625, epochs=3, rotation=15)


def test_schedule_values():
    c = TrainConfig(epochs=200, lr=0.1, warmup_epochs=1)
    steps = 391
    assert learning_rate(c, 0, steps) == pytest.approx(0.1 / 391)
    assert learning_rate(c, 390, steps) == pytest.approx(0.1)
    assert learning_rate(c, 391 * 59, steps) == pytest.approx(0.1)
    assert learning_rate(c, 391 * 60, steps) == pytest.approx(0.02)
    assert learning_rate(c, 391 * 120, steps) == pytest.approx(0.004)
    assert learning_rate(c, 391 * 160, steps) == pytest.approx(0.0008)
    assert c.milestone_epochs() == [60, 120, 160]
    assert TrainConfig(epochs=300).milestone_epochs() == [90, 180, 240]
    assert TrainConfig(epochs=300, milestones=(150, 225)).milestone_epochs() == [150, 225]
    cos = TrainConfig(epochs=10, schedule="cosine", warmup_epochs=0)
    assert learning_rate(cos, 0, 10) == pytest.approx(0.1)
    assert learning_rate(cos, 50, 10) == pytest.approx(0.05)
    assert learning_rate(cos, 99, 10) < 1e-3


def test_loss_decreases_and_artefacts_are_written(tmp_path):
    summary = fit(TINY, tmp_path / "run", progress=False)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert summary["final_top1"] > 100 / 20 + 10  # well above chance (20 classes)
    run = tmp_path / "run"
    assert not (run / "checkpoint.pt").exists()  # deleted once the run is finished
    assert {"model.pt", "test_logits.npy", "confusions.npz", "summary.json"} <= {p.name for p in run.iterdir()}
    import numpy as np
    with np.load(run / "confusions.npz") as z:
        assert z["test"].shape == (3, 20, 20) and (z["test"].sum((1, 2)) == 500).all()
        assert (z["train"].sum((1, 2)) == 2000).all()
        assert z["test"][-1].trace() / 500 * 100 == pytest.approx(summary["final_top1"])


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    """A real process is killed (SIGKILL) at a random point after its first checkpoint; resuming
    in this process ends with exactly the weights of an uninterrupted run."""
    config = TINY.replace(epochs=4)
    fit(config, tmp_path / "straight", progress=False)

    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "config.json").write_text(json.dumps(config.to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "cdlib", "train", str(killed / "config.json"), str(killed), "--quiet"],
                            env={**os.environ, "PYTHONHASHSEED": "0"})
    deadline = time.time() + 300
    while not (killed / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(0).uniform(0.0, 1.5))  # somewhere inside a later epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoint.pt").exists() and not (killed / "summary.json").exists(), \
        "the process finished before it could be killed; the test did not exercise a resume"
    fit(config, killed, progress=False)
    straight, resumed = _weights(tmp_path / "straight" / "model.pt"), _weights(killed / "model.pt")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]


class ExplodingLoss(objectives.CrossEntropy):
    """Cross-entropy that turns NaN at the third step of the second epoch."""

    def __init__(self):
        self.calls = 0

    def loss(self, logits, batch, epoch):
        loss = super().loss(logits, batch, epoch)
        self.calls += 1
        exploded = epoch == 1 and self.calls == 16 + 3  # the synthetic set has 16 steps per epoch
        return loss * float("nan") if exploded else loss


def test_nan_loss_stops_with_epoch_and_step(tmp_path, monkeypatch):
    monkeypatch.setitem(objectives.OBJECTIVES, "exploding", ExplodingLoss)
    config = TINY.replace(objective="exploding")
    with pytest.raises(NonFiniteLossError, match=r"epoch 2 \(1-based\), step 2 of that epoch"):
        fit(config, tmp_path / "run", progress=False)
    # The last good checkpoint (end of epoch 1) survives.
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt", config)["epoch"] == 1


def test_bad_checkpoints_are_refused_clearly(tmp_path):
    run = tmp_path / "run"
    fit(TINY.replace(epochs=1), run, progress=False)
    torch.save({"config": TINY.to_dict(), "epoch": 1}, run / "other.pt")
    with pytest.raises(RuntimeError, match="another config"):
        load_checkpoint(run / "other.pt", TINY.replace(seed=5))
    blob = (run / "model.pt").read_bytes()
    (run / "truncated.pt").write_bytes(blob[: len(blob) // 3])
    with pytest.raises(RuntimeError, match="truncated"):
        load_checkpoint(run / "truncated.pt")


class Arbitrary:
    pass


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    torch.save({"config": {}, "payload": Arbitrary()}, tmp_path / "evil.pt")
    with pytest.raises(RuntimeError, match="holds Python objects.*arbitrary code"):
        load_checkpoint(tmp_path / "evil.pt")
