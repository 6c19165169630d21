"""Tests of cdlib.experiments.dark_knowledge (claim 4 from the run store).

Numbers are checked against plain float64 references written with Python loops. The
run store is faked: finished run folders with made-up test logits and per-epoch
confusions, so nothing trains.
"""
import json
import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from cdlib.experiments import claims, paper, plans
from cdlib.core import confusion, runs
from cdlib import paths
from cdlib.experiments import dark_knowledge as dk
from cdlib.experiments.profiles import Profile

C, PER_CLASS, SUPER = 8, 12, 4  # classes, test images per class, classes per super-class


class FakeData:
    """What analyse reads from a data set: test labels, class names, super-classes."""
    def __init__(self):
        self.test_labels = np.repeat(np.arange(C), PER_CLASS)
        self.classes = [f"c{i}" for i in range(C)]
        self.superclass_of = np.arange(C) // SUPER
        self.superclasses = [f"s{i}" for i in range(C // SUPER)]


def tiny_profile(models=3) -> Profile:
    return Profile("tiny", "fake run store", dataset="synthetic", width=0.0625, epochs=3,
                   feature_models=models, seeds=1, table_archs=("resnet18",), teacher_arch="resnet34")


def structure(rng):
    """Row-stochastic class-confusion pattern that stays mostly within super-classes."""
    same = (np.arange(C)[:, None] // SUPER) == (np.arange(C)[None, :] // SUPER)
    s = np.where(same, 1.0, 0.1) * (0.5 + rng.random((C, C)))
    np.fill_diagonal(s, 0.0)
    return s / s.sum(axis=1, keepdims=True)


def write_run(config, logits, counts_per_epoch, root=None):
    """A finished run folder as runs.get_or_train leaves it."""
    folder = runs.run_dir(config, root)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    np.save(folder / "test_logits.npy", logits.astype(np.float32))
    np.savez_compressed(folder / "confusions.npz", test=counts_per_epoch.astype(np.int32),
                        train=counts_per_epoch.astype(np.int32))
    lines = [json.dumps({"epoch": e + 1, "test_top1": 0.0, "train_loss": 1.0}) for e in range(len(counts_per_epoch))]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "summary.json").write_text(json.dumps({"run_id": config.run_id(), "num_classes": C,
                                                     "final_top1": 50.0, "best_top1": 50.0}))
    return folder


def fake_run(config, rng, pattern, labels, structured=True, epochs=3):
    """Logits whose off-diagonal softmax mass follows ``pattern`` (or is random), and per-epoch
    confusions of predictions that get less noisy epoch by epoch."""
    n = len(labels)
    base = pattern if structured else structure(np.random.default_rng(rng.integers(1 << 30)))[rng.permutation(C)]
    logits = np.log(base[labels] + 1e-3) + 4.0 * np.eye(C)[labels] * rng.uniform(0.2, 1.0, (n, 1))
    logits += 0.5 * rng.normal(size=logits.shape)
    counts = []
    for e in range(epochs):
        noisy = logits + (epochs - e) * rng.normal(size=logits.shape)
        counts.append(confusion.confusion_counts(labels, noisy.argmax(1), C))
    final_pred = (logits + rng.normal(size=logits.shape)).argmax(1)
    counts[-1] = confusion.confusion_counts(labels, final_pred, C)
    return write_run(config, logits, np.stack(counts))


def fake_store(profile, seed=0, structured=True, with_cd=0):
    rng = np.random.default_rng(seed)
    pattern = structure(rng)
    labels = FakeData().test_labels
    for c in plans.teachers(profile):
        fake_run(c, rng, pattern, labels)
    for c in plans.feature_baselines(profile):
        fake_run(c, rng, pattern, labels, structured=structured)
    for c in plans.cd_feature_models(profile)[:with_cd]:
        fake_run(c, rng, pattern, labels, epochs=c.epochs)


# ---------------------------------------------------------------------------
# Plain references


def ref_softmax_rows(logits):
    out = []
    for row in logits:
        row = [float(v) for v in row]
        top = max(row)
        e = [math.exp(v - top) for v in row]
        out.append([v / sum(e) for v in e])
    return out


def ref_class_mean(probs, labels):
    m = [[0.0] * C for _ in range(C)]
    sizes = [0] * C
    for p, y in zip(probs, labels):
        sizes[y] += 1
        for i in range(C):
            m[y][i] += p[i]
    return np.array([[v / sizes[j] for v in m[j]] for j in range(C)])


def ref_mean_std(values):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std


# ---------------------------------------------------------------------------
# Per-run matrices


def test_teacher_matrix_and_final_confusion_match_loops():
    profile = tiny_profile()
    fake_store(profile)
    labels = FakeData().test_labels
    run = runs.find_run(plans.teachers(profile)[0].run_id())
    ref = ref_class_mean(ref_softmax_rows(run.test_logits()), labels)
    np.testing.assert_allclose(dk.teacher_matrix(run, labels), ref, rtol=1e-10, atol=1e-14)
    counts = run.confusions("test")[-1]
    ref_q = np.array([[(counts[j, i] + 1e-8) / (counts[j].sum() + C * 1e-8) for i in range(C)] for j in range(C)])
    np.testing.assert_allclose(dk.final_confusion(run), ref_q, rtol=1e-12)


def test_check_labels_catches_another_data_set():
    profile = tiny_profile()
    fake_store(profile)
    run = runs.find_run(plans.teachers(profile)[0].run_id())
    labels = FakeData().test_labels
    dk.check_labels(run, labels)
    with pytest.raises(ValueError, match="another data set"):
        dk.check_labels(run, np.sort(np.roll(labels, 5) % (C - 1)))
    with pytest.raises(ValueError, match="test labels"):
        dk.teacher_matrix(run, labels[:-1])


# ---------------------------------------------------------------------------
# Statistics


@pytest.mark.parametrize("seed", range(5))
def test_z_score_and_spread_match_plain_formulas(seed):
    rng = np.random.default_rng(seed)
    values = list(rng.normal(size=7))
    mean, std = ref_mean_std(values)
    got = dk.spread(values + [float("nan")])
    assert got[0] == pytest.approx(mean, abs=1e-12) and got[1] == pytest.approx(std, abs=1e-12) and got[2] == 7
    obs = float(rng.normal())
    assert dk.z_score(obs, mean, std) == pytest.approx((obs - mean) / std, abs=1e-12)


def test_z_score_and_spread_edge_cases():
    assert dk.z_score(0.5, 0.2, 0.0) == math.inf
    assert dk.z_score(0.1, 0.2, 0.0) == -math.inf
    assert dk.z_score(0.2, 0.2, 0.0) == 0.0
    assert math.isnan(dk.z_score(float("nan"), 0.0, 1.0))
    mean, std, n = dk.spread([0.3])
    assert mean == 0.3 and math.isnan(std) and n == 1
    assert dk.spread([])[2] == 0


@pytest.mark.parametrize("seed", range(3))
def test_compare_matches_loop_over_shuffles(seed):
    rng = np.random.default_rng(seed)
    m, q = structure(rng), structure(rng)
    row = dk.compare(m, q, num_shuffles=20, seed=seed)
    # Reference: the same shuffled copies, statistics by plain loops.
    gen = np.random.default_rng(seed)
    null = [confusion.similarity(m, confusion.shuffle_offdiagonal(q, gen)) for _ in range(20)]
    for measure in confusion.MEASURES:
        mean, std = ref_mean_std([v[measure] for v in null])
        assert row[measure] == pytest.approx(confusion.similarity(m, q)[measure], abs=1e-12)
        assert row[f"{measure} shuffled mean"] == pytest.approx(mean, abs=1e-12)
        assert row[f"{measure} shuffled std"] == pytest.approx(std, abs=1e-12)
        assert row[f"{measure} z"] == pytest.approx((row[measure] - mean) / std, rel=1e-9)
    empty = dk.compare(m, q, num_shuffles=0)
    assert math.isnan(empty["pearson z"]) and not math.isnan(empty["pearson"])


def test_shuffled_values_uses_one_generator():
    rng = np.random.default_rng(0)
    m, q = structure(rng), structure(rng)
    null = confusion.shuffled_values(m, q, 5, seed=3)
    gen = np.random.default_rng(3)
    for k in range(5):
        expected = confusion.similarity(m, confusion.shuffle_offdiagonal(q, gen))
        for measure in confusion.MEASURES:
            assert null.loc[k, measure] == pytest.approx(expected[measure], abs=1e-12)
    with pytest.raises(ValueError):
        confusion.shuffled_values(m, q, 1)


def test_epoch_indices():
    np.testing.assert_array_equal(dk.epoch_indices(5, None), np.arange(5))
    np.testing.assert_array_equal(dk.epoch_indices(5, 10), np.arange(5))
    idx = dk.epoch_indices(200, 50)
    assert len(idx) == 50 and idx[0] == 0 and idx[-1] == 199 and (np.diff(idx) > 0).all()


# ---------------------------------------------------------------------------
# The analysis on a fake run store


def test_analyse_fake_store_matches_references():
    profile = tiny_profile()
    fake_store(profile, with_cd=2)
    data = FakeData()
    result = dk.analyse(profile, data=data, num_shuffles=20)
    assert result.num_pairs == 3
    teachers = [runs.find_run(c.run_id()) for c in plans.teachers(profile)]
    baselines = [runs.find_run(c.run_id()) for c in plans.feature_baselines(profile)]
    ms = [ref_class_mean(ref_softmax_rows(t.test_logits()), data.test_labels) for t in teachers]
    np.testing.assert_allclose(result.matrices["teacher M"], ms[0], rtol=1e-10, atol=1e-14)
    # Pair i is teacher i against baseline i.
    base = result.comparison(dk.BASELINE)
    for i in range(3):
        row = base[base["pair"] == i].iloc[0]
        assert row["M run"] == teachers[i].config.run_id() and row["other run"] == baselines[i].config.run_id()
        expected = confusion.similarity(ms[i], dk.final_confusion(baselines[i]))
        for measure in confusion.MEASURES:
            assert row[measure] == pytest.approx(expected[measure], abs=1e-9)
    # Ceiling: teacher i against teacher i + 1.
    ceiling = result.comparison(dk.CEILING_M)
    assert list(ceiling["pair"]) == [0, 1]
    assert ceiling.iloc[1]["pearson"] == pytest.approx(confusion.offdiag_pearson(ms[1], ms[2]), abs=1e-9)
    ceiling_q = result.comparison(dk.CEILING_Q)
    assert ceiling_q.iloc[0]["cosine"] == pytest.approx(
        confusion.mean_row_cosine(ms[0], dk.final_confusion(teachers[1])), abs=1e-9)
    # Summary: mean / sample std over pairs, shuffled means, z minima, by plain loops.
    summary = result.summary().set_index("measure")
    for measure in confusion.MEASURES:
        mean, std = ref_mean_std(list(base[measure]))
        assert summary.loc[measure, f"{dk.BASELINE} mean"] == pytest.approx(mean, abs=1e-12)
        assert summary.loc[measure, f"{dk.BASELINE} std"] == pytest.approx(std, abs=1e-12)
        assert summary.loc[measure, "z min"] == pytest.approx(min(base[f"{measure} z"]), abs=1e-12)
        assert summary.loc[measure, "shuffled mean"] == pytest.approx(
            sum(base[f"{measure} shuffled mean"]) / 3, abs=1e-12)
        reported = paper.CONFUSION_SIMILARITY.get(measure)
        if reported is not None:
            assert summary.loc[measure, "ours - paper"] == pytest.approx(mean - reported, abs=1e-12)
    # Curves: every epoch of every baseline and of the two finished CD models.
    assert set(result.epochs["group"]) == {"baseline", "cd"}
    assert len(result.epochs[result.epochs["group"] == "baseline"]) == 3 * profile.epochs
    assert result.epochs[result.epochs["group"] == "cd"]["run_id"].nunique() == 2
    assert any("CD models" in note for note in result.notes)
    first = result.epochs.iloc[0]
    counts = baselines[0].confusions("test")[0]
    assert first["epoch"] == 1
    assert first["pearson"] == pytest.approx(
        confusion.offdiag_pearson(ms[0], confusion.row_normalise(counts)), abs=1e-9)
    assert first["accuracy"] == pytest.approx(np.trace(counts) / counts.sum())
    # Text tables.
    text = result.summary_text()
    assert text.loc[0, "paper"] == "0.85" and " ± " in text.iloc[0, 2]
    assert len(result.pairs_text()) == 3 + 2 * 2


def test_analyse_refuses_missing_runs_and_never_trains():
    profile = tiny_profile()
    with pytest.raises(dk.MissingRunsError, match="not trained"):
        dk.analyse(profile, data=FakeData())
    assert not paths.runs().exists() or not any(paths.runs().iterdir())


def test_one_teacher_has_no_ceiling():
    profile = tiny_profile(models=1)
    fake_store(profile)
    result = dk.analyse(profile, data=FakeData(), num_shuffles=10, over_epochs=False)
    assert result.num_pairs == 1 and result.epochs.empty
    assert result.comparison(dk.CEILING_M).empty and "teacher' M" not in result.matrices
    assert "n/a" in result.summary_text().iloc[0, -1]


# ---------------------------------------------------------------------------
# Claim 4


def test_claim_supported_with_shared_structure_and_links_only_existing():
    profile = tiny_profile()
    fake_store(profile)
    result = dk.analyse(profile, data=FakeData(), num_shuffles=30, over_epochs=False)
    figure = paths.figures() / f"{dk.FIGURES['heatmaps']}.png"
    figure.parent.mkdir(parents=True)
    figure.write_bytes(b"png")
    claim = dk.confusion_claim(result)
    frame = dk.claim_frame(result)
    assert list(frame["measure"]) == list(dk.CLAIM_MEASURES)
    expected = all(z > dk.Z_THRESHOLD for z in frame["z min"])
    assert claim.verdict == (claims.SUPPORTED if expected else claims.NOT_SUPPORTED)
    assert claim.verdict == claims.SUPPORTED  # the fake baselines share the teachers' structure
    assert claim.number == 4 and "0.85" in claim.paper and "shuffled" in claim.rule
    assert claim.links == [f"figures/{dk.FIGURES['heatmaps']}.png"]


def test_claim_not_supported_without_shared_structure():
    profile = tiny_profile()
    fake_store(profile, seed=1, structured=False)
    result = dk.analyse(profile, data=FakeData(), num_shuffles=30, over_epochs=False)
    assert dk.confusion_claim(result).verdict == claims.NOT_SUPPORTED
    no_control = dk.analyse(profile, data=FakeData(), num_shuffles=0, over_epochs=False)
    assert dk.confusion_claim(no_control).verdict == claims.NOT_MEASURED


def test_figures_of_the_notebook():
    profile = tiny_profile()
    fake_store(profile, with_cd=1)
    result = dk.analyse(profile, data=FakeData(), num_shuffles=10)
    # Saving is slow on a busy CPU: draw all four, save the cheapest under its notebook name.
    for plot in (dk.plot_heatmaps, dk.plot_null, dk.plot_epochs):
        fig = plot(result, name=None)
        assert len(fig.axes) >= 3
        matplotlib.pyplot.close(fig)
    matplotlib.pyplot.close(dk.plot_spectra(result))
    for ext in ("png", "pdf"):
        assert (paths.figures() / f"{dk.FIGURES['spectra']}.{ext}").stat().st_size > 0
