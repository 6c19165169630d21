"""The held-out validation split: stratified, fixed, disjoint from what trains; the best epoch is chosen
on it; CD's "holdout" and "train_eval" sources read the confusions they say; ECE against a slow loop."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from cdlib.scaleout import executors
from cdlib.core.calibration import expected_calibration_error
from cdlib.core.config import TrainConfig
from cdlib.core.data import DataError, DeviceData, hold_out, synthetic, validation_indices
from cdlib.errors import ConfigError
from cdlib.core.train import fit
from cdlib.experiments import distillation_results as dr


def test_validation_indices_are_stratified_fixed_and_sorted():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, 1000)  # unequal classes
    counts = np.bincount(labels)
    picked = validation_indices(labels, 101)
    assert len(picked) == len(set(picked)) == 101 and list(picked) == sorted(picked)
    # Slow reference of the shares: floor, then one more to the largest remainders.
    exact = [101 * c / 1000 for c in counts]
    shares = [int(x) for x in exact]
    for k in sorted(range(7), key=lambda k: -(exact[k] - shares[k]))[:101 - sum(shares)]:
        shares[k] += 1
    assert list(np.bincount(labels[picked], minlength=7)) == shares
    assert np.array_equal(validation_indices(labels, 101), picked)  # fixed: no run seed enters


def test_hold_out_moves_images_out_of_the_training_set():
    ds = synthetic()
    held = hold_out(ds, 200)
    assert len(held.train_labels) + len(held.validation_labels) == len(ds.train_labels)
    assert len(held.validation_labels) == 200 and np.array_equal(held.test_labels, ds.test_labels)
    rows = lambda images: {im.tobytes() for im in images}  # noqa: E731
    assert rows(held.train_images) | rows(held.validation_images) == rows(ds.train_images)
    assert not rows(held.train_images) & rows(held.validation_images)
    assert hold_out(ds, 0) is ds
    for n in (len(ds.train_labels), 10**6, len(ds.train_labels) - 5):
        with pytest.raises(DataError, match="every class must keep some training images"):
            hold_out(ds, n)
    data = DeviceData(held, "cpu", rotation=0)
    assert data.num_train == len(held.train_labels) and data.num_validation == 200
    assert sum(len(y) for _, y in data.eval_batches("validation", 64)) == 200


def test_train_images_keeps_a_fixed_stratified_subset_of_what_is_not_held_out():
    ds = synthetic()
    held = hold_out(ds, 200)
    small = hold_out(ds, 200, train_images=600)
    rows = lambda images: {im.tobytes() for im in images}  # noqa: E731
    assert len(small.train_labels) == 600 and rows(small.train_images) <= rows(held.train_images)
    assert rows(small.validation_images) == rows(held.validation_images)  # the same validation split
    shares = np.bincount(held.train_labels) * 600 / len(held.train_labels)
    assert np.abs(np.bincount(small.train_labels) - shares).max() < 1  # every class its share
    assert rows(hold_out(ds, 200, train_images=600).train_images) == rows(small.train_images)  # fixed
    assert len(hold_out(ds, 0, train_images=100).train_labels) == 100
    for n in (len(held.train_labels) + 1, ds.num_classes - 1):
        with pytest.raises(DataError, match="cannot train on"):
            hold_out(ds, 200, train_images=n)


def test_a_run_with_train_images_trains_on_that_many_and_keeps_older_run_ids(tmp_path):
    base = TrainConfig(dataset="synthetic", arch="resnet18", width=0.0625, epochs=1, validation=200)
    assert base.replace(train_images=0).run_id() == base.run_id()  # the field enters the hash only when set
    config = base.replace(train_images=300)
    assert config.run_id() != base.run_id()
    with pytest.raises(ConfigError, match="train_images"):
        base.replace(train_images=-1)
    summary = fit(config, tmp_path / "run", device="cpu")
    assert summary["final_top1"] >= 0 and not (tmp_path / "run" / "failed.json").exists()
    with pytest.raises(ValueError, match="asks for 200 and 300 training images"):
        data = DeviceData(hold_out(synthetic(), 200), "cpu", rotation=15)
        fit(config, tmp_path / "other", data=data)


def test_a_holdout_source_without_a_validation_split_is_refused():
    with pytest.raises(ConfigError, match="source='holdout'.*set TrainConfig.validation"):
        TrainConfig(epochs=5, objective="cd", objective_args={"schedule": [1, 4], "source": "holdout"})
    TrainConfig(epochs=5, validation=500, objective="cd", objective_args={"schedule": [1, 4], "source": "holdout"})
    assert TrainConfig(validation=0).run_id() == TrainConfig().run_id()  # ids of earlier runs unchanged
    assert TrainConfig(validation=500).run_id() != TrainConfig().run_id()


def tiny(**changes) -> TrainConfig:
    return TrainConfig(**{"name": "v", "dataset": "synthetic", "width": 0.0625, "epochs": 4, "validation": 200,
                          **changes})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A baseline and CD with each source, trained on the synthetic set with 200 images held out."""
    root = tmp_path_factory.mktemp("store")
    schedule = {"schedule": [1, 3]}
    configs = {"ce": tiny(), "ce-no-validation": tiny(validation=0),
               **{source: tiny(objective="cd", objective_args={**schedule, "source": source})
                  for source in ("train", "holdout", "train_eval")},
               "test": tiny(objective="cd", objective_args={**schedule, "source": "test", "allow_test_leak": True})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        found = [executors.train_run(c, device="cpu", root=root, progress=False) for c in configs.values()]
    return dict(zip(configs, found))


def test_the_best_epoch_is_chosen_on_validation_and_reported_on_test(trained):
    run = trained["ce"]
    metrics = run.metrics
    assert {"validation_loss", "validation_top1", "validation_top5"} <= set(metrics.columns)
    chosen = metrics.loc[metrics["validation_top1"].idxmax()]
    s = run.summary
    assert s["selection"] == "validation" and s["selected_epoch"] == chosen["epoch"]
    assert s["selected_top1"] == chosen["test_top1"] and s["best_top1"] == metrics["test_top1"].max()
    plain = trained["ce-no-validation"].summary
    assert plain["selection"] == "test" and plain["selected_top1"] == plain["best_top1"]
    assert "validation_top1" not in trained["ce-no-validation"].metrics.columns


def test_calibration_numbers_of_the_final_model(trained):
    run = trained["ce"]
    labels = torch.from_numpy(synthetic().test_labels)
    logits = torch.from_numpy(run.test_logits())
    assert run.summary["final_nll"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert run.summary["final_ece"] == pytest.approx(ece_reference(logits.numpy(), labels.numpy()), abs=1e-9)


def ece_reference(logits: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE by a plain loop in float64: bins (i/15, (i+1)/15], |accuracy - confidence| weighted by size."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    total = 0.0
    for i in range(bins):
        members = [n for n in range(len(labels)) if i / bins < p[n].max() <= (i + 1) / bins]
        if members:
            accuracy = np.mean([p[n].argmax() == labels[n] for n in members])
            confidence = np.mean([p[n].max() for n in members])
            total += len(members) / len(labels) * abs(accuracy - confidence)
    return 100 * total


@pytest.mark.parametrize("seed", range(5))
def test_ece_matches_the_loop_on_random_logits(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(300, 10, generator=g) * (seed + 1)
    labels = torch.randint(0, 10, (300,), generator=g)
    assert expected_calibration_error(logits, labels) == pytest.approx(ece_reference(logits.numpy(), labels.numpy()),
                                                                        abs=1e-9)


def test_each_cd_source_is_fed_the_confusion_it_names(trained):
    """Replaying the stored confusions of the source's split gives the run's final targets; the splits
    differ, so a source reading the wrong one would not match."""
    for source, split in dr.SOURCE_SPLITS.items():
        run = trained[source]
        confusions = run.confusions(split)
        assert confusions[1:].sum() > 0, source  # fed from epoch 1 (the end of the first hard phase) on
        total = {"train": 1800, "validation": 200, "train_eval": 1800, "test": 500}[split]
        assert (confusions.sum((1, 2)) == total).all(), source
        replayed = dr.replay_cd_ema(run)[-1]
        assert np.allclose(replayed.sum(1), 1)
    a, b = trained["holdout"].confusions("validation"), trained["train"].confusions("train")
    assert a.sum() != b.sum()


def test_the_eval_mode_training_confusion_is_the_final_networks_on_clean_images(trained):
    run = trained["train_eval"]
    held = hold_out(synthetic(), 200)
    data = DeviceData(held, "cpu", rotation=0)
    model = run.load_model()
    counts = np.zeros((20, 20), dtype=np.int64)
    with torch.no_grad():
        for images, labels in data.eval_batches("train", 100):
            for y, p in zip(labels.tolist(), model(images).argmax(1).tolist()):
                counts[y, p] += 1
    assert np.array_equal(run.confusions("train_eval")[-1], counts)
    assert not np.array_equal(run.confusions("train")[-1], counts)  # train mode, augmented: another matrix


@pytest.mark.parametrize("objective, args", [("ls", {}), ("tfkd_reg", {}), ("cskd", {}), ("pskd", {}), ("kd", None)])
def test_every_objective_trains_on_the_rest_of_the_split(tmp_path, objective, args):
    """The held-out images never enter training: every objective's per-sample state (PS-KD's stored
    predictions, CS-KD's same-class partners) is sized and drawn from the remaining training images."""
    root = tmp_path / "store"
    configs = []
    if objective == "kd":
        teacher = tiny(epochs=2)
        configs.append(teacher)
        args = {"teacher": teacher.run_id()}
    configs.append(tiny(epochs=2, objective=objective, objective_args=args))
    student = [executors.train_run(c, device="cpu", root=root, progress=False) for c in configs][-1]
    assert student.summary["selection"] == "validation"
    assert student.confusions("train").sum((1, 2)).tolist() == [1800, 1800]  # 2000 - 200 held out, each epoch
    assert student.confusions("validation").sum((1, 2)).tolist() == [200, 200]
