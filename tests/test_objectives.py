"""Objectives against plain float64 references written from the formulas (each method's paper; CD: Section 4.2).

References loop over samples and classes in python floats, so they share no code
with the vectorised implementation. Models are a linear layer on flattened
3x8x8 images; ``trainer`` is a SimpleNamespace holding a run's config, model,
generator, data and KD teacher, and ``forward_and_loss`` does for one batch what
the engine does: the student's forward, the forwards the objective declares, the loss.
"""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from cdlib.core.config import TrainConfig
from cdlib.core.data import Batch
from cdlib.errors import ConfigError
from cdlib.core.losses import EpochEnd, soft_loss
from cdlib.core.objectives import CD_SCHEDULES, OBJECTIVES, cd_ema_updates, cd_phase, make_objective

K = 5
N = 40


# ---------------------------------------------------------------- fixtures

def make_model(K=K, seed=0, scale=3.0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, K))
    with torch.no_grad():
        model[1].weight.mul_(scale)  # spread the logits so the losses are far from uniform
    return model


def make_trainer(epochs=10, seed=0, K=K, N=N):
    g = torch.Generator().manual_seed(1000 + seed)
    labels = (torch.arange(N) % K)[torch.randperm(N, generator=g)]
    images = torch.randn(N, 3, 8, 8, generator=g)

    def augment(indices, generator):
        flip = torch.rand(len(indices), generator=generator) < 0.5
        x = images[indices]
        data.augment_calls.append(indices.clone())
        return torch.where(flip[:, None, None, None], x.flip(3), x)

    data = SimpleNamespace(train_labels=labels, num_train=N, num_classes=K, augment=augment,
                           augment_calls=[])
    return SimpleNamespace(config=SimpleNamespace(epochs=epochs, seed=seed), model=make_model(K, seed),
                           generator=torch.Generator().manual_seed(seed), data=data,
                           teacher=make_model(seed=99).eval().requires_grad_(False))


def setup(objective, trainer):
    objective.setup(trainer.config, trainer.data.train_labels, trainer.data.num_classes)
    return objective


def make_batch(trainer, B=8, seed=0):
    idx = torch.randperm(trainer.data.num_train, generator=torch.Generator().manual_seed(seed))[:B]
    return Batch(trainer.data.augment(idx, trainer.generator), trainer.data.train_labels[idx], idx)


def forward_and_loss(objective, trainer, batch, epoch):
    """One member's step as the engine runs it, up to the loss: returns (loss, logits)."""
    logits = trainer.model(batch.images)
    if "partner" in objective.extra_forwards:
        partners = trainer.data.augment(objective.partners(batch.labels, trainer.generator), trainer.generator)
        with torch.no_grad():
            batch.partner_logits = trainer.model(partners)
    if "teacher" in objective.extra_forwards:
        with torch.no_grad():
            batch.teacher_logits = trainer.teacher(batch.images)
    return objective.loss(logits, batch, epoch), logits


# ---------------------------------------------------------------- plain references

def rows(t):
    return t.double().tolist()


def ref_softmax(z, T=1.0):
    m = max(z)
    e = [math.exp((v - m) / T) for v in z]
    s = sum(e)
    return [v / s for v in e]


def ref_kl(p, q):
    return sum(pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, q) if pk > 0)


def ref_xent(p, q):
    return -sum(pk * math.log(qk) for pk, qk in zip(p, q))


def onehot(y, K=K):
    return [1.0 if k == y else 0.0 for k in range(K)]


def ref_ce(logits, labels):
    return sum(-math.log(ref_softmax(z)[y]) for z, y in zip(rows(logits), labels.tolist())) / len(labels)


def ref_distill(targets, logits, T):
    """T^2 * batch-mean KL(target_i || softmax(z_i / T))."""
    zs = rows(logits)
    return T * T * sum(ref_kl(t, ref_softmax(z, T)) for t, z in zip(targets, zs)) / len(zs)


def close(a, b, rel=2e-5):
    return float(torch.as_tensor(a).detach()) == pytest.approx(b, rel=rel, abs=1e-6)


# ---------------------------------------------------------------- registry and helper

def test_registry_and_json_args():
    assert set(OBJECTIVES) == {"ce", "ls", "kd", "tfkd_reg", "cskd", "pskd", "cd"}
    args = json.loads(json.dumps({"schedule": "cd200", "targets": "diagonal"}))
    assert make_objective("cd", args).schedule == CD_SCHEDULES["cd200"]
    assert make_objective("cd", {"schedule": [2, 3]}).schedule == [2, 3]
    with pytest.raises(ValueError, match="unknown objective"):
        make_objective("nope")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_soft_loss_is_batch_mean_kl_times_T2(seed, T):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, K, generator=g) * 3
    target = torch.softmax(torch.randn(6, K, generator=g) * 2, 1)
    target[0] = torch.tensor(onehot(2))  # zeros in the target: 0 log 0 = 0
    assert close(soft_loss(target, logits, T), ref_distill(rows(target), logits, T))
    xent = T * T * sum(ref_xent(t, ref_softmax(z, T)) for t, z in zip(rows(target), rows(logits))) / 6
    assert close(soft_loss(target, logits, T, kl=False), xent)


# ---------------------------------------------------------------- CE, LS, Tf-KD_reg

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ce_ls_tfkd_match_references(seed):
    trainer = make_trainer(seed=seed)
    batch = make_batch(trainer, seed=seed)
    labels = batch.labels.tolist()
    logits = trainer.model(batch.images)

    loss, out = forward_and_loss(make_objective("ce"), trainer, batch, 0)
    assert torch.equal(out, logits) and close(loss, ref_ce(logits, batch.labels))

    eps = 0.1
    ls_targets = [[(1 - eps) * o + eps / K for o in onehot(y)] for y in labels]
    ref = sum(ref_xent(t, ref_softmax(z)) for t, z in zip(ls_targets, rows(logits))) / len(labels)
    assert close(make_objective("ls").loss(logits, batch, 0), ref)

    T, a = 20.0, 0.1
    p_d = [ref_softmax([0.99 if k == y else 0.01 / (K - 1) for k in range(K)], T) for y in labels]
    ref = (1 - a) * ref_ce(logits, batch.labels) + a * ref_distill(p_d, logits, 1.0)
    assert close(make_objective("tfkd_reg").loss(logits, batch, 0), ref)


# ---------------------------------------------------------------- KD

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kd_matches_reference_and_only_student_gets_gradients(seed):
    trainer = make_trainer(seed=seed)
    kd = setup(make_objective("kd", {"teacher": "resnet152-seed0"}), trainer)
    assert kd.extra_forwards == ("teacher",) and kd.teacher == "resnet152-seed0"  # a run name, not a network
    teacher = trainer.teacher

    batch = make_batch(trainer, seed=seed)
    loss, logits = forward_and_loss(kd, trainer, batch, 0)
    T = 2.0
    targets = [ref_softmax(z, T) for z in rows(teacher(batch.images))]
    assert close(loss, 0.15 * ref_ce(logits, batch.labels) + 0.85 * ref_distill(targets, logits, T))

    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters())


# ---------------------------------------------------------------- CS-KD

def test_cskd_pairs_share_the_anchor_class_and_cover_it():
    trainer = make_trainer()
    cskd = setup(make_objective("cskd"), trainer)
    labels = trainer.data.train_labels
    drawn = set()
    for _ in range(200):
        anchors = torch.randint(0, N, (64,), generator=trainer.generator)
        pairs = cskd.partners(labels[anchors], trainer.generator)
        assert torch.equal(labels[pairs], labels[anchors])
        drawn.update(zip(anchors.tolist(), pairs.tolist()))
    # Every same-class partner, the anchor itself included, is drawn for every anchor.
    assert drawn == {(i, j) for i in range(N) for j in range(N) if labels[i] == labels[j]}


def test_cskd_pairs_are_reproducible_from_the_generator():
    trainer = make_trainer()
    cskd = setup(make_objective("cskd"), trainer)
    labels = trainer.data.train_labels[:16]
    draws = []
    for seed in (7, 7, 8):
        trainer.generator.manual_seed(seed)
        draws.append(cskd.partners(labels, trainer.generator))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cskd_loss_reference_two_forwards_and_detached_partner(seed):
    trainer = make_trainer(seed=seed)
    cskd = setup(make_objective("cskd"), trainer)
    assert cskd.extra_forwards == ("partner",)
    batch = make_batch(trainer, seed=seed)
    forwards = []
    model = trainer.model
    model.register_forward_pre_hook(lambda m, inputs: forwards.append(inputs[0].detach().clone()))

    loss, logits = forward_and_loss(cskd, trainer, batch, 0)
    assert len(forwards) == 2 and torch.equal(forwards[0], batch.images)  # anchors first, partners apart
    partner_idx = trainer.data.augment_calls[-1]
    assert torch.equal(trainer.data.train_labels[partner_idx], batch.labels)
    partner_images = forwards[1]
    T, lam = 4.0, 1.0
    targets = [ref_softmax(z, T) for z in rows(model(partner_images))]
    assert close(loss, ref_ce(logits, batch.labels) + lam * ref_distill(targets, logits, T))

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    def explicit(partner_logits):
        z = model(batch.images)
        target = torch.softmax(partner_logits / T, 1)
        kl = (target * (target.log() - torch.log_softmax(z / T, 1))).sum(1).mean()
        return nn.functional.cross_entropy(z, batch.labels) + lam * T * T * kl

    got = grads(loss)
    detached = grads(explicit(model(partner_images).detach()))
    through_partner = grads(explicit(model(partner_images)))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, detached))
    assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, through_partner))


# ---------------------------------------------------------------- PS-KD

def random_table(seed, N=N, K=K):
    return torch.softmax(torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 2, 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_pskd_targets_loss_and_table_update(seed):
    E = 10
    trainer = make_trainer(epochs=E, seed=seed)
    pskd = setup(make_objective("pskd"), trainer)
    assert torch.equal(pskd.predictions, nn.functional.one_hot(trainer.data.train_labels, K).float())
    table = random_table(seed)
    pskd.load_state_dict({"predictions": table.clone()})

    for epoch in (0, 4, E - 1):
        batch = make_batch(trainer, seed=seed + epoch)
        a = 0.8 * (epoch + 1) / E
        ref_targets = [[(1 - a) * o + a * p for o, p in zip(onehot(y), rows(table[i]))]
                       for y, i in zip(batch.labels.tolist(), batch.indices.tolist())]
        got = pskd.targets(batch.labels, batch.indices, epoch)
        assert torch.allclose(got.double(), torch.tensor(ref_targets, dtype=torch.float64), atol=1e-6)

        loss, logits = forward_and_loss(pskd, trainer, batch, epoch)
        ref = sum(ref_xent(t, ref_softmax(z)) for t, z in zip(ref_targets, rows(logits))) / len(ref_targets)
        assert close(loss, ref)

        # After the step: this batch's rows hold its softmax, the others are untouched.
        table[batch.indices] = torch.softmax(logits.detach(), 1)
        assert torch.allclose(pskd.predictions, table, atol=1e-7)
    assert pskd.alpha(E - 1) == pytest.approx(0.8) and pskd.alpha(0) == pytest.approx(0.08)


# ---------------------------------------------------------------- Confusion Distillation: schedule

def phases_as_runs(schedule):
    epochs = sum(CD_SCHEDULES[schedule])
    runs = []
    for e in range(epochs):
        phase = cd_phase(schedule, e)
        if runs and runs[-1][0] == phase:
            runs[-1][2] = e
        else:
            runs.append([phase, e, e])
    return [tuple(r) for r in runs]


def test_cd_preset_phases_exact_epochs():
    assert phases_as_runs("cd300") == [("hard", 0, 29), ("soft", 30, 59), ("hard", 60, 119),
                                       ("soft", 120, 149), ("hard", 150, 299)]
    assert phases_as_runs("cd200") == [("hard", 0, 29), ("soft", 30, 59), ("hard", 60, 89),
                                       ("soft", 90, 119), ("hard", 120, 199)]
    for name in CD_SCHEDULES:
        updates = [e for e in range(sum(CD_SCHEDULES[name])) if cd_ema_updates(name, e)]
        assert updates[0] == 29 and updates == list(range(29, sum(CD_SCHEDULES[name])))
        with pytest.raises(ValueError, match="outside"):
            cd_phase(name, sum(CD_SCHEDULES[name]))
    with pytest.raises(ValueError):
        cd_phase("cd250", 0)
    with pytest.raises(ValueError):
        cd_phase([30, 0, 10], 0)


def test_cd_schedule_must_cover_the_run():
    """Checked when the config is made, not when the run starts."""
    with pytest.raises(ConfigError, match="covers 300 epochs"):
        TrainConfig(objective="cd", objective_args={"schedule": "cd300"}, epochs=200)


def test_cd_test_source_needs_explicit_leak_permission():
    with pytest.raises(ValueError, match="leak"):
        make_objective("cd", {"schedule": [2, 2], "source": "test"})
    cd = make_objective("cd", {"schedule": [2, 2], "source": "test", "allow_test_leak": True})
    with pytest.warns(UserWarning, match="leak"):
        setup(cd, make_trainer(epochs=4))


# ---------------------------------------------------------------- Confusion Distillation: EMA and loss

def ref_cd_targets(Q, variant, perm):
    C = len(Q)
    if variant == "diagonal":
        return [[Q[k][k] if j == k else (1 - Q[k][k]) / (C - 1) for j in range(C)] for k in range(C)]
    if variant == "shuffled":
        R = [row[:] for row in Q]
        for k in range(C):
            off = [j for j in range(C) if j != k]
            for m in range(C - 1):
                R[k][off[m]] = Q[k][off[perm[k][m]]]
        return R
    return [row[:] for row in Q]


@pytest.mark.parametrize("variant", ["confusion", "diagonal", "shuffled", "static"])
@pytest.mark.parametrize("source", ["train", "test"])
def test_cd_ema_and_loss_step_by_step(variant, source):
    schedule, E, eps, mu, T = [2, 2, 3, 1, 2], 10, 0.1, 0.9, 2.0
    trainer = make_trainer(epochs=E)
    cd = make_objective("cd", {"schedule": schedule, "source": source, "targets": variant,
                               "allow_test_leak": source == "test"})
    if source == "test":
        with pytest.warns(UserWarning):
            setup(cd, trainer)
    else:
        setup(cd, trainer)
    perm = cd.shuffle.tolist() if variant == "shuffled" else None
    Q = [[1 - eps + eps / K if j == k else eps / K for j in range(K)] for k in range(K)]
    counts_gen = torch.Generator().manual_seed(5)
    updates = 0
    for epoch in range(E):
        phase = "soft" if epoch in (2, 3, 7) else "hard"
        assert cd.phase(epoch) == phase
        batch = make_batch(trainer, seed=epoch)
        loss, logits = forward_and_loss(cd, trainer, batch, epoch)
        ref = ref_ce(logits, batch.labels)
        if phase == "soft":
            R = ref_cd_targets(Q, variant, perm)
            ref = 0.7 * ref_distill([R[y] for y in batch.labels.tolist()], logits, T) + 0.3 * ref
        assert close(loss, ref)

        train_counts = torch.randint(0, 30, (K, K), generator=counts_gen)
        test_counts = torch.randint(0, 30, (K, K), generator=counts_gen)
        train_counts[0] = 0  # an empty row: the 1e-8 makes it uniform
        cd.end_epoch(EpochEnd(epoch, train_counts, test_counts))
        if variant != "static" and epoch >= schedule[0] - 1:
            counts = rows(train_counts if source == "train" else test_counts)
            for k in range(K):
                row = [c + 1e-8 for c in counts[k]]
                Q[k] = [mu * q + (1 - mu) * c / sum(row) for q, c in zip(Q[k], row)]
            updates += 1
        assert torch.allclose(cd.ema, torch.tensor(Q, dtype=torch.float64), rtol=0, atol=1e-12)
        assert torch.allclose(cd.target_matrix(), torch.tensor(ref_cd_targets(Q, variant, perm),
                                                               dtype=torch.float64), rtol=0, atol=1e-12)
        assert (cd.updates, cd.epochs_seen) == (updates, epoch + 1)
    assert updates == (0 if variant == "static" else E - 1)


def test_cd_shuffle_is_a_seeded_within_row_permutation():
    def shuffle(seed):
        cd = make_objective("cd", {"schedule": [1, 3], "targets": "shuffled"})
        setup(cd, make_trainer(epochs=4, seed=seed))
        return cd

    a, b, c = shuffle(0), shuffle(0), shuffle(1)
    assert torch.equal(a.shuffle, b.shuffle) and not torch.equal(a.shuffle, c.shuffle)
    assert all(sorted(row) == list(range(K - 1)) for row in a.shuffle.tolist())
    a.end_epoch(EpochEnd(0, torch.randint(0, 30, (K, K), generator=torch.Generator().manual_seed(0)), None))
    Q, R = a.ema, a.target_matrix()
    assert not torch.equal(Q, R)
    assert torch.equal(Q.diagonal(), R.diagonal())
    off = ~torch.eye(K, dtype=torch.bool)
    assert torch.equal(Q[off].view(K, K - 1).sort(1).values, R[off].view(K, K - 1).sort(1).values)


def test_cd_rejects_epochs_out_of_order():
    cd = make_objective("cd", {"schedule": [2, 2]})
    setup(cd, make_trainer(epochs=4))
    counts = torch.ones(K, K, dtype=torch.long)
    cd.end_epoch(EpochEnd(0, counts, counts))
    with pytest.raises(ValueError, match="expected the end of epoch 1"):
        cd.end_epoch(EpochEnd(2, counts, counts))


# ---------------------------------------------------------------- all objectives: checkpoints, autocast

ALL = [("ce", {}), ("ls", {}), ("kd", {"teacher": "t"}), ("tfkd_reg", {}), ("cskd", {}), ("pskd", {}),
       ("cd", {"schedule": [1, 2, 1]}), ("cd", {"schedule": [1, 2, 1], "targets": "shuffled"}),
       ("cd", {"schedule": [1, 2, 1], "targets": "static"})]


def train_a_little(objective, trainer, epochs):
    for epoch in range(epochs):
        trainer.generator.manual_seed(epoch)
        for step in range(2):
            forward_and_loss(objective, trainer, make_batch(trainer, seed=10 * epoch + step), epoch)[0].backward()
        counts = torch.randint(0, 9, (K, K), generator=torch.Generator().manual_seed(epoch))
        objective.end_epoch(EpochEnd(epoch, counts, counts.T.contiguous()))


@pytest.mark.parametrize("name,args", ALL)
def test_state_dict_round_trip(tmp_path, name, args):
    trainer = make_trainer(epochs=4)
    objective = setup(make_objective(name, args), trainer)
    train_a_little(objective, trainer, 2)
    torch.save({"objective": objective.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["objective"]

    resumed, resumed_trainer = make_objective(name, json.loads(json.dumps(args))), make_trainer(epochs=4)
    setup(resumed, resumed_trainer)
    resumed.load_state_dict(state)
    saved, restored = objective.state_dict(), resumed.state_dict()
    assert saved.keys() == restored.keys()
    for key, value in saved.items():
        assert torch.equal(value, restored[key]) if torch.is_tensor(value) else value == restored[key]

    # Both continue identically on the same batch and generator state (epoch 2 is a soft CD epoch).
    batch = make_batch(trainer, seed=123)
    losses = []
    for obj, its_trainer in ((objective, trainer), (resumed, resumed_trainer)):
        its_trainer.generator.manual_seed(2)
        its_trainer.model, its_trainer.teacher = trainer.model, trainer.teacher  # same networks in both
        losses.append(forward_and_loss(obj, its_trainer, batch, 2)[0])
    assert torch.equal(losses[0], losses[1])


@pytest.mark.parametrize("name,args", ALL)
def test_losses_are_float32_under_bf16_autocast(name, args):
    trainer = make_trainer(epochs=4)
    objective = setup(make_objective(name, args), trainer)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits = forward_and_loss(objective, trainer, make_batch(trainer), 1)
    assert logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss)
