"""The Interaction Tensor (Jiang, Baek & Kolter, ICLR 2024) as the paper applies it.

Pipeline (the paper's Sections 3.2-3.4), for M models and N images:

1. activations of each model (pooled penultimate layer by default);
2. per model, PCA to K components: projections P_m (N x K);
3. Pearson correlation between every pair of the M*K components over the N images;
4. threshold gamma_corr = a percentile of |correlation| over cross-model pairs;
5. greedy clustering ("Algorithm 1") of the M*K components into T features;
6. presence: component k of model m is *on* for image n where its max-normalised
   projection exceeds the model's presence percentile;
7. Omega[m, n, t] = 1 iff some component of model m in feature t is on for image n.

Omega (M x N x T, 1.8 GB as the authors' dense int32 for 60 models) is never
materialised. :class:`InteractionTensor` keeps per-model presence (M x N x K bool)
and the component -> feature map (M x K), builds one model's N x T slice on demand,
and every group statistic is accumulated model by model from that compact form.

The statistics of groups of models (Section 3.3-3.4) are ``cdlib.core.feature_statistics``';
activations with planted features, a tensor whose answer is known, are ``cdlib.core.planted``'s.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from cdlib.core.util import resolve_device, true_fp32

LAYERS = ("pooled", "map")


# --------------------------------------------------------------------------------------
# Step 1: activations
# --------------------------------------------------------------------------------------

def iter_activations(
    models: Iterable[torch.nn.Module],
    images: torch.Tensor,
    layer: str = "pooled",
    batch_size: int = 500,
    device: str | torch.device | None = None,
) -> Iterator[np.ndarray]:
    """Yield each model's activations on ``images`` as an (N, D) float32 array.

    ``images`` is an already-normalised float tensor (N, 3, H, W). ``layer="pooled"``
    calls ``model.features(x)`` (the global-average-pooled penultimate vector),
    ``layer="map"`` calls ``model.feature_map(x)`` and flattens (D, h, w) to D*h*w.
    Feeding this generator straight into :func:`build_interaction_tensor` keeps one
    model's activations in memory at a time, which matters for the 8192-wide "map"
    layer. Each model is run in eval mode, without gradients, in float32 (autocast
    is switched off so an enclosing bf16 context cannot leak in), and handed back in
    its original mode and on its original device.
    """
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
    device = resolve_device(device)
    for model in models:
        yield _model_activations(model, images, layer, batch_size, device)


def collect_activations(
    models: Iterable[torch.nn.Module],
    images: torch.Tensor,
    layer: str = "pooled",
    batch_size: int = 500,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """All models' activations stacked as an (M, N, D) float32 array (see :func:`iter_activations`)."""
    return np.stack(list(iter_activations(models, images, layer, batch_size, device)))


def _model_activations(model, images, layer, batch_size, device) -> np.ndarray:
    first_parameter = next(model.parameters(), None)
    home = first_parameter.device if first_parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval().to(device)
    chunks = []
    try:
        # True fp32 (no TF32 on CUDA): presence decisions at the percentile threshold must match the CPU's.
        with torch.no_grad(), torch.autocast(device.type, enabled=False), true_fp32():
            for start in range(0, len(images), batch_size):
                batch = images[start:start + batch_size].to(device, torch.float32)
                if layer == "pooled":
                    out = model.features(batch)
                else:
                    out = model.feature_map(batch).flatten(1)
                chunks.append(out.float().cpu())
    finally:
        model.train(was_training).to(home)
    return torch.cat(chunks).numpy()


# --------------------------------------------------------------------------------------
# Steps 2 and 6: per-model PCA and presence
# --------------------------------------------------------------------------------------

PAPER_COMPONENTS = 50  # K, the principal axes kept per model in the paper


def principal_projections(
    activations: np.ndarray | torch.Tensor,
    n_components: int = PAPER_COMPONENTS,
    centered: bool = True,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Project one model's (N, D) activations on its top ``n_components`` principal axes.

    Returns (N, K) float64, columns in descending order of variance, each oriented
    by :func:`orient_components`. ``centered=False`` skips mean removal: the
    uncentred SVD the released code used for the CD tensor.

    The axes are eigenvectors of the smaller Gram matrix (D x D for pooled layers,
    N x N when D > N), computed in float64 so that the threshold decisions downstream
    do not hinge on rounding. All of the build's linear algebra runs in torch, on
    ``device``, so that one BLAS thread pool does it all: on the 2-core benchmark
    machine, numpy's OpenBLAS threads spinning beside torch's made a 512 x 512
    eigendecomposition take seconds instead of 0.1 s.
    """
    x = torch.as_tensor(activations).to(device=resolve_device(device), dtype=torch.float64)
    n, d = x.shape
    if not 0 < n_components <= min(n, d):
        raise ValueError(f"n_components must be in 1..{min(n, d)}, got {n_components}")
    if centered:
        x = x - x.mean(dim=0)
    if d <= n:
        _, axes = _top_eigenpairs(x.T @ x, n_components)
        projections = x @ axes
    else:
        # Eigenvectors of x x^T are the left singular vectors; scaled by the singular
        # values they are the projections themselves.
        values, vectors = _top_eigenpairs(x @ x.T, n_components)
        projections = vectors * values.clamp_min(0).sqrt()
    return orient_components(projections.cpu().numpy())


def _top_eigenpairs(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest eigenvalues of a symmetric matrix and their eigenvectors, largest first."""
    if gram.device.type == "cpu":
        # The tridiagonal reduction is a long chain of small steps whose threads mostly
        # wait on each other: on 2 busy cores one thread took 0.1 s for D = 512 where
        # two took 3-7 s.
        with _torch_threads(1):
            values, vectors = torch.linalg.eigh(gram)
    else:
        values, vectors = torch.linalg.eigh(gram)
    return values[-k:].flip(0), vectors[:, -k:].flip(1)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def orient_components(projections: np.ndarray) -> np.ndarray:
    """Flip each column so that its largest-magnitude entry is positive.

    A principal axis is defined only up to sign, and the presence rule is signed, so
    the sign must be fixed by a convention, not left to the eigensolver. This is the
    classic scikit-learn ``svd_flip`` convention on the scores: the image that loads
    most strongly on a component loads positively, so the max-normalised column
    reaches +1 and "on" means the component's strongest tail. (The released code
    does not state one; its orientation is whatever its solver returned.)
    """
    strongest = np.abs(projections).argmax(axis=0)
    signs = np.sign(projections[strongest, np.arange(projections.shape[1])])
    signs[signs == 0] = 1.0
    return projections * signs


def presence(projections: np.ndarray, percentile: float = 90.0) -> np.ndarray:
    """Which (image, component) pairs of one model are on: (N, K) bool.

    Each column is divided by its max |value| over the N images; an entry is on
    where that normalised value exceeds the ``percentile`` of the model's whole
    N x K normalised matrix. The comparison is signed, as in the released code: only
    the positive tail of a component can be on. Negating a column therefore moves
    its "on" set to the other tail (and shifts the model's threshold, which is taken
    over the negated matrix); :func:`orient_components` fixes which tail that is.
    """
    scale = np.abs(projections).max(axis=0)
    normalised = projections / np.where(scale > 0, scale, 1.0)
    return normalised > np.percentile(normalised, percentile)


# --------------------------------------------------------------------------------------
# Steps 3-5: cross-model correlation, threshold, greedy clustering
# --------------------------------------------------------------------------------------

def column_correlation(columns: np.ndarray, device: str | torch.device | None = None) -> np.ndarray:
    """Pearson correlation between all columns of an (N, C) matrix: (C, C) float64.

    With the M models' projections side by side (model-major, C = M*K), entry
    [m*K + k, p*K + q] is Lambda[m, p, k, q] of the paper. A constant column (a
    component with no variance) correlates 0 with everything rather than NaN.
    """
    z = torch.as_tensor(columns).to(device=resolve_device(device), dtype=torch.float64)
    z = z - z.mean(dim=0)
    std = z.std(dim=0, correction=0)
    std[std == 0] = 1.0
    z /= std
    return (z.T @ z / len(z)).cpu().numpy()


def correlation_threshold(abs_corr: np.ndarray, model_of: np.ndarray, percentile: float = 99.0) -> float:
    """gamma_corr: the ``percentile`` of |Lambda| over all cross-model entries.

    The population is every entry of the M x M x K x K tensor Lambda[m, p, k, q]
    with m != p (both orders, as the tensor holds them). Same-model entries are left
    out because they say nothing about whether two models share a feature: the
    diagonal is 1 by definition and, after centred PCA, the other same-model entries
    are exactly 0 (principal components are uncorrelated). Including them would put a
    fraction 1/M of the mass at 0 and 1 and shift the threshold with the number of
    models. ``model_of[c]`` is the model of column c of ``abs_corr``.
    """
    cross_model = model_of[:, None] != model_of[None, :]
    return float(np.percentile(abs_corr[cross_model], percentile))


def greedy_clusters(abs_corr: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm 1: cluster C components given their (C, C) |correlation| matrix.

    Components are visited in order (model-major, then component). An unassigned one
    opens a new cluster; every component whose |correlation| with it exceeds
    ``gamma`` and exceeds the best |correlation| it has had so far joins that
    cluster (moving out of its previous one). The "best so far" is kept as a float,
    as intended; the released code kept it in an integer tensor, which truncates it
    to 0 so that any later match above gamma steals the component. A cluster's
    opener counts its self-correlation, 1, as its best, so it is never taken away and
    no cluster is left empty. All components, including the opener's own model's,
    are candidates, as in the algorithm; after centred PCA same-model correlations
    are 0, so this matters only for the uncentred variant.

    The result depends on the visiting order only where a component matches several
    openers above gamma; where matches are unambiguous it is order-independent up to
    relabelling.

    Returns ``cluster_of`` (C,) int64 cluster ids 0..T-1 in order of opening, and
    ``match_corr`` (C,) the |correlation| with which each component joined (1 for
    openers).
    """
    n = len(abs_corr)
    cluster_of = np.full(n, -1, dtype=np.int64)
    match_corr = np.zeros(n)
    n_clusters = 0
    for opener in range(n):
        if cluster_of[opener] >= 0:
            continue
        row = abs_corr[opener]
        joins = (row > gamma) & (row > match_corr)
        joins[opener] = True
        cluster_of[joins] = n_clusters
        match_corr[joins] = row[joins]
        match_corr[opener] = 1.0
        n_clusters += 1
    return cluster_of, match_corr


# --------------------------------------------------------------------------------------
# The tensor
# --------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class InteractionTensor:
    """Omega in compact form, with every parameter that produced it.

    ``presence[m, n, k]``: component k of model m is on for image n (M x N x K bool);
    ``cluster_of[m, k]``: the feature (cluster) t in 0..T-1 of that component;
    ``match_corr[m, k]``: the |correlation| with which it joined (1 for openers).
    """

    presence: np.ndarray
    cluster_of: np.ndarray
    match_corr: np.ndarray
    n_clusters: int
    gamma_corr: float
    n_components: int
    centered: bool
    corr_percentile: float
    presence_percentile: float
    layer: str
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall time of each build stage; not saved

    @property
    def n_models(self) -> int:
        return self.presence.shape[0]

    @property
    def n_images(self) -> int:
        return self.presence.shape[1]

    @property
    def nbytes(self) -> int:
        return self.presence.nbytes + self.cluster_of.nbytes + self.match_corr.nbytes

    def model_features(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Model m's non-zero part of Omega: feature ids (U,) and an (N, U) bool slice.

        U <= K: the distinct features model m's components belong to; column u is
        the OR of the presence of m's components in feature ids[u].
        """
        clusters = self.cluster_of[m]
        order = np.argsort(clusters, kind="stable")
        ids, starts = np.unique(clusters[order], return_index=True)
        on = np.logical_or.reduceat(self.presence[m][:, order], starts, axis=1)
        return ids, on

    def omega(self, m: int) -> np.ndarray:
        """Omega[m] as an (N, T) bool array."""
        ids, on = self.model_features(m)
        out = np.zeros((self.n_images, self.n_clusters), dtype=bool)
        out[:, ids] = on
        return out

    def save(self, path: str | Path) -> None:
        """Write to a compressed ``.npz`` (presence packed to bits)."""
        np.savez_compressed(
            path,
            presence_bits=np.packbits(self.presence, axis=1),
            n_images=self.n_images,
            cluster_of=self.cluster_of,
            match_corr=self.match_corr,
            **{name: getattr(self, name) for name in _SCALAR_FIELDS},
        )

    @classmethod
    def load(cls, path: str | Path) -> "InteractionTensor":
        """Read what :meth:`save` wrote."""
        with np.load(path) as stored:
            presence_bits = np.unpackbits(stored["presence_bits"], axis=1, count=int(stored["n_images"]))
            return cls(
                presence=presence_bits.astype(bool),
                cluster_of=stored["cluster_of"],
                match_corr=stored["match_corr"],
                **{name: kind(stored[name]) for name, kind in _SCALAR_FIELDS.items()},
            )


class _Stopwatch:
    """Wall time accumulated per named stage: each lap is charged to the stage it ends."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._last
        self._last = now


# The tensor's scalar fields and their types, for saving and loading.
_SCALAR_FIELDS = {
    "n_clusters": int, "gamma_corr": float, "n_components": int, "centered": bool,
    "corr_percentile": float, "presence_percentile": float, "layer": str,
}


def build_interaction_tensor(
    activations: Iterable[np.ndarray | torch.Tensor],
    *,
    n_components: int = PAPER_COMPONENTS,
    centered: bool = True,
    corr_percentile: float = 99.0,
    presence_percentile: float = 90.0,
    layer: str = "pooled",
    device: str | torch.device | None = None,
) -> InteractionTensor:
    """Build the Interaction Tensor from per-model activations.

    ``activations``: an (M, N, D) array or any iterable of per-model (N, D) arrays,
    e.g. :func:`iter_activations`, so that only one model's activations need be in
    memory. ``layer`` names where they came from and is recorded, not used. Defaults
    are the paper's: K = 50, centred PCA, gamma_corr at the 99th percentile of
    cross-model |correlation|, presence above each model's 90th percentile.
    ``device``: where the large products run (default: CUDA when available).
    """
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
    watch = _Stopwatch()
    projections, presences = [], []
    for model_activations in activations:
        watch.lap("activations")
        projected = principal_projections(model_activations, n_components, centered, device)
        watch.lap("pca")
        presences.append(presence(projected, presence_percentile))
        projections.append(projected)
        watch.lap("presence")
    watch.lap("activations")
    n_models = len(projections)
    if n_models < 2:
        raise ValueError("the Interaction Tensor needs at least two models")

    # Drop each copy of the projections as soon as the next exists (240 MB each at
    # the paper's size).
    columns = np.concatenate(projections, axis=1)
    del projections
    abs_corr = np.abs(column_correlation(columns, device))
    del columns
    # Rounding can push |r| of identical columns a hair above 1, where it would beat
    # an opener's self-correlation.
    np.minimum(abs_corr, 1.0, out=abs_corr)
    watch.lap("correlation")

    model_of = np.repeat(np.arange(n_models), n_components)
    gamma = correlation_threshold(abs_corr, model_of, corr_percentile)
    watch.lap("threshold")
    cluster_of, match_corr = greedy_clusters(abs_corr, gamma)
    watch.lap("clustering")

    return InteractionTensor(
        presence=np.stack(presences),
        cluster_of=cluster_of.reshape(n_models, n_components).astype(np.int32),
        match_corr=match_corr.reshape(n_models, n_components),
        n_clusters=int(cluster_of.max()) + 1,
        gamma_corr=gamma,
        n_components=n_components,
        centered=centered,
        corr_percentile=corr_percentile,
        presence_percentile=presence_percentile,
        layer=layer,
        stage_seconds=watch.seconds,
    )
