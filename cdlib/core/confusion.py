"""Confusion as dark knowledge (the paper's Section 4.1).

Two class-by-class matrices are compared:

- ``M``, the teacher's class-wise mean softmax: ``M[j, i]`` is the mean, over
  the images of class ``j``, of the teacher's probability for class ``i`` (T = 1);
- ``Q``, a model's hard confusion matrix: ``Q[j, i]`` is the fraction of class-``j``
  images predicted as ``i``.

Rows are the true class, columns the predicted class. The diagonal says how
accurate a model is, not which classes it confuses, so every measure here looks at
the off-diagonal entries only. The paper reports three measures (Pearson, per-class
cosine, soft Jaccard; its values are in ``cdlib.experiments.paper``); we add Spearman,
a comparison of the spectra, a shuffled control and tracking over training epochs.

Everything is computed in float64 numpy. Inputs may be numpy arrays, anything
``np.asarray`` accepts, or torch tensors (on any device).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import special
from scipy.stats import rankdata

# Similarity measures, in the order of every table and figure.
MEASURES = ("pearson", "cosine", "soft_jaccard", "spearman", "spectral_overlap")


# ---------------------------------------------------------------------------
# Input conversion


def _numpy(x, dtype) -> np.ndarray:
    """numpy copy of ``x``; torch tensors are detached and moved to the CPU first."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.array(x, dtype=dtype)


def as_matrix(a) -> np.ndarray:
    """float64 numpy copy of a square (C, C) matrix, C >= 2."""
    a = _numpy(a, np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 2:
        raise ValueError(f"expected a square (C, C) matrix with C >= 2, got shape {a.shape}")
    return a


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_matrix(a), as_matrix(b)
    if a.shape != b.shape:
        raise ValueError(f"matrices differ in shape: {a.shape} vs {b.shape}")
    return a, b


def _class_labels(labels, num_classes: int, what: str) -> np.ndarray:
    labels = _numpy(labels, np.int64)
    if labels.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{what} must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return labels


# ---------------------------------------------------------------------------
# The two matrices


def confusion_counts(labels, predictions, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: entry [j, i] = number of class-j samples predicted as i."""
    labels = _class_labels(labels, num_classes, "labels")
    predictions = _class_labels(predictions, num_classes, "predictions")
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.shape[0]} labels but {predictions.shape[0]} predictions")
    flat = np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def row_normalise(counts, eps: float = 1e-8) -> np.ndarray:
    """Add ``eps`` to every entry, then divide each row by its sum.

    ``eps = 1e-8`` is what the authors' code adds. It makes a row with no samples
    uniform instead of 0/0. With ``eps = 0`` such a row stays all zero.
    """
    x = as_matrix(counts)
    if (x < 0).any():
        raise ValueError("counts must be non-negative")
    x += eps
    totals = x.sum(axis=1, keepdims=True)
    return np.divide(x, totals, out=np.zeros_like(x), where=totals > 0)


def hard_confusion(labels, predictions, num_classes: int, eps: float = 1e-8) -> np.ndarray:
    """Q: the row-normalised confusion matrix (each row sums to 1; see ``row_normalise``)."""
    return row_normalise(confusion_counts(labels, predictions, num_classes), eps)


def class_mean_softmax(probs, labels, num_classes: int, from_logits: bool = False) -> np.ndarray:
    """M: row j = mean of the (N, C) probabilities over the samples of class j.

    Pass ``from_logits=True`` to give logits (the softmax is then taken at T = 1).
    Every class needs at least one sample: the mean of nothing is not a
    distribution, and inventing one would bias the comparison.
    """
    p = _numpy(probs, np.float64)
    if from_logits:
        p = special.softmax(p, axis=-1)
    labels = _class_labels(labels, num_classes, "labels")
    if p.shape != (labels.shape[0], num_classes):
        raise ValueError(f"probabilities have shape {p.shape}, expected ({labels.shape[0]}, {num_classes})")
    if not from_logits and not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("rows of probs do not sum to 1; pass from_logits=True for logits")
    sizes = np.bincount(labels, minlength=num_classes)
    if (sizes == 0).any():
        raise ValueError(f"classes without samples: {np.flatnonzero(sizes == 0).tolist()}")
    sums = np.zeros((num_classes, num_classes))
    np.add.at(sums, labels, p)
    return sums / sizes[:, None]


# ---------------------------------------------------------------------------
# Similarity of two matrices, off-diagonal entries only


def offdiagonal(a) -> np.ndarray:
    """(C, C-1): row j of ``a`` without its diagonal entry, columns in order."""
    a = as_matrix(a)
    c = a.shape[0]
    return a[~np.eye(c, dtype=bool)].reshape(c, c - 1)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two vectors; NaN when either is constant (undefined)."""
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denom) if denom > 0 else float("nan")


def offdiag_pearson(a, b) -> float:
    """Pearson correlation over all C(C-1) off-diagonal entries (the paper's first measure)."""
    a, b = _pair(a, b)
    return _pearson(offdiagonal(a).ravel(), offdiagonal(b).ravel())


def offdiag_spearman(a, b) -> float:
    """Spearman rank correlation over all off-diagonal entries (ties get mean ranks).

    Insensitive to monotone distortions, e.g. the teacher's softmax being sharper or
    flatter than the baseline's error rates.
    """
    a, b = _pair(a, b)
    return _pearson(rankdata(offdiagonal(a).ravel()), rankdata(offdiagonal(b).ravel()))


def row_cosines(a, b) -> np.ndarray:
    """(C,) cosine between row j of ``a`` and of ``b``, diagonal removed.

    A zero row has no direction. We count two zero rows as agreeing (1: neither
    model confuses class j with anything, e.g. a perfectly classified class under
    ``eps = 0``) and one zero row against a non-zero one as sharing nothing (0).
    This keeps identical matrices at 1 and every value in [-1, 1].
    """
    a, b = _pair(a, b)
    ra, rb = offdiagonal(a), offdiagonal(b)
    na, nb = np.linalg.norm(ra, axis=1), np.linalg.norm(rb, axis=1)
    dots = (ra * rb).sum(axis=1)
    both = (na > 0) & (nb > 0)
    out = np.where((na == 0) & (nb == 0), 1.0, 0.0)
    out[both] = dots[both] / (na[both] * nb[both])
    return out


def mean_row_cosine(a, b) -> float:
    """Mean over classes of ``row_cosines`` (the paper's per-class cosine)."""
    return float(row_cosines(a, b).mean())


def row_soft_jaccard(a, b) -> np.ndarray:
    """(C,) soft Jaccard J_j = sum_{i != j} min(a, b) / sum_{i != j} max(a, b).

    Defined for non-negative matrices. Unlike the cosine, it depends on scale: a row
    of ``a`` that is c times a row of ``b`` scores 1/c. So it is low when the teacher
    puts less probability mass off the diagonal than the baseline makes errors.
    Two zero rows give 0/0; as for the cosine we count them as agreeing (1).
    """
    a, b = _pair(a, b)
    if (a < 0).any() or (b < 0).any():
        raise ValueError("soft Jaccard needs non-negative matrices")
    ra, rb = offdiagonal(a), offdiagonal(b)
    num, den = np.minimum(ra, rb).sum(axis=1), np.maximum(ra, rb).sum(axis=1)
    return np.divide(num, den, out=np.ones_like(num), where=den > 0)


def mean_soft_jaccard(a, b) -> float:
    """Mean over classes of ``row_soft_jaccard`` (the paper's soft Jaccard)."""
    return float(row_soft_jaccard(a, b).mean())


def offdiag_spectrum(a) -> np.ndarray:
    """Singular values of ``a`` with its diagonal set to zero, divided by their sum.

    Dividing by the sum turns the spectrum into a distribution over ranks: it keeps
    its shape (few strong confusion patterns, or many weak ones) and drops the
    overall off-diagonal mass, which mostly reflects accuracy. All zeros when the
    off-diagonal part is zero.
    """
    a = as_matrix(a)
    np.fill_diagonal(a, 0.0)
    s = np.linalg.svd(a, compute_uv=False)
    total = s.sum()
    return s / total if total > 0 else s


def spectral_overlap(a, b) -> float:
    """sum_k min(s_a[k], s_b[k]) of the two normalised spectra = 1 - total variation distance.

    1 when the spectra have the same shape, 0 when they share no mass. Spectra ignore
    which classes are confused (they are invariant to relabelling), so this says
    whether two matrices are equally structured, not whether the structure is the
    same; the entry-wise measures say that. It is also a weak test on its own:
    confusions inside super-classes make a nearly full-rank block-diagonal part, and
    a within-row shuffle keeps every row's values, so shuffled and unshuffled
    spectra of 100-class matrices differ little.
    """
    a, b = _pair(a, b)
    sa, sb = offdiag_spectrum(a), offdiag_spectrum(b)
    if sa.sum() == 0 and sb.sum() == 0:
        return 1.0  # two zero off-diagonal parts agree, as in row_cosines
    return float(np.minimum(sa, sb).sum())


def effective_rank(a) -> float:
    """exp(entropy) of the normalised off-diagonal spectrum (Roy & Vetterli 2007)."""
    s = offdiag_spectrum(a)
    s = s[s > 0]
    return float(np.exp(-(s * np.log(s)).sum()))


def similarity(a, b) -> dict[str, float]:
    """All measures of ``MEASURES`` for one pair of matrices."""
    return {
        "pearson": offdiag_pearson(a, b),
        "cosine": mean_row_cosine(a, b),
        "soft_jaccard": mean_soft_jaccard(a, b),
        "spearman": offdiag_spearman(a, b),
        "spectral_overlap": spectral_overlap(a, b),
    }


# ---------------------------------------------------------------------------
# Shuffled control: what the measures give without shared class structure


def shuffle_offdiagonal(a, seed=None) -> np.ndarray:
    """Copy of ``a`` with each row's off-diagonal entries randomly permuted.

    The diagonal and each row's multiset of off-diagonal values (hence row sums and
    per-class error rates) are kept; which classes are confused with which is lost.
    ``seed`` is anything ``np.random.default_rng`` accepts, a Generator included.
    """
    rng = np.random.default_rng(seed)
    a = as_matrix(a)
    rows = rng.permuted(offdiagonal(a), axis=1)
    a[~np.eye(a.shape[0], dtype=bool)] = rows.ravel()
    return a


def shuffled_values(a, b, num_shuffles: int = 100, seed=0) -> pd.DataFrame:
    """The null distribution: one row per shuffled copy of ``b``, a column per measure of
    ``a`` against it (``shuffle_offdiagonal``, copies drawn from one generator seeded by ``seed``)."""
    if num_shuffles < 2:
        raise ValueError(f"need at least 2 shuffles for a spread, got {num_shuffles}")
    rng = np.random.default_rng(seed)
    a, b = _pair(a, b)
    return pd.DataFrame([similarity(a, shuffle_offdiagonal(b, rng)) for _ in range(num_shuffles)],
                        columns=list(MEASURES))


def shuffled_control(a, b, num_shuffles: int = 100, seed=0) -> dict[str, tuple[float, float]]:
    """Measures of ``a`` against ``num_shuffles`` shuffled copies of ``b``: measure -> (mean, std).

    The std is the sample std (ddof = 1) of the null distribution.
    """
    values = shuffled_values(a, b, num_shuffles, seed)
    return {m: (float(values[m].mean()), float(values[m].std(ddof=1))) for m in MEASURES}


# ---------------------------------------------------------------------------
# Training curves and class order


def similarity_over_epochs(
    m, counts_per_epoch, eps: float = 1e-8, epochs: Sequence[int] | None = None
) -> pd.DataFrame:
    """Measures of ``m`` against each epoch's row-normalised confusion counts.

    ``counts_per_epoch`` is (E, C, C). One row per epoch (index ``epochs``, by
    default 0..E-1), a column per measure, plus ``accuracy`` (trace / total of the
    counts) because confusion structure changes with accuracy and should be read
    next to it.
    """
    counts = _numpy(counts_per_epoch, np.float64)
    if counts.ndim != 3:
        raise ValueError(f"counts_per_epoch must be (E, C, C), got shape {counts.shape}")
    epochs = range(counts.shape[0]) if epochs is None else list(epochs)
    rows = []
    for c in counts:
        row = similarity(m, row_normalise(c, eps))
        row["accuracy"] = float(np.trace(c) / c.sum()) if c.sum() > 0 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows, index=pd.Index(epochs, name="epoch"))


def superclass_order(superclass_of=None, num_classes: int | None = None) -> np.ndarray:
    """Permutation listing classes by super-class, then by class index.

    With ``superclass_of = None`` it is the identity on ``num_classes`` classes.
    """
    if superclass_of is None:
        if num_classes is None:
            raise ValueError("give superclass_of or num_classes")
        return np.arange(num_classes)
    superclass_of = _numpy(superclass_of, np.int64)
    # A stable sort keeps class-index order inside each super-class.
    return np.argsort(superclass_of, kind="stable")
