"""Fused group training (cdlib.group) against separate ``fit`` runs, resume, teacher cache, estimate.

Everything runs on the CPU at tiny sizes: 48 training images (batches of 32 and 16),
32 test images, 4 classes, width-1/16 networks, 2-3 epochs. Group and separate runs
compute the same function; their kernels sum in a different order, so results agree
to float rounding. Where an objective's state depends on argmaxes (CD's confusion
EMA), a near-tied logit may flip and the comparison is looser.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cdlib import estimate, group, objectives, runs
from cdlib.config import TrainConfig
from cdlib.data import DeviceData, synthetic
from cdlib.models import build_model
from cdlib.profiles import get_profile
from cdlib.train import CHECKPOINT, fit

FILES = {"config.json", "metrics.jsonl", "model.pt", "test_logits.npy", "confusions.npz", "summary.json"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on two shared cores the tiny networks run ~10x faster than with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_set():
    return synthetic(superclasses=2, classes_per_superclass=2, train_per_class=12, test_per_class=8, size=16)


@pytest.fixture(scope="module")
def data(tiny_set):
    return DeviceData(tiny_set, "cpu", rotation=15)


def recipe(**changes) -> TrainConfig:
    base = TrainConfig(name="g", dataset="synthetic", arch="resnet18", width=0.0625, epochs=2, batch_size=32)
    return base.replace(**changes)


def _flat(state):
    return torch.cat([v.flatten().double() for v in state.values() if v.is_floating_point()])


def assert_same_run(single: Path, grouped: Path, tight: bool = True):
    """``grouped`` (a group member's folder) ends as ``single`` (a separate fit) does, to rounding."""
    names = lambda d: {p.name for p in d.iterdir()} - {"config.json", "attempts.jsonl"}  # noqa: E731
    assert names(grouped) == names(single) == FILES - {"config.json"}
    a = torch.load(single / "model.pt", weights_only=True)
    b = torch.load(grouped / "model.pt", weights_only=True)
    assert list(a) == list(b) and all(a[k].shape == b[k].shape for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a if not a[k].is_floating_point())  # BN batch counters
    rel = ((_flat(a) - _flat(b)).norm() / _flat(a).norm()).item()
    assert rel < (1e-4 if tight else 2e-2), rel
    ma = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (grouped / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in ma] == [m["epoch"] for m in mb]
    for x, y in zip(ma, mb):
        assert set(y) - {"group_size"} == set(x) - {"group_size"}
        assert y["lr"] == x["lr"]
        for k in ("train_loss", "test_loss"):
            assert y[k] == pytest.approx(x[k], rel=1e-4 if tight else 2e-2)
        for k in ("train_top1", "test_top1", "test_top5"):  # one image (of 32 or 48) may flip on a near-tie
            assert abs(y[k] - x[k]) <= (100 / 32 + 1e-9 if tight else 10), (k, x[k], y[k])
    la, lb = np.load(single / "test_logits.npy"), np.load(grouped / "test_logits.npy")
    assert np.abs(la - lb).max() <= (1e-4 if tight else 2e-2) * np.abs(la).max()
    with np.load(single / "confusions.npz") as ca, np.load(grouped / "confusions.npz") as cb:
        for split in ("train", "test"):
            diff = np.abs(ca[split].astype(int) - cb[split].astype(int)).sum()
            assert diff <= (4 if tight else 4 * len(ma)), (split, diff)  # a flip moves 2 counts
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (single, grouped))
    assert set(sb) - {"group_size"} == set(sa) - {"group_size"} and sb["run_id"] == sa["run_id"]


def separate(configs, folder: Path, data) -> list[Path]:
    dirs = [folder / f"single-{i}" for i in range(len(configs))]
    for c, d in zip(configs, dirs):
        fit(c, d, progress=False, data=data)
    return dirs


# --------------------------------------------------------------------------- the fused network

@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "densenet121"])
def test_fused_network_is_the_members_side_by_side(arch):
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(build_model(arch, 4, 0.0625))
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in members]
    fused = group.fuse(members)
    for i, state in enumerate(states):  # fusing copies the members' tensors exactly
        back = group.member_state(fused, 3, i)
        assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)
    xs = [torch.randn(5, 3, 16, 16) for _ in members]
    stacked = torch.stack(xs, 1).view(5, 9, 16, 16)
    for mode in ("train", "eval"):  # train mode: per-member batch statistics and running stats
        fused.train(mode == "train")
        for m in members:
            m.train(mode == "train")
        out = fused(stacked)
        assert out.shape == (5, 3, 4)
        for i, (m, x) in enumerate(zip(members, xs)):
            torch.testing.assert_close(out[:, i], m(x), rtol=1e-4, atol=1e-5)
    for i, m in enumerate(members):
        back, ref = group.member_state(fused, 3, i), m.state_dict()
        for k in ref:
            torch.testing.assert_close(back[k], ref[k], rtol=1e-4, atol=1e-6)


def test_channels_last_fused_network_matches():
    """The CUDA layout (channels_last input built in NHWC, DenseNet's per-member concatenation in
    NHWC) computes what the contiguous layout does."""
    members = []
    for seed in range(2):
        torch.manual_seed(seed)
        members.append(build_model("densenet121", 4, 0.0625))
    fused = group.fuse(members)
    xs = [torch.randn(3, 3, 16, 16) for _ in members]
    plain = group.stack_members(xs)
    last = group.stack_members(xs, channels_last=True)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(plain, last)
    expected = fused(plain)
    fused = fused.to(memory_format=torch.channels_last)
    torch.testing.assert_close(fused(last), expected, rtol=1e-4, atol=1e-5)


def test_groups_check_their_members_and_keep_the_order():
    with pytest.raises(ValueError, match="may differ only in name, seed, objective_args.*arch"):
        group.check_group([recipe(), recipe(arch="resnet34", seed=1)])
    with pytest.raises(ValueError, match="same run twice"):
        group.check_group([recipe(), recipe()])
    teachers = [recipe(arch="resnet34", seed=s) for s in range(5)]
    students = [recipe(objective="kd", seed=s, objective_args={"teacher": t.run_id()}) for s, t in enumerate(teachers)]
    others = [recipe(seed=s) for s in range(3)]
    groups = group.plan_groups(teachers + students + others, group_size=2)
    assert [len(g) for g in groups] == [2, 2, 1, 2, 2, 1, 2, 1]
    assert [c for g in groups for c in g][:5] == teachers  # teachers first, order kept
    assert all(len({group.group_key(c) for c in g}) == 1 for g in groups)
    assert group.default_group_size("cpu", "resnet18") == 1


# --------------------------------------------------------------------------- group == separate fits

CASES = {
    "resnet18-ce": ("resnet18", "ce", [{}, {}, {}], 2, True),
    "densenet121-pskd": ("densenet121", "pskd", [{"alpha_T": 0.8}, {"alpha_T": 0.5}], 2, True),
    # CD's EMA is built from argmaxes: a near-tie may flip between the two, so compare loosely.
    "resnet18-cd": ("resnet18", "cd", [{"schedule": [1, 2]}, {"schedule": [1, 2], "targets": "diagonal"}], 3, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_group_equals_separate_runs(case, tmp_path, data, monkeypatch):
    arch, objective, args, epochs, tight = CASES[case]
    configs = [recipe(arch=arch, objective=objective, objective_args=a, seed=s, epochs=epochs)
               for s, a in enumerate(args)]
    singles = separate(configs, tmp_path, data)
    if case == "resnet18-ce":
        # Through the run store: a finished run is skipped, the others train as one group.
        runs.get_or_train(configs[0], progress=False, data=data)
        finished = runs.run_dir(configs[0]) / "summary.json"
        before = finished.stat().st_mtime_ns
        calls = []
        real = group.fit_group
        monkeypatch.setattr(group, "fit_group", lambda cs, *a, **k: calls.append(len(cs)) or real(cs, *a, **k))
        done = runs.get_or_train_many(configs, progress=False, data=data, group_size=3)
        assert calls == [2] and finished.stat().st_mtime_ns == before
        assert [r.config for r in done] == configs
        grouped = [r.dir for r in done]
        assert json.loads((grouped[1] / "summary.json").read_text())["group_size"] == 2
    else:
        grouped = [tmp_path / f"group-{i}" for i in range(len(configs))]
        group.fit_group(configs, grouped, progress=False, data=data)
        for d, c in zip(grouped, configs):
            (d / "config.json").write_text(json.dumps(c.to_dict()))
    for single, member in zip(singles, grouped):
        assert_same_run(single, member, tight)


# --------------------------------------------------------------------------- resume

def test_group_resumes_after_interruption(tmp_path, data, monkeypatch):
    """Killed between two members' checkpoints (members at epochs 2 and 1, a stale metrics line):
    the group resumes (the member behind catches up, then they are fused again) and ends as the
    uninterrupted group; a plain ``fit`` resumes a member from its group checkpoint as well.
    CS-KD makes two network calls per step (two rendezvous rounds)."""
    configs = [recipe(objective="cskd", seed=s, epochs=3) for s in range(2)]
    straight = [tmp_path / f"straight-{i}" for i in range(2)]
    group.fit_group(configs, straight, progress=False, data=data)

    class Killed(Exception):
        pass

    saves = []
    real_save = group.atomic_save

    def save(obj, path):
        if path.name == CHECKPOINT:
            saves.append(path)
            if len(saves) == 4:
                raise Killed
        real_save(obj, path)

    monkeypatch.setattr(group, "atomic_save", save)
    killed = [tmp_path / f"killed-{i}" for i in range(2)]
    with pytest.raises(Killed):
        group.fit_group(configs, killed, progress=False, data=data)
    monkeypatch.setattr(group, "atomic_save", real_save)
    state = [torch.load(d / CHECKPOINT, weights_only=True)["epoch"] for d in killed]
    assert state == [2, 1]
    assert len((killed[1] / "metrics.jsonl").read_text().splitlines()) == 2  # a line past its checkpoint

    alone = tmp_path / "alone"
    shutil.copytree(killed[1], alone)
    fit(configs[1], alone, progress=False, data=data)  # fit resumes from a group checkpoint
    assert_same_run(alone, straight[1])

    group.fit_group(configs, killed, progress=False, data=data)
    for a, b in zip(straight, killed):
        assert_same_run(a, b)


def test_a_diverging_member_is_dropped_and_the_others_finish(tmp_path, data, monkeypatch):
    class NaNAt(objectives.CrossEntropy):
        name = "nan_at"

        def __init__(self, step=None):
            self.step, self.calls = step, 0

        def loss(self, model, batch, epoch):
            loss, logits = super().loss(model, batch, epoch)
            self.calls += 1
            return (loss * float("nan") if self.calls == self.step else loss), logits

    monkeypatch.setitem(objectives.OBJECTIVES, "nan_at", NaNAt)
    configs = [recipe(objective="nan_at", seed=0), recipe(objective="nan_at", objective_args={"step": 4}, seed=1)]
    singles = separate(configs[:1], tmp_path, data)
    members = [tmp_path / "m0", tmp_path / "m1"]
    with pytest.raises(group.GroupDivergedError, match=r"epoch 2 \(1-based\), step 1 of that epoch") as err:
        group.fit_group(configs, members, progress=False, data=data)
    assert set(err.value.failures) == {configs[1].run_id()}
    assert_same_run(singles[0], members[0])
    assert not (members[1] / "summary.json").exists()
    assert torch.load(members[1] / CHECKPOINT, weights_only=True)["epoch"] == 1


# --------------------------------------------------------------------------- KD teachers

def test_kd_teachers_fused_shared_and_cached_are_exact(tmp_path, tiny_set):
    data = DeviceData(tiny_set, "cpu", rotation=0, pad=1)  # 3 x 3 crops x 2 flips = 18 views per image

    # The views replayed from the generator are augment's: same batches, same generator state after.
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    with_views = list(group.batches_with_views(data, 32, g1))
    plain = list(data.train_batches(32, g2))
    assert torch.equal(g1.get_state(), g2.get_state())
    for (batch, views), ref in zip(with_views, plain):
        assert torch.equal(batch.images, ref.images) and torch.equal(batch.indices, ref.indices)
        assert torch.equal(group.view_images(data, batch.indices, views), batch.images)

    # Width 1/8 here: at 1/16 one seed's first layers are so ill-conditioned (a 4-channel stem before
    # BN) that float rounding alone moves its weights by 1e-3, about as much as a wrong teacher does.
    teachers = [recipe(name="teacher", rotation=0, epochs=1, seed=s, width=0.125) for s in range(2)]
    for t in teachers:
        runs.get_or_train(t, progress=False, data=data)
    kd = lambda seed, t: recipe(objective="kd", rotation=0, seed=seed, width=0.125,  # noqa: E731
                                objective_args={"teacher": teachers[t].run_id(), "T": 4.0})
    s0, s1, s2 = kd(0, 0), kd(1, 1), kd(2, 0)
    singles = dict(zip("012", separate([s0, s1, s2], tmp_path, data)))

    fused = [tmp_path / "fused-0", tmp_path / "fused-1"]  # two teachers: one fused teacher network
    group.fit_group([s0, s1], fused, progress=False, data=data)
    assert_same_run(singles["0"], fused[0])
    assert_same_run(singles["1"], fused[1])

    shared = [tmp_path / "shared-0", tmp_path / "shared-2"]  # one teacher: run once on both batches
    group.fit_group([s0, s2], shared, progress=False, data=data)
    assert_same_run(singles["0"], shared[0])
    assert_same_run(singles["2"], shared[1])

    caches: dict = {}
    cached = [tmp_path / "cached-0", tmp_path / "cached-2"]
    group.fit_group([s0, s2], cached, progress=False, data=data, teacher_cache=caches)
    assert_same_run(singles["0"], cached[0])
    assert_same_run(singles["2"], cached[1])
    cache = caches[teachers[0].run_id()]
    assert cache.served == 2 * 2 * 48 and 0 < cache.computed < cache.served  # views were reused
    idx, views = cache.filled.nonzero(as_tuple=True)
    teacher = runs.load_model(teachers[0].run_id())
    with torch.no_grad():
        direct = teacher(group.view_images(data, idx, views))
    torch.testing.assert_close(cache.table[idx, views], direct, rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="rotation"):
        group.TeacherCache(teacher, DeviceData(tiny_set, "cpu", rotation=15))


# --------------------------------------------------------------------------- estimate

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
