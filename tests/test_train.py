"""Training one run (cdlib.core.train.fit): schedule, artefacts, exact resume, NaN stop, devices.

Everything runs on the CPU at tiny sizes: 48 training images (batches of 24), 32 test images,
4 classes, width-1/16 networks, 2-3 epochs (``TINY``: the 20-class synthetic set). At the paper's
lr of 0.1 these tiny networks are chaotic (a 1e-6 relative perturbation of the weights grows to
~1e-2 within six steps), so comparisons of kernels that sum in other orders (torch.compile) train
at lr 0.002, where rounding stays rounding. The CUDA path is checked by tests/test_cuda_dry_run.py.
"""
from __future__ import annotations

import ast
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from cdlib import paths
from cdlib.core import objectives, runs, train
from cdlib.core.config import TrainConfig
from cdlib.core.data import DeviceData, synthetic
from cdlib.core.models import build_model
from cdlib.core.runs import load_checkpoint
from cdlib.core.train import NonFiniteLossError, fit, learning_rate
from cdlib.core.util import true_fp32
from engine_reference import fingerprint

TINY = TrainConfig(name="tiny", dataset="synthetic", arch="resnet18", width=0.0625, epochs=3, rotation=15)
REFERENCE = Path(__file__).parent / "data" / "engine_reference.json"


@pytest.fixture(scope="module")
def tiny_set():
    return synthetic(superclasses=2, classes_per_superclass=2, train_per_class=12, test_per_class=8, size=16)


@pytest.fixture(scope="module")
def data(tiny_set):
    return DeviceData(tiny_set, "cpu", rotation=15)


def recipe(**changes) -> TrainConfig:
    base = TrainConfig(name="e", dataset="synthetic", arch="resnet18", width=0.0625, epochs=2, batch_size=24)
    return base.replace(**changes)


def teacher_networks(arch="resnet18", width=0.0625) -> dict:
    out = {}
    for seed, name in enumerate(("t0", "t1")):
        torch.manual_seed(100 + seed)
        out[name] = build_model(arch, 4, width)
    return out


def _flat(state):
    return torch.cat([v.flatten().double() for v in state.values() if v.is_floating_point()])


def relative_distance(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


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
    assert load_checkpoint(tmp_path / "run" / runs.CHECKPOINT, config)["epoch"] == 1


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


# --------------------------------------------------------------------------- the previous engines' fingerprints

def state_distance(got: dict, expected: dict) -> float:
    """|got - expected| / |expected| over all weights, from fingerprints: the seeded projection of a
    difference has the difference's squared norm as its expected square, summed over tensors."""
    return math.sqrt(sum((got[k][2] - expected[k][2]) ** 2 for k in expected) / sum(v[1] for v in expected.values()))


# How far the previous engine's weights and losses may lie from today's. On one machine they agree
# bitwise; across instruction sets (measured with ONEDNN_MAX_CPU_ISA=AVX2 and SSE41 against
# AVX-512) the ResNet runs lie <= 6e-8 apart in weights and <= 5e-7 in loss, and the one-epoch
# DenseNet run 4e-6 and 1e-7. A weight decay 10% off moves the ResNet weights by 1.6e-6, a momentum
# 1% off by >= 1e-4. DenseNet's 121 layers amplify rounding ~100x more (three epochs at lr 0.02:
# 1e-3 between instruction sets), so its check only catches a wrong network, data or objective.
STATE_TOLERANCE = {"resnet18": 1e-6, "densenet121": 1e-4}
LOSS_TOLERANCE = 1e-5


def test_single_runs_match_the_previous_engine(tmp_path, data):
    """``tests/data/engine_reference.json`` holds fingerprints of the weights that commit dbcac7b's
    ``cdlib.train.fit`` (the engine before this one: objectives ran the network) wrote for these
    configs on this data, single-threaded on the CPU (``tests/engine_reference.py`` wrote it);
    today's fit must reproduce them to the rounding of the CPU it runs on."""
    reference = json.loads(REFERENCE.read_text())
    assert list(reference)[-1] == "kd"  # "ce" is its teacher
    for name in reference:
        config = TrainConfig.from_dict(reference[name]["config"])
        teachers = None
        if name == "kd":
            teachers = {"ce": build_model("resnet18", 4, 0.0625)}
            teachers["ce"].load_state_dict(torch.load(tmp_path / "ce" / "model.pt", weights_only=True))
        fit(config, tmp_path / name, data=data, progress=False, teachers=teachers)
        got = fingerprint(torch.load(tmp_path / name / "model.pt", weights_only=True))
        expected = reference[name]["weights"]
        assert list(got) == list(expected)
        assert state_distance(got, expected) < STATE_TOLERANCE[config.arch], name
        metrics = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for line, ref in zip(metrics, reference[name]["metrics"], strict=True):
            assert {k: line[k] for k in ref} == pytest.approx(ref, rel=LOSS_TOLERANCE), name


# --------------------------------------------------------------------------- compile, forwards, teachers

def test_compile_matches_eager_on_a_small_resnet18(tmp_path, data):
    """``compile=True`` (inductor on the CPU) trains what eager does, to rounding. A CS-KD step has
    two compiled forwards (anchors with gradients, partners without); compiling is slow, so one
    objective and one epoch (tests/test_cuda_dry_run.py checks every objective's CUDA-graph steps)."""
    teachers = teacher_networks()
    for objective, args in (("cskd", {}),):
        config = recipe(objective=objective, objective_args=args, lr=0.002, epochs=1)
        fit(config, tmp_path / objective / "eager", data=data, progress=False, teachers=teachers)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a compile fallback would hide the compiled path
            fit(config, tmp_path / objective / "compiled", data=data, progress=False, teachers=teachers, compile=True)
        a, b = (_weights(tmp_path / objective / d / runs.MODEL) for d in ("eager", "compiled"))
        assert relative_distance(_flat(b), _flat(a)) < 1e-3, objective


def test_compile_falls_back_to_eager_when_compilation_fails(tmp_path, data, monkeypatch):
    config = recipe(objective="cskd")
    fit(config, tmp_path / "eager", data=data, progress=False)

    def broken_compile(module, **kwargs):
        def compiled(x):
            raise RuntimeError("inductor backend failed (simulated)")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*simulated.*without compilation"):
        fit(config, tmp_path / "fallback", data=data, progress=False, compile=True)
    a, b = (_weights(tmp_path / d / runs.MODEL) for d in ("eager", "fallback"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the eager module computed every step


def test_a_missing_teacher_is_named(tmp_path, data):
    with pytest.raises(ValueError, match="needs its teacher 't9'.*runs.load_teachers"):
        fit(recipe(objective="kd", objective_args={"teacher": "t9"}), tmp_path / "b", data=data, progress=False)


def test_fit_runs_every_forward_in_order(tmp_path, data, monkeypatch):
    """CS-KD: anchors first, then the same-class partners (train mode, no gradient); KD: the teacher
    in eval mode without gradients on the student's images. Only the student gets gradients."""
    for objective, args in (("cskd", {}), ("kd", {"teacher": "t0"})):
        teachers = teacher_networks()
        teachers["t0"].train()  # fit must switch it to eval mode
        calls, students = [], []

        def build(*a, **k):
            model = build_model(*a, **k)
            model.register_forward_pre_hook(lambda m, inputs: calls.append(
                ("student", inputs[0].clone(), m.training, torch.is_grad_enabled())))
            students.append(model)
            return model

        monkeypatch.setattr(train, "build_model", build)
        teachers["t0"].register_forward_pre_hook(lambda m, inputs: calls.append(
            ("teacher", inputs[0].clone(), m.training, torch.is_grad_enabled())))
        fit(recipe(objective=objective, objective_args=args, epochs=1, batch_size=48), tmp_path / objective,
            data=data, progress=False, teachers=teachers)
        step = calls[:2]  # one step (48 images in one batch), then the evaluations
        assert step[0][0] == "student" and step[0][2:] == (True, True)
        if objective == "cskd":
            assert [c[0] for c in step] == ["student", "student"] and step[1][2:] == (True, False)
        else:
            assert [c[0] for c in step] == ["student", "teacher"] and step[1][2:] == (False, False)
            assert torch.equal(step[1][1], step[0][1])
            assert all(p.grad is None for p in teachers["t0"].parameters())
        assert all(p.grad is not None for p in students[0].parameters())
        assert [c[2] for c in calls[2:]] == [False] * len(calls[2:])  # evaluation in eval mode


def test_checkpoints_every_n_epochs_and_after_the_last(tmp_path, data, monkeypatch):
    config = recipe(epochs=5)
    fit(config, tmp_path / "straight", data=data, progress=False)
    written = []
    real = runs.save_checkpoint
    monkeypatch.setattr(runs, "save_checkpoint", lambda folder, state: written.append(state["epoch"]) or real(folder, state))

    class Killed(Exception):
        pass

    def kill_after_epoch_3(folder, history):
        runs.atomic_write_text(Path(folder) / runs.METRICS, "".join(json.dumps(h) + "\n" for h in history))
        if len(history) == 3:
            raise Killed

    monkeypatch.setattr(runs, "write_metrics", kill_after_epoch_3)
    with pytest.raises(Killed):
        fit(config, tmp_path / "every2", data=data, progress=False, checkpoint_every=2)
    assert written == [2] and len((tmp_path / "every2" / runs.METRICS).read_text().splitlines()) == 3
    monkeypatch.undo()
    fit(config, tmp_path / "every2", data=data, progress=False, checkpoint_every=2)  # redoes epoch 3
    a, b = (_weights(tmp_path / d / runs.MODEL) for d in ("straight", "every2"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(x)["epoch"] for x in (tmp_path / "every2" / runs.METRICS).read_text().splitlines()] == [1, 2, 3, 4, 5]


# --------------------------------------------------------------------------- devices

def test_a_checkpoint_resumes_only_on_its_device_type(tmp_path, data):
    config = recipe(epochs=2)
    folder = tmp_path / "run"
    fit(config.replace(epochs=1), tmp_path / "one", data=data, progress=False)
    state = {"config": config.to_dict(), "epoch": 1, "device_type": "cuda"}
    folder.mkdir()
    torch.save(state, folder / runs.CHECKPOINT)
    with pytest.raises(RuntimeError, match="written on cuda and cannot resume exactly on cpu.*delete it"):
        fit(config, folder, data=data, progress=False)
    assert (folder / runs.CHECKPOINT).is_file()  # refused, not removed


# --------------------------------------------------------------------------- numerics of the CUDA path, on the CPU

def test_augmentation_ignores_the_callers_autocast(data):
    """On CUDA fit runs under bf16 autocast; affine_grid in bf16 moves rotated pixels."""
    idx = torch.arange(32)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    plain = data.augment(idx, g1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = data.augment(idx, g2)
    assert inside.dtype == torch.float32 and torch.equal(plain, inside)


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_heads_compute_in_float32_under_autocast(arch):
    torch.manual_seed(0)
    model = build_model(arch, 4, 0.0625).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        features = model.features(x)
    assert features.dtype == torch.bfloat16 and logits.dtype == torch.float32
    torch.testing.assert_close(logits, model.classifier(features.float()))


def test_true_fp32_turns_tf32_off_and_restores_it():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    with true_fp32():
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# --------------------------------------------------------------------------- architecture

def _imports(path: Path) -> set[str]:
    """cdlib modules that ``path`` imports anywhere (top level or inside functions)."""
    package = ".".join(path.relative_to(paths.REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("cdlib")}


def test_no_module_imports_one_that_imports_it_back():
    modules = {".".join(p.relative_to(paths.REPO).with_suffix("").parts): p
               for p in (paths.REPO / "cdlib").rglob("*.py") if p.name != "__init__.py"}
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    assert "cdlib.core.runs" in graph["cdlib.core.train"]  # the graph sees imports

    def reaches(start, goal, seen):
        return any(n == goal or (n not in seen and not seen.add(n) and reaches(n, goal, seen)) for n in graph[start])

    circles = sorted(m for m in graph if reaches(m, m, set()))
    assert not circles, f"import circles through {circles}"
    core = [m for m in modules if m.startswith("cdlib.core.")]
    upward = {m: sorted(i for i in graph[m] if not i.startswith("cdlib.core.") and i not in ("cdlib.paths", "cdlib.errors")) for m in core}
    assert not any(upward.values()), f"the core imports the layers above it: {upward}"
    assert not any("cdlib.scaleout" in i for m in modules if m.startswith("cdlib.experiments.") for i in graph[m]
                   if m != "cdlib.experiments.pipeline"), "only the pipeline drives the scale-out layer"
