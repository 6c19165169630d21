"""Tests of the Interaction Tensor (cdlib.core.interaction) and its figures.

The central check compares the fast implementation with a slow one written plainly
from the paper's Sections 3.2-3.4 (float64, Python loops), on synthetic activations whose
features are planted and therefore known.
"""
import itertools
import tracemalloc

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from cdlib.core import feature_statistics as fstats  # noqa: E402
from cdlib.core import interaction as it  # noqa: E402
from cdlib.core.planted import planted_features  # noqa: E402
from cdlib.experiments import paper  # noqa: E402
from cdlib.experiments import interaction_figures as figs  # noqa: E402

N_MODELS, N_IMAGES, N_DIMS = 6, 2000, 64
N_SHARED, SHARED_PER_MODEL, PRIVATE_PER_MODEL = 10, 6, 2
K = SHARED_PER_MODEL + PRIVATE_PER_MODEL


# --------------------------------------------------------------------------------------
# Slow reference, step by step from the paper's Sections 3.2-3.4
# --------------------------------------------------------------------------------------

def reference_greedy(abs_corr, gamma, truncate_best=False):
    """Algorithm 1 with plain loops. ``truncate_best`` mimics the released code,
    which kept the "best so far" in an integer tensor."""
    n = len(abs_corr)
    cluster = [None] * n
    best = [0.0] * n
    n_clusters = 0
    for opener in range(n):
        if cluster[opener] is not None:
            continue
        cluster[opener] = n_clusters
        best[opener] = 1.0
        for other in range(n):
            if other == opener:
                continue
            c = float(abs_corr[opener][other])
            if c > gamma and c > best[other]:
                cluster[other] = n_clusters
                best[other] = int(c) if truncate_best else c
        n_clusters += 1
    return np.array(cluster)


def reference_tensor(activations, n_components, centered, corr_percentile, presence_percentile):
    """Return (Omega as a dense (M, N, T) int array, cluster ids (M, K), gamma)."""
    n_models = len(activations)
    n_images = len(activations[0])
    kk = n_components
    # Step 2: PCA per model, the textbook way: eigenvectors of the (D x D) scatter
    # matrix by decreasing eigenvalue; orient each component so that its largest
    # |value| is positive.
    projections = []
    for m in range(n_models):
        x = np.array(activations[m], dtype=np.float64)
        if centered:
            x = x - x.mean(axis=0)
        eigenvalues, eigenvectors = np.linalg.eigh(x.T @ x)
        p = x @ eigenvectors[:, np.argsort(eigenvalues)[::-1][:kk]]
        for k in range(kk):
            if p[np.argmax(np.abs(p[:, k])), k] < 0:
                p[:, k] = -p[:, k]
        projections.append(p)
    # Step 3: standardise each column, Lambda[m, p, k, q] = Pearson correlation.
    z = [(p - p.mean(axis=0)) / p.std(axis=0) for p in projections]
    lam = np.zeros((n_models, n_models, kk, kk))
    for m, p, k, q in itertools.product(range(n_models), range(n_models), range(kk), range(kk)):
        lam[m, p, k, q] = np.dot(z[m][:, k], z[p][:, q]) / n_images
    # Step 4: gamma = percentile of |Lambda| over entries of different models.
    cross = [abs(lam[m, p, k, q]) for m, p, k, q in itertools.product(range(n_models), range(n_models), range(kk), range(kk)) if m != p]
    gamma = np.percentile(cross, corr_percentile)
    # Step 5: greedy clustering over (model, component) in order.
    flat = np.zeros((n_models * kk, n_models * kk))
    for m, p, k, q in itertools.product(range(n_models), range(n_models), range(kk), range(kk)):
        flat[m * kk + k, p * kk + q] = min(abs(lam[m, p, k, q]), 1.0)
    cluster = reference_greedy(flat, gamma).reshape(n_models, kk)
    n_clusters = cluster.max() + 1
    # Steps 6-7: presence per model, then Omega.
    omega = np.zeros((n_models, n_images, n_clusters), dtype=np.int32)
    for m in range(n_models):
        normalised = projections[m].copy()
        for k in range(kk):
            normalised[:, k] /= np.max(np.abs(normalised[:, k]))
        threshold = np.percentile(normalised, presence_percentile)
        for k in range(kk):
            for n in range(n_images):
                if normalised[n, k] > threshold:
                    omega[m, n, cluster[m, k]] = 1
    return omega, cluster, gamma


# --------------------------------------------------------------------------------------
# Planted problem
# --------------------------------------------------------------------------------------

def gap_percentile(n_entries, n_matches):
    """The percentile whose linear interpolation falls halfway between the largest
    non-match and the smallest match, when matches are the top ``n_matches`` values."""
    return 100.0 * (n_entries - n_matches - 0.5) / (n_entries - 1)


def planted_corr_percentile(planted):
    """Cross-model (ordered) pairs of components that see the same planted feature,
    as a percentile that puts gamma between matches and non-matches."""
    seen = [set(f) for f in planted.features_of]
    n_models = len(seen)
    matches = sum(len(seen[a] & seen[b]) for a in range(n_models) for b in range(n_models) if a != b)
    return gap_percentile(n_models * (n_models - 1) * K * K, matches)


@pytest.fixture(scope="module")
def planted():
    return planted_features(N_MODELS, N_IMAGES, N_DIMS, N_SHARED, SHARED_PER_MODEL, PRIVATE_PER_MODEL, seed=3)


@pytest.fixture(scope="module")
def planted_tensor(planted):
    return it.build_interaction_tensor(planted, n_components=K, corr_percentile=planted_corr_percentile(planted),
                                       device="cpu")


def component_features(tensor, planted):
    """(M, K): the planted feature whose support equals each component's presence (-1 if none)."""
    found = np.full((tensor.n_models, tensor.n_components), -1)
    for m, k in itertools.product(range(tensor.n_models), range(tensor.n_components)):
        for feature in planted.features_of[m]:
            if np.array_equal(tensor.presence[m, :, k], planted.supports[feature]):
                found[m, k] = feature
    return found


def test_presence_recovers_planted_supports(planted, planted_tensor):
    found = component_features(planted_tensor, planted)
    assert (found >= 0).all()
    for m in range(N_MODELS):
        assert sorted(found[m]) == sorted(planted.features_of[m])


def test_clusters_recover_planted_features(planted, planted_tensor):
    found = component_features(planted_tensor, planted)
    clusters = planted_tensor.cluster_of
    seen = set(np.concatenate(planted.features_of))
    assert planted_tensor.n_clusters == len(seen)
    for feature in seen:
        members = set(zip(*np.nonzero(found == feature)))
        expected = {(m, int(np.flatnonzero(found[m] == feature)[0]))
                    for m in range(N_MODELS) if feature in planted.features_of[m]}
        assert members == expected
        (cluster,) = {clusters[m, k] for m, k in members}
        assert set(zip(*np.nonzero(clusters == cluster))) == members


def test_group_statistics_match_planted(planted, planted_tensor):
    found = component_features(planted_tensor, planted)
    feature_of_cluster = {planted_tensor.cluster_of[m, k]: found[m, k]
                          for m, k in itertools.product(range(N_MODELS), range(K))}
    group = [1, 3, 4]
    stats = fstats.group_statistics(planted_tensor, "g", group)
    seen = np.unique(np.concatenate(planted.features_of[group]))
    expected_frequency = np.zeros(planted_tensor.n_clusters, int)
    expected_models = np.zeros(planted_tensor.n_clusters, int)
    for t, feature in feature_of_cluster.items():
        if feature in seen:
            expected_frequency[t] = planted.supports[feature].sum()
            expected_models[t] = sum(feature in planted.features_of[m] for m in group)
    np.testing.assert_array_equal(stats.frequency, expected_frequency)
    np.testing.assert_array_equal(stats.models_per_feature, expected_models)
    np.testing.assert_array_equal(stats.features_per_image, planted.supports[seen].sum(axis=0))
    np.testing.assert_array_equal(stats.num_features,
                                  sum(planted.supports[planted.features_of[m]].sum(axis=0) for m in group))
    assert stats.n_features == len(seen)
    assert stats.mean_frequency == pytest.approx(planted.supports[seen].sum(axis=1).mean())


@pytest.mark.parametrize("centered", [True, False])
def test_omega_matches_slow_reference(planted, centered):
    activations = np.stack(list(planted))
    percentile = planted_corr_percentile(planted) if centered else 99.0
    tensor = it.build_interaction_tensor(activations, n_components=K, centered=centered,
                                         corr_percentile=percentile, device="cpu")
    omega, cluster, gamma = reference_tensor(activations, K, centered, percentile, 90.0)
    assert tensor.gamma_corr == pytest.approx(gamma, rel=1e-9)
    np.testing.assert_array_equal(tensor.cluster_of, cluster)
    for m in range(N_MODELS):
        np.testing.assert_array_equal(tensor.omega(m), omega[m].astype(bool))


# --------------------------------------------------------------------------------------
# Greedy clustering
# --------------------------------------------------------------------------------------

def random_abs_corr(rng, n):
    upper = np.triu(rng.uniform(0, 1, (n, n)), 1)
    abs_corr = upper + upper.T
    np.fill_diagonal(abs_corr, 1.0)
    return abs_corr


def test_greedy_matches_reference_on_random_inputs():
    rng = np.random.default_rng(0)
    truncation_changed = 0
    for _ in range(30):
        abs_corr = random_abs_corr(rng, 40)
        gamma = rng.uniform(0.6, 0.9)
        fast, match = it.greedy_clusters(abs_corr, gamma)
        np.testing.assert_array_equal(fast, reference_greedy(abs_corr, gamma))
        assert np.all(match[fast >= 0] > gamma)
        truncation_changed += not np.array_equal(fast, reference_greedy(abs_corr, gamma, truncate_best=True))
    assert truncation_changed > 0


def test_float_best_so_far_differs_from_released_int_truncation():
    # Components A, B, X (one per model). A opens cluster 0 and takes X (|r| = 0.9);
    # B does not match A, so it opens cluster 1, and matches X with only 0.6.
    abs_corr = np.array([[1.0, 0.3, 0.9],
                         [0.3, 1.0, 0.6],
                         [0.9, 0.6, 1.0]])
    clusters, match = it.greedy_clusters(abs_corr, gamma=0.5)
    np.testing.assert_array_equal(clusters, [0, 1, 0])   # X stays with its better match
    np.testing.assert_array_equal(match, [1.0, 1.0, 0.9])
    np.testing.assert_array_equal(reference_greedy(abs_corr, 0.5, truncate_best=True), [0, 1, 1])  # int(0.9) = 0: B steals X


def test_correlation_threshold_excludes_same_model_entries():
    rng = np.random.default_rng(1)
    abs_corr = random_abs_corr(rng, 6)
    model_of = np.array([0, 0, 0, 1, 1, 1])
    cross = abs_corr[:3, 3:].ravel()
    assert it.correlation_threshold(abs_corr, model_of, 50.0) == pytest.approx(np.percentile(np.r_[cross, cross], 50))


# --------------------------------------------------------------------------------------
# Invariances
# --------------------------------------------------------------------------------------

def test_model_order_does_not_change_group_statistics(planted, planted_tensor):
    order = np.random.default_rng(2).permutation(N_MODELS)
    permuted = it.build_interaction_tensor([planted.activations(m) for m in order], n_components=K,
                                           corr_percentile=planted_corr_percentile(planted), device="cpu")
    position = np.argsort(order)  # where original model m sits in the permuted tensor
    groups = {"a": [0, 1, 2], "b": [3, 4, 5], "c": [1, 5]}
    original = [fstats.group_statistics(planted_tensor, g, models) for g, models in groups.items()]
    moved = [fstats.group_statistics(permuted, g, position[models]) for g, models in groups.items()]
    for before, after in zip(original, moved):
        assert before.n_features == after.n_features
        np.testing.assert_array_equal(np.sort(before.frequency), np.sort(after.frequency))
        np.testing.assert_array_equal(np.sort(before.models_per_feature), np.sort(after.models_per_feature))
        np.testing.assert_array_equal(before.features_per_image, after.features_per_image)
        np.testing.assert_array_equal(before.num_features, after.num_features)
    assert fstats.shared_features(original).sum() == fstats.shared_features(moved).sum()
    assert fstats.summary_table(original)["ours"].tolist() == fstats.summary_table(moved)["ours"].tolist()


def test_presence_rule_is_signed():
    """Negating component j moves its "on" set from the top tail to the bottom tail
    (the images where it was most negative), and the model's threshold is re-taken
    over the matrix with column j negated, which can move the other columns too."""
    rng = np.random.default_rng(4)
    projections = rng.exponential(1.0, (500, 5)) - 1.0  # skewed: the two tails differ
    j = 2
    flipped = projections.copy()
    flipped[:, j] *= -1
    normalised = projections / np.abs(projections).max(axis=0)  # max |.| does not see the sign
    negated = normalised.copy()
    negated[:, j] *= -1
    threshold = np.percentile(negated, 90)
    on_before, on_after = it.presence(projections), it.presence(flipped)
    np.testing.assert_array_equal(on_after[:, j], -normalised[:, j] > threshold)
    others = np.arange(5) != j
    np.testing.assert_array_equal(on_after[:, others], normalised[:, others] > threshold)
    assert threshold > 0 and not (on_before[:, j] & on_after[:, j]).any()  # opposite tails, disjoint
    assert on_after[:, j].sum() != on_before[:, j].sum()


def test_orientation_removes_solver_sign(planted, planted_tensor):
    projections = it.principal_projections(planted.activations(0), K)
    flipped = projections.copy()
    flipped[:, [1, 4]] *= -1
    np.testing.assert_array_equal(it.orient_components(flipped), projections)
    # Negating a model's activations negates its principal axes; the tensor is unchanged.
    activations = [-planted.activations(0)] + [planted.activations(m) for m in range(1, N_MODELS)]
    negated = it.build_interaction_tensor(activations, n_components=K,
                                          corr_percentile=planted_corr_percentile(planted), device="cpu")
    np.testing.assert_array_equal(negated.presence, planted_tensor.presence)
    np.testing.assert_array_equal(negated.cluster_of, planted_tensor.cluster_of)


def test_principal_projections_match_svd_both_gram_sides():
    rng = np.random.default_rng(5)
    for n, d in [(300, 20), (20, 300)]:
        x = rng.standard_normal((n, d)) * np.linspace(3, 1, d)
        centred = x - x.mean(axis=0)
        u, s, _ = np.linalg.svd(centred, full_matrices=False)
        expected = it.orient_components(u[:, :5] * s[:5])
        np.testing.assert_allclose(it.principal_projections(x, 5, device="cpu"), expected, atol=1e-9)


# --------------------------------------------------------------------------------------
# Memory and storage
# --------------------------------------------------------------------------------------

def test_no_dense_omega_is_materialised():
    planted = planted_features(20, 2000, 32, 60, 6, 4, seed=7)
    tensor = it.build_interaction_tensor(planted, n_components=10, device="cpu")
    n_models, n_images, n_clusters = tensor.n_models, tensor.n_images, tensor.n_clusters
    dense_int32 = n_models * n_images * n_clusters * 4
    assert n_clusters > 60
    # Presence is M x N x K bool: 4T/K times smaller than dense int32 (48x here, 60x for the paper's).
    assert tensor.nbytes < dense_int32 / 40
    tracemalloc.start()
    stats = [fstats.group_statistics(tensor, g, range(start, start + 10)) for g, start in (("a", 0), ("b", 10))]
    fstats.summary_table(stats)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Less than a dense *bool* Omega would take, let alone int32.
    assert peak < n_models * n_images * n_clusters / 4


def test_save_and_load_round_trip(planted_tensor, tmp_path):
    path = tmp_path / "tensor.npz"
    planted_tensor.save(path)
    loaded = it.InteractionTensor.load(path)
    np.testing.assert_array_equal(loaded.presence, planted_tensor.presence)
    np.testing.assert_array_equal(loaded.cluster_of, planted_tensor.cluster_of)
    for name in ("n_clusters", "gamma_corr", "n_components", "centered", "corr_percentile",
                 "presence_percentile", "layer"):
        assert getattr(loaded, name) == getattr(planted_tensor, name)


# --------------------------------------------------------------------------------------
# Statistics tables
# --------------------------------------------------------------------------------------

def test_summary_table_puts_paper_numbers_beside_ours(planted_tensor):
    probabilities = np.random.default_rng(6).uniform(size=(N_MODELS, N_IMAGES))
    groups = [fstats.group_statistics(planted_tensor, g, models, probabilities)
              for g, models in (("baseline", [0, 1]), ("student", [2, 3]), ("teacher", [4, 5]))]
    np.testing.assert_allclose(groups[0].confidence, probabilities[[0, 1]].mean(axis=0))
    assert fstats.summary_table(groups)["paper"].isna().all()  # the core knows no paper numbers
    table = fstats.summary_table(groups, paper.interaction_statistics(g.name for g in groups))
    assert list(table.columns) == ["statistic", "groups", "paper", "ours"]
    assert len(table) == 16 and table["paper"].notna().all()
    row = table[(table.statistic == "features shared by the pair") & (table.groups == "student & teacher")]
    assert row["paper"].item() == 170
    assert row["ours"].item() == fstats.shared_features(groups[1:]).sum()
    assert table[table.statistic == "features shared by all groups"]["paper"].item() == 70
    common = fstats.shared_features(groups)
    for g, restricted in zip(groups, fstats.shared_frequencies(groups).values()):
        np.testing.assert_array_equal(restricted, g.frequency[common])
        assert table[(table.statistic == "mean frequency of features shared by all")
                     & (table.groups == g.name)]["ours"].item() == pytest.approx(restricted.mean())
    two = [groups[0], fstats.group_statistics(planted_tensor, "cd", [2, 3])]
    table = fstats.summary_table(two, paper.interaction_statistics(g.name for g in two))
    assert table["paper"].isna().all() and "features shared by the pair" not in set(table.statistic)


# --------------------------------------------------------------------------------------
# Activations from torch models
# --------------------------------------------------------------------------------------

class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(4)

    def feature_map(self, x):
        return torch.relu(self.norm(self.conv(x)))

    def features(self, x):
        return self.feature_map(x).mean(dim=(2, 3))


def test_collect_activations_shapes_modes_and_precision():
    torch.manual_seed(0)
    models = [TinyNet(), TinyNet()]
    images = torch.randn(7, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pooled = it.collect_activations(models, images, batch_size=3, device="cpu")
    maps = it.collect_activations(models, images, layer="map", batch_size=100, device="cpu")
    assert pooled.shape == (2, 7, 4) and pooled.dtype == np.float32
    assert maps.shape == (2, 7, 4 * 4 * 4)
    assert all(model.training for model in models)  # handed back in the mode they came in
    with torch.no_grad():
        expected = models[1].eval().features(images)
    np.testing.assert_allclose(pooled[1], expected.numpy(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError):
        it.collect_activations(models, images, layer="logits")


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------

def test_figures_write_png_and_pdf(tmp_path):
    rng = np.random.default_rng(8)
    groups = ("baseline", "student", "teacher")
    frequency = {g: rng.integers(0, 500, 80) * (rng.uniform(size=80) > 0.3) for g in groups}
    per_image = {g: rng.poisson(30, 400) for g in groups}
    points = {g: (rng.beta(5, 2, 400), rng.poisson(200, 400)) for g in groups}
    points["cd"] = (np.full(400, 0.9), np.full(400, 120))  # degenerate: one point repeated
    figures = {
        "fig1a": figs.plot_feature_frequency(frequency, name="fig1a", folder=tmp_path),
        "fig1b": figs.plot_feature_frequency(frequency, common_only=True, name="fig1b", folder=tmp_path),
        "fig2": figs.plot_confidence_kde(points, name="fig2", folder=tmp_path),
        "fig2d": figs.plot_features_per_image(per_image, name="fig2d", folder=tmp_path),
        "fig3a": figs.plot_feature_frequency({g: frequency[g] for g in ("baseline", "student")},
                                             name="fig3a", folder=tmp_path),
    }
    for name, fig in figures.items():
        assert (tmp_path / f"{name}.png").stat().st_size > 0
        assert (tmp_path / f"{name}.pdf").stat().st_size > 0
        plt.close(fig)
    assert figs.plot_feature_frequency(frequency).axes[0].get_xlabel() == "Feature (sorted)"
    plt.close("all")
