"""Tests of cdlib.core.confusion and cdlib.experiments.confusion_figures.

Every measure is checked against a plainly written float64 reference with Python
loops, on random matrices that include zero entries and zero rows.
"""
import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from cdlib.core import confusion as cf
from cdlib.experiments import confusion_figures as cfig

SEEDS = range(5)


# ---------------------------------------------------------------------------
# Plain references


def ref_offdiag_entries(a):
    c = len(a)
    return [float(a[j][i]) for j in range(c) for i in range(c) if i != j]


def ref_pearson_list(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((x[k] - mx) * (y[k] - my) for k in range(n))
    sxx = sum((x[k] - mx) ** 2 for k in range(n))
    syy = sum((y[k] - my) ** 2 for k in range(n))
    return sxy / math.sqrt(sxx * syy)


def ref_ranks(x):
    # Rank = 1 + number of smaller values + half the number of other equal values.
    return [1 + sum(v < xi for v in x) + (sum(v == xi for v in x) - 1) / 2 for xi in x]


def ref_cosine(a, b):
    c, total = len(a), 0.0
    for j in range(c):
        ra = [a[j][i] for i in range(c) if i != j]
        rb = [b[j][i] for i in range(c) if i != j]
        na = math.sqrt(sum(v * v for v in ra))
        nb = math.sqrt(sum(v * v for v in rb))
        if na == 0 and nb == 0:
            total += 1.0
        elif na == 0 or nb == 0:
            total += 0.0
        else:
            total += sum(u * v for u, v in zip(ra, rb)) / (na * nb)
    return total / c


def ref_jaccard(a, b):
    c, total = len(a), 0.0
    for j in range(c):
        num = sum(min(a[j][i], b[j][i]) for i in range(c) if i != j)
        den = sum(max(a[j][i], b[j][i]) for i in range(c) if i != j)
        total += num / den if den > 0 else 1.0
    return total / c


def ref_spectrum(a):
    # Independent route: singular values as square roots of the eigenvalues of X^T X
    # (squaring costs precision: tiny singular values are only good to ~1e-8).
    x = np.array(a, dtype=np.float64)
    for j in range(len(x)):
        x[j, j] = 0.0
    s = np.sqrt(np.clip(np.linalg.eigvalsh(x.T @ x), 0, None))[::-1]
    return s / s.sum()


def random_pair(seed, c=12):
    """Two non-negative matrices with exact zeros, a row zero in both, and a row zero in one."""
    rng = np.random.default_rng(seed)
    a = rng.random((c, c)) ** 3
    b = 0.5 * a + rng.random((c, c)) ** 2
    a[rng.random((c, c)) < 0.2] = 0.0
    b[rng.random((c, c)) < 0.2] = 0.0
    off = ~np.eye(c, dtype=bool)
    a[2, off[2]] = 0.0
    b[2, off[2]] = 0.0
    b[5, off[5]] = 0.0
    return a, b


def block_matrix(rng, c=20, groups=5, noise=0.3):
    """Row-stochastic matrix whose confusions stay mostly within super-classes."""
    superclass = np.repeat(np.arange(groups), c // groups)
    same = superclass[:, None] == superclass[None, :]
    a = np.where(same, 1.0, 0.05) * (1 + noise * rng.random((c, c)))
    np.fill_diagonal(a, 0.0)
    a = 0.3 * a / a.sum(axis=1, keepdims=True)
    np.fill_diagonal(a, 0.7)
    return a, superclass


# ---------------------------------------------------------------------------
# The two matrices


@pytest.mark.parametrize("seed", SEEDS)
def test_confusion_counts_match_loop(seed):
    rng = np.random.default_rng(seed)
    c = 7
    labels, preds = rng.integers(0, c, 300), rng.integers(0, c, 300)
    ref = np.zeros((c, c), dtype=np.int64)
    for y, p in zip(labels, preds):
        ref[y, p] += 1
    got = cf.confusion_counts(labels, preds, c)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, ref)


def test_confusion_counts_rejects_bad_labels():
    with pytest.raises(ValueError):
        cf.confusion_counts([0, 3], [0, 1], 3)
    with pytest.raises(ValueError):
        cf.confusion_counts([0, 1], [0], 3)


def test_hard_confusion_rows_sum_to_one_and_empty_rows():
    labels = np.array([0, 0, 1, 1, 1])  # class 2 has no samples
    preds = np.array([0, 1, 1, 1, 2])
    q = cf.hard_confusion(labels, preds, 3)
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(q[0], [0.5, 0.5, 0.0], atol=1e-7)
    np.testing.assert_allclose(q[2], [1 / 3] * 3)  # eps makes an empty row uniform
    q0 = cf.hard_confusion(labels, preds, 3, eps=0.0)
    np.testing.assert_array_equal(q0[2], [0.0, 0.0, 0.0])  # without eps it stays zero
    np.testing.assert_allclose(q0[1], [0.0, 2 / 3, 1 / 3])


@pytest.mark.parametrize("seed", SEEDS)
def test_class_mean_softmax_matches_loop(seed):
    rng = np.random.default_rng(seed)
    n, c = 200, 6
    labels = np.concatenate([np.arange(c), rng.integers(0, c, n - c)])
    logits = 5 * rng.normal(size=(n, c))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    ref = np.zeros((c, c))
    for j in range(c):
        rows = [probs[k] for k in range(n) if labels[k] == j]
        ref[j] = sum(rows) / len(rows)
    m = cf.class_mean_softmax(probs, labels, c)
    np.testing.assert_allclose(m, ref, rtol=1e-12)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(cf.class_mean_softmax(logits, labels, c, from_logits=True), ref, rtol=1e-10)


def test_class_mean_softmax_rejects_missing_class_and_logits():
    probs = np.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match="without samples"):
        cf.class_mean_softmax(probs, [0, 0, 1, 1], 3)
    with pytest.raises(ValueError, match="from_logits"):
        cf.class_mean_softmax(probs * 2, [0, 1, 2, 2], 3)


def test_torch_inputs():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 5, 50), rng.integers(0, 5, 50)
    logits = rng.normal(size=(50, 5))
    labels[:5] = np.arange(5)
    np.testing.assert_array_equal(
        cf.confusion_counts(torch.tensor(labels), torch.tensor(preds), 5), cf.confusion_counts(labels, preds, 5)
    )
    np.testing.assert_allclose(
        cf.class_mean_softmax(torch.tensor(logits, dtype=torch.float32), torch.tensor(labels), 5, from_logits=True),
        cf.class_mean_softmax(logits, labels, 5, from_logits=True),
        atol=1e-6,
    )
    a, b = random_pair(0)
    assert cf.similarity(torch.tensor(a), torch.tensor(b)) == pytest.approx(cf.similarity(a, b))


# ---------------------------------------------------------------------------
# Measures against the references


@pytest.mark.parametrize("seed", SEEDS)
def test_measures_match_loop_references(seed):
    a, b = random_pair(seed)
    xa, xb = ref_offdiag_entries(a), ref_offdiag_entries(b)
    assert cf.offdiag_pearson(a, b) == pytest.approx(ref_pearson_list(xa, xb), abs=1e-12)
    assert cf.offdiag_spearman(a, b) == pytest.approx(ref_pearson_list(ref_ranks(xa), ref_ranks(xb)), abs=1e-12)
    assert cf.mean_row_cosine(a, b) == pytest.approx(ref_cosine(a, b), abs=1e-12)
    assert cf.mean_soft_jaccard(a, b) == pytest.approx(ref_jaccard(a, b), abs=1e-12)
    sa, sb = ref_spectrum(a), ref_spectrum(b)
    np.testing.assert_allclose(cf.offdiag_spectrum(a), sa, atol=1e-7)
    ref_overlap = sum(min(u, v) for u, v in zip(sa, sb))
    assert cf.spectral_overlap(a, b) == pytest.approx(ref_overlap, abs=1e-7)


def test_zero_row_conventions():
    a, b = random_pair(0)
    cos, jac = cf.row_cosines(a, b), cf.row_soft_jaccard(a, b)
    assert cos[2] == 1.0 and jac[2] == 1.0  # zero in both: agree
    assert cos[5] == 0.0 and jac[5] == 0.0  # zero in one only: nothing shared


@pytest.mark.parametrize("seed", SEEDS)
def test_identical_matrices_score_one(seed):
    a, _ = random_pair(seed)
    for value in cf.similarity(a, a).values():
        assert value == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_invariances(seed):
    a, b = random_pair(seed)
    rng = np.random.default_rng(seed)
    p = cf.offdiag_pearson(a, b)
    assert cf.offdiag_pearson(3.0 * a + 2.0, b) == pytest.approx(p, abs=1e-12)
    assert cf.offdiag_pearson(-3.0 * a + 2.0, b) == pytest.approx(-p, abs=1e-12)
    assert cf.offdiag_spearman(a**3, np.sqrt(b)) == pytest.approx(cf.offdiag_spearman(a, b), abs=1e-12)
    # The cosine ignores each row's scale; the soft Jaccard does not: J(A, cA) = 1/c.
    scale = rng.uniform(0.5, 2.0, size=(len(a), 1))
    assert cf.mean_row_cosine(scale * a, b) == pytest.approx(cf.mean_row_cosine(a, b), abs=1e-12)
    nonzero = np.abs(cf.offdiagonal(a)).sum(axis=1) > 0
    np.testing.assert_allclose(cf.row_soft_jaccard(a, 4.0 * a)[nonzero], 0.25)
    # Spectra do not see which classes are confused: relabelling changes nothing.
    perm = rng.permutation(len(a))
    assert cf.spectral_overlap(a, a[np.ix_(perm, perm)]) == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize("seed", SEEDS)
def test_jaccard_bounds(seed):
    a, b = random_pair(seed)
    jac = cf.row_soft_jaccard(a, b)
    assert ((jac >= 0) & (jac <= 1)).all()
    # J_j <= (smaller row mass) / (larger row mass), since sum min <= min of sums.
    ma, mb = cf.offdiagonal(a).sum(axis=1), cf.offdiagonal(b).sum(axis=1)
    both = (ma > 0) & (mb > 0)
    assert (jac[both] <= np.minimum(ma, mb)[both] / np.maximum(ma, mb)[both] + 1e-12).all()
    # For 0/1 rows the soft Jaccard is the set Jaccard, which is at most the cosine
    # (|A or B| >= sqrt(|A||B|)). It does not hold for general non-negative rows.
    ba, bb = (a > 0.1).astype(float), (b > 0.3).astype(float)
    assert (cf.row_soft_jaccard(ba, bb) <= cf.row_cosines(ba, bb) + 1e-12).all()


def test_bad_inputs():
    with pytest.raises(ValueError):
        cf.similarity(np.eye(3), np.eye(4))
    with pytest.raises(ValueError):
        cf.mean_soft_jaccard(-np.ones((3, 3)), np.ones((3, 3)))
    assert math.isnan(cf.offdiag_pearson(np.ones((3, 3)), np.random.default_rng(0).random((3, 3))))


# ---------------------------------------------------------------------------
# Shuffled control


@pytest.mark.parametrize("seed", SEEDS)
def test_shuffle_keeps_diagonal_and_row_values(seed):
    a, _ = random_pair(seed)
    a += 0.01  # distinct values, so a changed order is visible
    before = a.copy()
    s = cf.shuffle_offdiagonal(a, seed)
    np.testing.assert_array_equal(a, before)  # input untouched
    np.testing.assert_array_equal(np.diag(s), np.diag(a))
    np.testing.assert_array_equal(np.sort(cf.offdiagonal(s), axis=1), np.sort(cf.offdiagonal(a), axis=1))
    assert not np.array_equal(s, a)
    np.testing.assert_array_equal(cf.shuffle_offdiagonal(a, seed), s)  # reproducible


def test_block_structure_beats_shuffled_control():
    rng = np.random.default_rng(0)
    m, _ = block_matrix(rng)
    q, _ = block_matrix(rng)
    observed = cf.similarity(m, q)
    null = cf.shuffled_control(m, q, num_shuffles=50, seed=1)
    for measure in cf.MEASURES:
        mean, std = null[measure]
        assert observed[measure] > mean + 3 * std, measure


# ---------------------------------------------------------------------------
# Epochs, ordering


def test_similarity_over_epochs():
    rng = np.random.default_rng(0)
    c, e = 8, 4
    m = rng.dirichlet(np.ones(c), size=c)
    counts = rng.integers(0, 10, size=(e, c, c))
    table = cf.similarity_over_epochs(m, counts, epochs=[10, 20, 30, 40])
    assert list(table.index) == [10, 20, 30, 40]
    assert list(table.columns) == [*cf.MEASURES, "accuracy"]
    expected = cf.similarity(m, cf.row_normalise(counts[2]))
    assert table.loc[30, "pearson"] == pytest.approx(expected["pearson"])
    assert table.loc[30, "accuracy"] == pytest.approx(np.trace(counts[2]) / counts[2].sum())


def test_superclass_order():
    np.testing.assert_array_equal(cf.superclass_order(None, 4), np.arange(4))
    np.testing.assert_array_equal(cf.superclass_order([1, 0, 1, 0, 2]), [1, 3, 0, 2, 4])
    with pytest.raises(ValueError):
        cf.superclass_order(None)


# ---------------------------------------------------------------------------
# Figures


def test_figures_write_png_and_pdf(tmp_path):
    rng = np.random.default_rng(0)
    m, superclass = block_matrix(rng)
    q, _ = block_matrix(rng)
    perm = rng.permutation(len(m))  # scramble classes so the ordering has work to do
    m, q, superclass = m[np.ix_(perm, perm)], q[np.ix_(perm, perm)], superclass[perm]
    counts = rng.integers(0, 10, size=(3, len(m), len(m)))
    runs = {"baseline": cf.similarity_over_epochs(m, counts), "cd": cf.similarity_over_epochs(m, counts[::-1])}
    figs = {
        "heat": cfig.plot_confusion_heatmaps({"teacher M": m, "baseline Q": q}, superclass,
                                             [f"s{k}" for k in range(5)], name="heat", folder=tmp_path),
        "epochs": cfig.plot_similarity_over_epochs(runs, name="epochs", folder=tmp_path),
        "spectra": cfig.plot_spectra({"teacher": m, "baseline": q, "shuffled": cf.shuffle_offdiagonal(q, 0)},
                                     name="spectra", folder=tmp_path),
    }
    for name, fig in figs.items():
        assert fig is not None
        for ext in ("png", "pdf"):
            assert (tmp_path / f"{name}.{ext}").stat().st_size > 0
        matplotlib.pyplot.close(fig)
