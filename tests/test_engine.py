"""The training engine (cdlib.core.engine): one loop for N runs, three strategies, exact resume.

Everything runs on the CPU at tiny sizes: 48 training images (batches of 24), 32
test images, 4 classes, width-1/16 networks, 2-3 epochs. Strategies compute the same
function with kernels that sum in other orders, so results agree to float rounding. At
the paper's lr of 0.1 these tiny networks are chaotic (a 1e-6 relative perturbation of
the weights grows to ~1e-2 within six steps), so comparisons of strategies whose kernels
differ (torch.compile) train at lr 0.002, where rounding stays rounding.
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

import numpy as np
import pytest
import torch

from cdlib import paths
from cdlib.core import engine, fused, objectives, runs
from cdlib.core.config import TrainConfig
from cdlib.core.data import DeviceData, synthetic
from cdlib.core.models import build_model
from cdlib.core.util import true_fp32
from engine_reference import fingerprint

FILES = {"metrics.jsonl", "model.pt", "test_logits.npy", "confusions.npz", "summary.json"}
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


def assert_same_run(single: Path, other: Path, rel: float = 1e-4):
    """``other`` ends as ``single`` (trained alone, eager) does, to rounding."""
    names = lambda d: {p.name for p in d.iterdir()} - {"config.json", "attempts.jsonl", "lock.json"}  # noqa: E731
    assert names(other) == names(single) == FILES
    a = torch.load(single / "model.pt", weights_only=True)
    b = torch.load(other / "model.pt", weights_only=True)
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a if not a[k].is_floating_point())  # BN batch counters
    diff = relative_distance(_flat(b), _flat(a))
    assert diff < rel, diff
    ma = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (other / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in ma] == [m["epoch"] for m in mb]
    for x, y in zip(ma, mb):
        assert set(y) == set(x) and y["lr"] == x["lr"]
        for k in ("train_loss", "test_loss"):
            assert y[k] == pytest.approx(x[k], rel=10 * rel)
        for k in ("train_top1", "test_top1", "test_top5"):  # one image (of 32 or 48) may flip on a near-tie
            assert abs(y[k] - x[k]) <= 100 / 32 + 1e-9, (k, x[k], y[k])
    la, lb = np.load(single / "test_logits.npy"), np.load(other / "test_logits.npy")
    assert np.abs(la - lb).max() <= 10 * rel * np.abs(la).max()
    with np.load(single / "confusions.npz") as ca, np.load(other / "confusions.npz") as cb:
        for split in ("train", "test"):
            assert np.abs(ca[split].astype(int) - cb[split].astype(int)).sum() <= 2 * len(ma), split  # a flip: 2


# --------------------------------------------------------------------------- N = 1 is the previous engine

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
    today's engine must reproduce them to the rounding of the CPU it runs on."""
    reference = json.loads(REFERENCE.read_text())
    assert list(reference)[-1] == "kd"  # "ce" is its teacher
    for name in reference:
        config = TrainConfig.from_dict(reference[name]["config"])
        teachers = None
        if name == "kd":
            teachers = {"ce": build_model("resnet18", 4, 0.0625)}
            teachers["ce"].load_state_dict(torch.load(tmp_path / "ce" / "model.pt", weights_only=True))
        engine.fit(config, tmp_path / name, data=data, progress=False, teachers=teachers)
        got = fingerprint(torch.load(tmp_path / name / "model.pt", weights_only=True))
        expected = reference[name]["weights"]
        assert list(got) == list(expected)
        assert state_distance(got, expected) < STATE_TOLERANCE[config.arch], name
        metrics = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for line, ref in zip(metrics, reference[name]["metrics"], strict=True):
            assert {k: line[k] for k in ref} == pytest.approx(ref, rel=LOSS_TOLERANCE), name


# --------------------------------------------------------------------------- strategies

# objective, per-member objective_args (3 members). KD: one teacher shared by all, and two teachers.
OBJECTIVE_CASES = {
    "ce": ("ce", [{}, {}, {}]),
    "pskd": ("pskd", [{"alpha_T": 0.8}, {"alpha_T": 0.5}, {"alpha_T": 0.8}]),
    "cskd": ("cskd", [{}, {}, {}]),
    "kd-shared": ("kd", [{"teacher": "t0"}] * 3),
    "kd-two-teachers": ("kd", [{"teacher": "t0"}, {"teacher": "t1"}, {"teacher": "t0"}]),
    "cd": ("cd", [{"schedule": [1, 1]}, {"schedule": [1, 1], "targets": "diagonal"}, {"schedule": [1, 1]}]),
}
STRATEGY_LR = 0.002


@pytest.fixture(scope="module")
def separate_runs(tmp_path_factory, data):
    """Every case trained one run at a time with plain ``fit`` (the reference), per network."""
    root = tmp_path_factory.mktemp("separate")
    done = {}
    for arch in ("resnet18", "densenet121"):
        teachers = teacher_networks(arch)
        for case, (objective, args) in OBJECTIVE_CASES.items():
            configs = [recipe(arch=arch, objective=objective, objective_args=a, seed=s, lr=STRATEGY_LR)
                       for s, a in enumerate(args)]
            dirs = [root / arch / case / str(s) for s in range(len(configs))]
            for c, d in zip(configs, dirs):
                engine.fit(c, d, data=data, progress=False, teachers=teachers)
            done[arch, case] = (configs, dirs)
    return done


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
@pytest.mark.parametrize("strategy", ["eager", "fused", "compiled"])
def test_every_strategy_gives_each_member_its_separate_run(strategy, arch, separate_runs, data, tmp_path):
    teachers = teacher_networks(arch)
    for case in OBJECTIVE_CASES:
        configs, singles = separate_runs[arch, case]
        together = [tmp_path / case / str(s) for s in range(len(configs))]
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a compile fallback would hide the strategy
            summaries = engine.train(configs, together, data=data, progress=False, strategy=strategy,
                                     teachers=teachers)
        assert [s["group_size"] for s in summaries] == [3, 3, 3]
        for single, member in zip(singles, together):
            assert_same_run(single, member, rel=1e-4 if strategy != "compiled" else 1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs (strategy 'compiled' on CUDA) need a CUDA "
                    "device; benchmarks/gpu_check.py compares every strategy on a GPU")
def test_compiled_with_cuda_graphs_matches_eager_on_cuda(tiny_set, tmp_path):
    data = DeviceData(tiny_set, "cuda", rotation=15)
    config = recipe(lr=STRATEGY_LR)
    for strategy in ("eager", "compiled"):
        engine.fit(config, tmp_path / strategy, data=data, device="cuda", progress=False, strategy=strategy)
    assert_same_run(tmp_path / "eager", tmp_path / "compiled", rel=2e-2)  # bf16 autocast on both


def test_compiled_falls_back_to_eager_when_compilation_fails(tmp_path, data, monkeypatch):
    config = recipe(objective="cskd")
    engine.fit(config, tmp_path / "eager", data=data, progress=False)

    def broken_compile(module, **kwargs):
        def compiled(x):
            raise RuntimeError("inductor backend failed (simulated)")
        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*simulated.*without compilation"):
        engine.fit(config, tmp_path / "fallback", data=data, progress=False, strategy="compiled")
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("eager", "fallback"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the eager module computed every step


def test_unknown_strategy_and_missing_teacher_are_named(tmp_path, data):
    with pytest.raises(ValueError, match="unknown strategy 'fast'.*eager, compiled, fused"):
        engine.fit(recipe(), tmp_path / "a", data=data, progress=False, strategy="fast")
    with pytest.raises(ValueError, match="needs its teacher 't9'.*runs.load_teachers"):
        engine.fit(recipe(objective="kd", objective_args={"teacher": "t9"}), tmp_path / "b", data=data,
                   progress=False)
    assert engine.default_strategy("cpu") == engine.default_strategy("cuda") == "eager"


def test_engine_runs_every_forward_in_order(data):
    """CS-KD: anchors first, then the same-class partners (train mode, no gradient); KD: the teacher
    in eval mode without gradients on the student's images. Only the student gets gradients."""
    for objective, args in (("cskd", {}), ("kd", {"teacher": "t0"})):
        teachers = teacher_networks()
        teachers["t0"].train()  # the engine must switch it to eval mode
        member = engine.Member(recipe(objective=objective, objective_args=args), data, torch.device("cpu"), teachers)
        run = engine.Engine([member], data, torch.device("cpu"), "eager")
        calls = []
        member.model.register_forward_pre_hook(
            lambda m, inputs: calls.append(("student", inputs[0].clone(), m.training, torch.is_grad_enabled())))
        teachers["t0"].register_forward_pre_hook(
            lambda m, inputs: calls.append(("teacher", inputs[0].clone(), m.training, torch.is_grad_enabled())))
        member.generator.manual_seed(0)
        batch = next(data.train_batches(32, member.generator))
        run._step(run.units[0], [batch], 0.1)
        assert calls[0][0] == "student" and torch.equal(calls[0][1], batch.images) and calls[0][2:] == (True, True)
        if objective == "cskd":
            assert [c[0] for c in calls] == ["student", "student"] and calls[1][2:] == (True, False)
            assert batch.partner_logits is not None and not batch.partner_logits.requires_grad
        else:
            assert [c[0] for c in calls] == ["student", "teacher"] and calls[1][2:] == (False, False)
            assert torch.equal(calls[1][1], batch.images)
            assert all(p.grad is None for p in teachers["t0"].parameters())
        assert all(p.grad is not None for p in member.model.parameters())


# --------------------------------------------------------------------------- resume, divergence, devices

def _kill_during_training(folder_of, cmd, tmp_path, seed: int):
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
                                      "CDLIB_PROGRESS": "0"})
    deadline = time.time() + 300
    while not (folder_of / engine.CHECKPOINT).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(seed).uniform(0.0, 1.0))  # somewhere inside a later epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()


TRAIN_THREE = """
import sys, json, torch
torch.set_num_threads(1)
from pathlib import Path
from cdlib.core import engine
from cdlib.core.config import TrainConfig
from cdlib.core.data import DeviceData, synthetic
data = DeviceData(synthetic(superclasses=2, classes_per_superclass=2, train_per_class=12, test_per_class=8, size=16),
                  "cpu", rotation=15)
configs = [TrainConfig.from_dict(c) for c in json.loads(sys.argv[1])]
engine.train(configs, [Path(d) for d in json.loads(sys.argv[2])], data=data, progress=False, strategy=sys.argv[3])
"""


@pytest.mark.parametrize("strategy", ["eager", "fused"])
def test_three_runs_resume_after_sigkill_to_the_uninterrupted_weights(strategy, tmp_path, data):
    configs = [recipe(objective="pskd", seed=s, epochs=8) for s in range(3)]
    straight = [tmp_path / f"straight-{s}" for s in range(3)]
    engine.train(configs, straight, data=data, progress=False, strategy=strategy)
    killed = [tmp_path / f"killed-{s}" for s in range(3)]
    cmd = [sys.executable, "-c", TRAIN_THREE, json.dumps([c.to_dict() for c in configs]),
           json.dumps([str(d) for d in killed]), strategy]
    _kill_during_training(killed[0], cmd, tmp_path, seed=1)
    assert not all((d / "summary.json").exists() for d in killed), "finished before the kill: nothing was tested"
    left = {d.name: sorted(p.name for p in d.iterdir()) for d in killed}  # where the kill landed, should this fail
    engine.train(configs, killed, data=data, progress=False, strategy=strategy)
    for a, b in zip(straight, killed):
        wa, wb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), (
            f"{b.name}: weights {relative_distance(_flat(wb), _flat(wa)):.1e} apart (relative); "
            f"the kill left {left}")
        assert [json.loads(x)["epoch"] for x in (b / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))


@pytest.mark.parametrize("temporary_file", ["whole", "damaged"])
def test_a_kill_between_the_renames_of_a_groups_checkpoints(temporary_file, tmp_path, data, monkeypatch):
    """Killed between the renames of two members' checkpoints (members at epochs 2 and 1, a metrics
    line past the second's checkpoint). With the second's new checkpoint whole under its temporary
    name, the rename is completed and the group resumes to the uninterrupted weights, bitwise.
    Damaged, it is ignored: the members resume apart (a single ``fit`` from a checkpoint written by
    a fused group, then the other) and end as the uninterrupted runs to rounding (a fused group of
    another size sums in another order)."""
    configs = [recipe(objective="cskd", seed=s, epochs=3) for s in range(2)]
    straight = [tmp_path / f"straight-{i}" for i in range(2)]
    engine.train(configs, straight, data=data, progress=False, strategy="fused")

    class Killed(Exception):
        pass

    renames = []
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == engine.CHECKPOINT:
            renames.append(dst)
            if len(renames) == 4:
                raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    killed = [tmp_path / f"killed-{i}" for i in range(2)]
    with pytest.raises(Killed):
        engine.train(configs, killed, data=data, progress=False, strategy="fused")
    monkeypatch.setattr(os, "replace", real_replace)
    assert [torch.load(d / engine.CHECKPOINT, weights_only=True)["epoch"] for d in killed] == [2, 1]
    assert len((killed[1] / "metrics.jsonl").read_text().splitlines()) == 2  # a line past its checkpoint
    cut = killed[1] / (engine.CHECKPOINT + ".tmp")
    if temporary_file == "whole":
        engine.train(configs, killed, data=data, progress=False, strategy="fused")
        for a, b in zip(straight, killed):
            wa, wb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
            assert all(torch.equal(wa[k], wb[k]) for k in wa)
            assert json.loads((b / "summary.json").read_text())["group_size"] == 2
    else:
        cut.write_bytes(cut.read_bytes()[:1000])
        engine.fit(configs[1], killed[1], data=data, progress=False)  # eager, from a fused checkpoint
        engine.train(configs, killed, data=data, progress=False, strategy="fused")
        for a, b in zip(straight, killed):
            assert_same_run(a, b)
        assert [json.loads((d / "summary.json").read_text())["group_size"] for d in killed] == [1, 1]
    assert not cut.exists()


def test_a_diverging_member_stops_and_the_others_finish(tmp_path, data, monkeypatch):
    class NaNAt(objectives.CrossEntropy):
        name = "nan_at"

        def __init__(self, step=None):
            self.step, self.calls = step, 0

        def loss(self, logits, batch, epoch):
            self.calls += 1
            loss = super().loss(logits, batch, epoch)
            return loss * float("nan") if self.calls == self.step else loss

    monkeypatch.setitem(objectives.OBJECTIVES, "nan_at", NaNAt)
    configs = [recipe(objective="nan_at", seed=0), recipe(objective="nan_at", objective_args={"step": 4}, seed=1)]
    engine.fit(configs[0], tmp_path / "alone", data=data, progress=False)
    members = [tmp_path / "m0", tmp_path / "m1"]
    for strategy in ("fused", "eager"):
        with pytest.raises(engine.MembersDivergedError, match=r"epoch 2 \(1-based\), step 1 of that epoch") as err:
            engine.train(configs, members, data=data, progress=False, strategy=strategy)
        assert set(err.value.failures) == {configs[1].run_id()}
        assert_same_run(tmp_path / "alone", members[0])
        assert not (members[1] / "summary.json").exists()
        assert torch.load(members[1] / engine.CHECKPOINT, weights_only=True)["epoch"] == 1
        for d in members:  # train the pair again with the other strategy
            for f in d.iterdir():
                f.unlink()


def test_a_checkpoint_resumes_only_on_its_device_type(tmp_path, data):
    config = recipe(epochs=2)
    folder = tmp_path / "run"
    engine.fit(config.replace(epochs=1), tmp_path / "one", data=data, progress=False)
    state = {"config": config.to_dict(), "epoch": 1, "device_type": "cuda"}
    folder.mkdir()
    torch.save(state, folder / engine.CHECKPOINT)
    with pytest.raises(RuntimeError, match="written on cuda and cannot resume exactly on cpu.*delete it"):
        engine.fit(config, folder, data=data, progress=False)
    assert (folder / engine.CHECKPOINT).is_file()  # refused, not removed


# --------------------------------------------------------------------------- numerics of the CUDA path, on the CPU

def test_augmentation_ignores_the_callers_autocast(data):
    """On CUDA the engine runs under bf16 autocast; affine_grid in bf16 moves rotated pixels."""
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
    fused_model = fused.fuse([model, model])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_model(fused.stack_members([x, x])).dtype == torch.float32


def test_true_fp32_turns_tf32_off_and_restores_it():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    with true_fp32():
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


# --------------------------------------------------------------------------- the fused network

@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "densenet121"])
def test_fused_network_is_the_members_side_by_side(arch):
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(build_model(arch, 4, 0.0625))
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in members]
    network = fused.fuse(members)
    for i, state in enumerate(states):  # fusing copies the members' tensors exactly
        back = fused.member_state(network, 3, i)
        assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)
    xs = [torch.randn(5, 3, 16, 16) for _ in members]
    stacked = torch.stack(xs, 1).view(5, 9, 16, 16)
    for mode in ("train", "eval"):  # train mode: per-member batch statistics and running stats
        network.train(mode == "train")
        for m in members:
            m.train(mode == "train")
        out = network(stacked)
        assert out.shape == (5, 3, 4)
        for i, (m, x) in enumerate(zip(members, xs)):
            # Grouped and plain convolutions sum in other orders: through ResNet-50 on an AVX2 CPU the
            # logits lie 2e-5 of their norm apart (one of them 6e-4 of its own small value); another
            # member's weights or batch would lie 0.4 to 2 apart.
            assert relative_distance(out[:, i], m(x)) < 1e-4
    for i, m in enumerate(members):
        back, ref = fused.member_state(network, 3, i), m.state_dict()
        for k in ref:
            torch.testing.assert_close(back[k], ref[k], rtol=1e-4, atol=1e-6)


def test_channels_last_fused_network_matches():
    """The CUDA layout (channels_last input built in NHWC, DenseNet's per-member concatenation in
    NHWC) computes what the contiguous layout does."""
    members = []
    for seed in range(2):
        torch.manual_seed(seed)
        members.append(build_model("densenet121", 4, 0.0625))
    network = fused.fuse(members)
    xs = [torch.randn(3, 3, 16, 16) for _ in members]
    plain = fused.stack_members(xs)
    last = fused.stack_members(xs, channels_last=True)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(plain, last)
    expected = network(plain)
    network = network.to(memory_format=torch.channels_last)
    torch.testing.assert_close(network(last), expected, rtol=1e-4, atol=1e-5)


def test_recipes_are_checked_and_groups_keep_the_order():
    with pytest.raises(ValueError, match="may differ only in name, seed, objective_args.*arch"):
        engine.check_recipe([recipe(), recipe(arch="resnet34", seed=1)])
    with pytest.raises(ValueError, match="listed twice"):
        engine.check_recipe([recipe(), recipe()])
    teachers = [recipe(arch="resnet34", seed=s) for s in range(5)]
    students = [recipe(objective="kd", seed=s, objective_args={"teacher": t.run_id()}) for s, t in enumerate(teachers)]
    others = [recipe(seed=s) for s in range(3)]
    groups = runs.plan_groups(teachers + students + others, group_size=2)
    assert [len(g) for g in groups] == [2, 2, 1, 2, 2, 1, 2, 1]
    assert [c for g in groups for c in g][:5] == teachers  # teachers first, order kept
    assert all(len({engine.recipe_key(c) for c in g}) == 1 for g in groups)
    assert runs.default_group_size("eager", "resnet18") == 1 and runs.default_group_size("fused", "resnet18") > 1
    assert [len(g) for g in runs.plan_groups(others)] == [1, 1, 1]  # default strategy: one run at a time


def test_the_run_store_trains_groups_and_skips_finished_runs(tmp_path, data, monkeypatch):
    configs = [recipe(seed=s) for s in range(3)]
    runs.get_or_train(configs[0], progress=False, data=data)
    finished = runs.run_dir(configs[0]) / "summary.json"
    before = finished.stat().st_mtime_ns
    calls = []
    real = engine.train
    monkeypatch.setattr(engine, "train", lambda cs, *a, **k: calls.append((len(cs), k["strategy"])) or real(cs, *a, **k))
    done = runs.get_or_train_many(configs, progress=False, data=data, group_size=3, strategy="fused")
    assert calls == [(2, "fused")] and finished.stat().st_mtime_ns == before
    assert [r.config for r in done] == configs
    assert json.loads((done[1].dir / "summary.json").read_text())["group_size"] == 2


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
    assert "cdlib.core.engine" in graph["cdlib.core.runs"]  # the graph sees imports

    def reaches(start, goal, seen):
        return any(n == goal or (n not in seen and not seen.add(n) and reaches(n, goal, seen)) for n in graph[start])

    circles = sorted(m for m in graph if reaches(m, m, set()))
    assert not circles, f"import circles through {circles}"
    core = [m for m in modules if m.startswith("cdlib.core.")]
    upward = {m: sorted(i for i in graph[m] if not i.startswith("cdlib.core.") and i not in ("cdlib.paths", "cdlib.errors")) for m in core}
    assert not any(upward.values()), f"the core imports the layers above it: {upward}"
    assert not any("cdlib.scaleout" in i for m in modules if m.startswith("cdlib.experiments.") for i in graph[m]
                   if m != "cdlib.experiments.pipeline"), "only the pipeline drives the scale-out layer"
