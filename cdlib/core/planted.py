"""Synthetic activations with planted features: an Interaction Tensor whose answer is known, for
the tests, the benchmark and sanity checks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class PlantedFeatures:
    """Activations of M synthetic "models" built from known binary latent features.

    ``supports[l]`` (N,) bool: the images on which latent feature l is on. Features
    0..n_shared-1 are shared (several models see each); the rest are private, one
    model each. ``features_of[m]`` (K,): the latent features model m sees.
    Model m's activations are sum_l amplitude[m, l] * supports[l] * axis[m, l] plus
    Gaussian noise, with orthonormal random axes in D dimensions (a random rotation
    per model). Amplitudes give each model's features variances spread evenly on a
    log scale over a decade, so that PCA can tell them apart; every model's features
    are on for exactly ``on_fraction * N * K`` (image, feature) pairs, so that the
    presence rule at the ``100 * (1 - on_fraction)`` percentile separates on from
    off exactly.
    """

    supports: np.ndarray
    features_of: np.ndarray
    n_shared: int
    n_dims: int
    noise: float
    seed: int

    @property
    def n_models(self) -> int:
        return len(self.features_of)

    def activations(self, m: int) -> np.ndarray:
        """Model m's (N, D) float32 activations; regenerated identically on every call."""
        rng = np.random.default_rng([self.seed, 1, m])
        features = self.features_of[m]
        codes = self.supports[features].T.astype(np.float64)          # (N, K)
        on_fraction = codes.mean(axis=0)
        variance = np.logspace(0.0, -1.0, len(features))[rng.permutation(len(features))]
        amplitude = np.sqrt(variance / (on_fraction * (1.0 - on_fraction)))
        # Linear algebra in torch, like the build, so that one BLAS thread pool serves
        # both (see principal_projections).
        axes = torch.linalg.qr(torch.from_numpy(rng.standard_normal((self.n_dims, len(features))))).Q
        clean = (torch.from_numpy(codes * amplitude) @ axes.T).float().numpy()
        return clean + np.float32(self.noise) * rng.standard_normal(clean.shape, dtype=np.float32)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.activations(m) for m in range(self.n_models))


def planted_features(
    n_models: int,
    n_images: int,
    n_dims: int,
    n_shared: int,
    shared_per_model: int,
    private_per_model: int,
    on_fraction: float = 0.1,
    noise: float = 0.05,
    seed: int = 0,
) -> PlantedFeatures:
    """Draw a :class:`PlantedFeatures` problem (see there).

    Each model sees ``shared_per_model`` of the ``n_shared`` shared features, drawn
    at random, and ``private_per_model`` features of its own (K is their sum).
    Shared features are on for between 0.5 and 1.5 times ``on_fraction * N``
    images; private ones take up the rest of the model's exact quota.
    """
    rng = np.random.default_rng([seed, 0])
    n_per_model = shared_per_model + private_per_model
    quota = on_fraction * n_images * n_per_model
    if private_per_model < 1 or not quota.is_integer() or not 0 < on_fraction < 2 / 3:
        raise ValueError("need private features, 0 < on_fraction < 2/3 (no feature on for every image) "
                         "and an integer on_fraction * N * K to fill the quota exactly")
    shared_counts = np.rint(on_fraction * n_images * rng.uniform(0.5, 1.5, n_shared)).astype(int)
    features_of, counts = [], list(shared_counts)
    for m in range(n_models):
        shared = np.sort(rng.choice(n_shared, shared_per_model, replace=False))
        left = int(quota) - int(shared_counts[shared].sum())
        private_counts = [left // private_per_model + (i < left % private_per_model) for i in range(private_per_model)]
        if min(private_counts) < 1 or max(private_counts) >= n_images:
            raise ValueError(f"model {m}: private features cannot fill the quota; add private features")
        private = n_shared + m * private_per_model + np.arange(private_per_model)
        features_of.append(np.concatenate([shared, private]))
        counts.extend(private_counts)
    supports = np.zeros((len(counts), n_images), dtype=bool)
    for feature, count in enumerate(counts):
        supports[feature, rng.choice(n_images, count, replace=False)] = True
    return PlantedFeatures(supports=supports, features_of=np.array(features_of), n_shared=n_shared,
                           n_dims=n_dims, noise=noise, seed=seed)
