"""Tests of cdlib.experiments.feature_analysis: the KD analysis from the run store and claims 1-3.

Numbers are checked against plain float64 references written from the definitions;
the plumbing (groups, order, confidences, normalisation) against a direct build on
fake runs and, once, on tiny trained runs.
"""
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import special

from cdlib.experiments import feature_analysis as fa
from cdlib.core import feature_statistics as fstats
from cdlib.core import interaction as it
from cdlib.experiments import plans
from cdlib.scaleout import executors
from cdlib.experiments.claims import NOT_MEASURED, NOT_SUPPORTED, SUPPORTED, claims_frame
from cdlib.core.config import TrainConfig
from cdlib.core.data import DeviceData, synthetic
from cdlib.experiments.profiles import get_profile


# --------------------------------------------------------------------------------------
# Fake runs: linear "networks" on random images
# --------------------------------------------------------------------------------------

class LinearNet(torch.nn.Module):
    """features(x) = flatten(x) @ W; records every batch size it saw."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.batches = []

    def features(self, x):
        self.batches.append(len(x))
        return x.flatten(1) @ self.weight

    def feature_map(self, x):
        return self.features(x)[:, :, None, None]


class FakeRun:
    def __init__(self, name, weight, logits):
        self.config = SimpleNamespace(run_id=lambda: name)
        self.weight, self.logits, self.loaded = weight, logits, []

    def load_model(self, device="cpu"):
        model = LinearNet(self.weight.clone()).to(device)
        self.loaded.append(model)
        return model

    def test_logits(self):
        return self.logits


N_IMAGES, N_CLASSES, N_DIMS, K = 300, 7, 24, 6


@pytest.fixture(scope="module")
def fake():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.standard_normal((N_IMAGES, 3, 2, 2)).astype(np.float32))
    labels = rng.integers(0, N_CLASSES, N_IMAGES)
    by_group = {g: [FakeRun(f"{g}-{i}", torch.from_numpy(rng.standard_normal((12, N_DIMS)).astype(np.float32)),
                            rng.normal(0, 3, (N_IMAGES, N_CLASSES)).astype(np.float32)) for i in range(n)]
                for g, n in (("baseline", 3), ("student", 2), ("teacher", 2))}
    result = fa.analyse_runs(by_group, images, labels, batch_size=128, device="cpu", n_components=K,
                             dataset="fake", profile="test")
    return SimpleNamespace(images=images, labels=labels, by_group=by_group, result=result)


def test_true_class_probabilities_match_float64_softmax():
    rng = np.random.default_rng(1)
    logits = [rng.normal(0, 30, (50, 5)).astype(np.float32) for _ in range(3)]  # large: needs max-shifting
    labels = rng.integers(0, 5, 50)
    got = fa.true_class_probabilities(logits, labels)
    assert got.shape == (3, 50) and got.dtype == np.float64
    for m, z in enumerate(logits):
        expected = special.softmax(z.astype(np.float64), axis=1)[np.arange(50), labels]
        np.testing.assert_allclose(got[m], expected, rtol=1e-12, atol=1e-300)
    with pytest.raises(ValueError):
        fa.true_class_probabilities([logits[0][:49]], labels)


def test_analyse_runs_equals_a_direct_build(fake):
    ordered = [run for g in ("baseline", "student", "teacher") for run in fake.by_group[g]]
    direct = [(fake.images.flatten(1).double() @ run.weight.double()).float().numpy() for run in ordered]
    tensor = it.build_interaction_tensor(direct, n_components=K, device="cpu")
    result = fake.result
    np.testing.assert_array_equal(result.tensor.presence, tensor.presence)
    np.testing.assert_array_equal(result.tensor.cluster_of, tensor.cluster_of)
    assert list(result.groups) == ["baseline", "student", "teacher"]
    assert result.run_ids == {g: [f"{g}-{i}" for i in range(len(r))] for g, r in fake.by_group.items()}
    probabilities = fa.true_class_probabilities([run.logits for run in ordered], fake.labels)
    for name, models in (("baseline", [0, 1, 2]), ("student", [3, 4]), ("teacher", [5, 6])):
        expected = fstats.group_statistics(tensor, name, models, probabilities)
        got = result.groups[name]
        assert got.models == tuple(models)
        for field in ("frequency", "features_per_image", "models_per_feature", "num_features", "confidence"):
            np.testing.assert_array_equal(getattr(got, field), getattr(expected, field))
    # One model at a time, in batches, on the CPU again afterwards.
    for run in ordered:
        (model,) = run.loaded
        assert model.batches == [128, 128, 44] and model.weight.device.type == "cpu"
    # The layer is a parameter: here the (D, 1, 1) "map" flattens to the pooled vector.
    as_map = fa.analyse_runs(fake.by_group, fake.images, fake.labels, layer="map", device="cpu", n_components=K)
    assert as_map.tensor.layer == "map"
    np.testing.assert_array_equal(as_map.tensor.presence, tensor.presence)


def test_result_tables_and_figure_inputs(fake):
    result = fake.result
    assert len(result.summary_table()) == 16
    table = result.tensor_table().set_index("setting")["value"]
    assert table["models M"] == "7" and table["features T"] == str(result.tensor.n_clusters)
    assert "7 models (3 baseline, 2 student, 2 teacher)" in result.source()
    points = result.confidence_points()
    np.testing.assert_array_equal(points["student"][1], result.groups["student"].num_features)
    assert set(result.frequencies()) == set(result.features_per_image()) == {"baseline", "student", "teacher"}


# --------------------------------------------------------------------------------------
# Measures, against plain references
# --------------------------------------------------------------------------------------

def group(name, frequency, num_features=None, confidence=None, n_images=100):
    frequency = np.asarray(frequency)
    num_features = np.zeros(n_images, int) if num_features is None else np.asarray(num_features)
    return fstats.GroupStatistics(name=name, models=(0,), frequency=frequency,
                              features_per_image=np.zeros(len(num_features), int),
                              models_per_feature=(frequency > 0).astype(int), num_features=num_features,
                              confidence=None if confidence is None else np.asarray(confidence, float))


def test_low_frequency_fraction_and_jaccard_by_hand():
    a = group("a", [0, 2, 4, 5, 50, 0, 9])
    b = group("b", [1, 0, 30, 0, 40, 0, 0])
    # Used features of a: 2, 4, 5, 50, 9; below 5% of 100 images: 2 and 4.
    assert fa.low_frequency_fraction(a, 100) == pytest.approx(2 / 5)
    assert fa.low_frequency_fraction(a, 100, threshold=0.1) == pytest.approx(4 / 5)
    # a uses {1, 2, 3, 4, 6}, b uses {0, 2, 4}: shared {2, 4}, union {0, 1, 2, 3, 4, 6}.
    assert fa.jaccard(a, b) == pytest.approx(2 / 6)
    assert np.isnan(fa.low_frequency_fraction(group("empty", [0, 0]), 100))


def test_frequency_distance_is_mean_gap_of_sorted_frequencies():
    rng = np.random.default_rng(2)
    fa_, fb_ = rng.integers(1, 400, 30), rng.integers(1, 400, 30)
    a, b = group("a", np.concatenate([fa_, [0, 0]])), group("b", np.concatenate([[0], fb_, [0]]))
    # For equally many values, W1 of two empirical distributions = mean |sorted a - sorted b|.
    expected = np.mean(np.abs(np.sort(fa_) - np.sort(fb_))) / 400
    assert fa.frequency_distance(a, b, 400) == pytest.approx(expected, rel=1e-12)
    assert fa.frequency_distance(a, a, 400) == 0.0


def test_confidence_correlation_is_spearman_with_fisher_interval():
    rng = np.random.default_rng(3)
    num_features = rng.poisson(20, 2000)  # many ties
    confidence = 1 / (1 + np.exp(-(num_features - 20) / 4 - rng.normal(0, 1, 2000)))
    c = fa.confidence_correlation(group("g", [1], num_features, confidence, 2000))

    def average_ranks(v):  # plain: rank = mean position of the tied block, 1-based
        order = np.argsort(v, kind="stable")
        ranks = np.empty(len(v))
        sorted_v = v[order]
        start = 0
        while start < len(v):
            end = start
            while end + 1 < len(v) and sorted_v[end + 1] == sorted_v[start]:
                end += 1
            ranks[order[start:end + 1]] = (start + end) / 2 + 1
            start = end + 1
        return ranks

    expected = np.corrcoef(average_ranks(confidence), average_ranks(num_features.astype(float)))[0, 1]
    assert c.rho == pytest.approx(expected, abs=1e-12) and c.rho > 0.5 and c.n == 2000
    z, half = np.arctanh(c.rho), 1.959963984540054 * np.sqrt((1 + c.rho ** 2 / 2) / (2000 - 3))
    assert (c.low, c.high) == pytest.approx((np.tanh(z - half), np.tanh(z + half)), abs=1e-12)
    flat = fa.confidence_correlation(group("g", [1], np.full(50, 3), rng.uniform(size=50), 50))
    assert np.isnan(flat.rho) and np.isnan(flat.low)


# --------------------------------------------------------------------------------------
# Claims
# --------------------------------------------------------------------------------------

def analysis(groups, n_images=100):
    tensor = it.InteractionTensor(
        presence=np.zeros((3, n_images, 2), bool), cluster_of=np.zeros((3, 2), np.int32), match_corr=np.ones((3, 2)),
        n_clusters=len(next(iter(groups.values())).frequency), gamma_corr=0.5, n_components=2, centered=True,
        corr_percentile=99.0, presence_percentile=90.0, layer="pooled")
    return fa.FeatureAnalysis(tensor=tensor, groups=groups, run_ids={g: [g] for g in groups},
                              labels=np.zeros(n_images, int), dataset="synthetic", profile="test")


def kd_groups(paper_like: bool):
    """Groups over 10 features and 100 images that satisfy every rule (or, swapped, none)."""
    rng = np.random.default_rng(4)
    num_features = rng.poisson(30, 100)
    rising = np.clip(num_features / 60 + rng.normal(0, 0.05, 100), 0, 1)
    narrow = 30 + (num_features - 30) // 3
    baseline = group("baseline", [1, 2, 3, 20, 30, 40, 0, 2, 60, 4], num_features, rising)
    student = group("student", [0, 0, 25, 30, 45, 50, 0, 0, 70, 0], narrow, rng.uniform(size=100))
    teacher = group("teacher", [0, 0, 30, 35, 40, 0, 0, 0, 80, 0], narrow, rng.uniform(size=100))
    if not paper_like:
        baseline, student = (group("baseline", student.frequency, student.num_features, student.confidence),
                             group("student", baseline.frequency, baseline.num_features, baseline.confidence))
    return {"baseline": baseline, "student": student, "teacher": teacher}


def test_claims_follow_their_rules():
    claims = fa.interaction_claims(analysis(kd_groups(True)), links={2: ["figures/x.png"]})
    assert [c.number for c in claims] == [1, 2, 3]
    assert [c.verdict for c in claims] == [SUPPORTED] * 3, claims_frame(claims)[["claim", "ours"]].to_string()
    assert claims[1].links == ["figures/x.png"] and claims[0].links == []
    assert "531" in claims[0].paper and "170" not in claims[1].paper and "0.45" in claims[1].paper
    swapped = fa.interaction_claims(analysis(kd_groups(False)))
    assert [c.verdict for c in swapped] == [NOT_SUPPORTED] * 3
    frame = claims_frame(swapped)
    assert list(frame["claim"]) == [1, 2, 3] and frame["rule"].str.len().min() > 50


def test_claims_need_all_three_groups():
    groups = kd_groups(True)
    del groups["teacher"]
    assert [c.verdict for c in fa.interaction_claims(analysis(groups))] == [NOT_MEASURED] * 3


def test_measures_table_derives_paper_jaccard_only_for_the_kd_groups():
    table = fa.measures_table(analysis(kd_groups(True)))
    row = table[(table.measure == "Jaccard overlap of used features") & (table.groups == "student & teacher")]
    assert row["paper"].item() == pytest.approx(170 / (281 + 264 - 170))
    assert row["ours"].item() == pytest.approx(4 / 5)  # student uses {2, 3, 4, 5, 8}, teacher {2, 3, 4, 8}
    groups = kd_groups(True)
    two = fa.measures_table(analysis({"baseline": groups["baseline"], "cd": groups["student"]}))
    assert two["paper"].isna().all()


# --------------------------------------------------------------------------------------
# End to end on tiny trained runs
# --------------------------------------------------------------------------------------

def test_group_runs_take_each_group_from_its_plan(monkeypatch):
    monkeypatch.setattr(fa.runs, "finished_runs", lambda configs, root=None: [SimpleNamespace(config=c) for c in configs])
    smoke = get_profile("smoke", announce=False)
    got = fa.group_runs(smoke, ("baseline", "student", "teacher", "cd"))
    expected = {"baseline": plans.feature_baselines(smoke), "student": plans.kd_students(smoke),
                "teacher": plans.teachers(smoke), "cd": plans.cd_feature_models(smoke)}
    assert {g: [r.config for r in rs] for g, rs in got.items()} == expected
    # Student i distils from teacher i: the tensor's student and teacher orders correspond.
    assert [s.objective_args["teacher"] for s in expected["student"]] == [t.run_id() for t in expected["teacher"]]
    with pytest.raises(ValueError):
        fa.group_runs(smoke, ["nope"])


@pytest.fixture
def one_thread():
    """Tiny networks train several times faster with one torch thread on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_analyse_profile_on_tiny_trained_runs(monkeypatch, one_thread):
    # Two tiny runs stand in for two groups (the plans' wiring is tested above); the synthetic
    # data set is generated once and shared.
    ds = synthetic()
    monkeypatch.setattr(fa, "load_dataset", lambda name, root=None: ds)
    tiny = TrainConfig(name="tiny", dataset="synthetic", arch="resnet18", width=0.0625, epochs=1)
    shared = DeviceData(ds, "cpu", rotation=tiny.rotation)
    run, _ = [executors.train_run(c, progress=False, data=shared) for c in (tiny, replace(tiny, seed=1))]
    monkeypatch.setitem(fa.GROUP_PLANS, "baseline", lambda profile: [tiny])
    monkeypatch.setitem(fa.GROUP_PLANS, "cd", lambda profile: [replace(tiny, seed=1)])
    smoke = get_profile("smoke", announce=False)
    result = fa.analyse_profile(smoke, ("baseline", "cd"), device="cpu", n_components=8)
    assert list(result.groups) == ["baseline", "cd"] and result.tensor.n_models == 2
    assert result.n_images == len(result.labels) == 500 and result.tensor.presence.shape == (2, 500, 8)
    # The images are normalised as in evaluation: the network reproduces its stored test logits,
    # and the group's confidence is the true-class softmax of those logits.
    images, labels = fa.test_images(smoke.dataset, device="cpu")
    with torch.no_grad():
        logits = run.load_model("cpu")(images).numpy()
    np.testing.assert_allclose(logits, run.test_logits(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(labels, result.labels)
    np.testing.assert_allclose(result.groups["baseline"].confidence,
                               special.softmax(logits.astype(np.float64), axis=1)[np.arange(500), labels], rtol=1e-3)
    assert [c.verdict for c in fa.interaction_claims(result)] == [NOT_MEASURED] * 3


def test_k_is_capped_at_the_narrowest_networks_pooled_features():
    """The paper's K = 50 on the cpu profile's width-1/16 ResNet-18 (32 pooled features) would fail in the PCA."""
    from cdlib.core.config import TrainConfig
    from cdlib.core.models import build_model
    student, teacher = TrainConfig(arch="resnet18", width=0.0625), TrainConfig(arch="resnet34", width=0.125)
    assert [fa.penultimate_width(c) for c in (student, teacher)] == [
        build_model(c.arch, 10, c.width).feature_dim for c in (student, teacher)] == [32, 64]
    with pytest.warns(UserWarning, match="K = 32"):
        assert fa.pooled_components([teacher, student]) == 32
    assert fa.pooled_components([teacher], 50) == 50 and fa.pooled_components([student], 20) == 20
