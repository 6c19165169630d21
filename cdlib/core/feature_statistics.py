"""Feature usage by groups of models (baselines, KD students, teachers, CD models), from an
Interaction Tensor (``cdlib.core.interaction``): the statistics of the paper's Sections 3.3-3.4
and Figure 1, accumulated model by model from the tensor's compact form."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from cdlib.core.interaction import InteractionTensor


@dataclass(frozen=True, eq=False)
class GroupStatistics:
    """Feature usage of one group of models (baseline, student, teacher, cd, ...).

    ``frequency[t]`` F_t: images on which some model of the group uses feature t;
    ``features_per_image[n]``: features some model of the group uses on image n;
    ``models_per_feature[t]``: models of the group that use feature t on some image;
    ``num_features[n]``: sum over the group's models of the features each uses on
    image n (the un-binarised y-axis of the paper's KDE plots);
    ``confidence[n]``: true-class probability averaged over the group's models
    (None when no probabilities were given).
    """

    name: str
    models: tuple[int, ...]
    frequency: np.ndarray
    features_per_image: np.ndarray
    models_per_feature: np.ndarray
    num_features: np.ndarray
    confidence: np.ndarray | None

    @property
    def used(self) -> np.ndarray:
        """(T,) bool: features with F_t > 0."""
        return self.frequency > 0

    @property
    def n_features(self) -> int:
        """|F|: number of features the group uses."""
        return int(self.used.sum())

    @property
    def mean_frequency(self) -> float:
        """E[F]: mean F_t over the features the group uses."""
        return float(self.frequency[self.used].mean()) if self.n_features else float("nan")

    @property
    def mean_features_per_image(self) -> float:
        """D: mean over images of the features used on each."""
        return float(self.features_per_image.mean())


def group_statistics(
    tensor: InteractionTensor,
    name: str,
    models: Sequence[int],
    true_class_prob: np.ndarray | None = None,
) -> GroupStatistics:
    """Statistics of the models ``models`` (indices into the tensor) under ``name``.

    ``true_class_prob``: optional (M, N) array, the softmax probability each model
    gives each image's true class. Works model by model on the compact form: the
    largest array is one N x T bool (7.5 MB for the paper's tensor).
    """
    models = tuple(int(m) for m in models)
    if not models or len(set(models)) != len(models):
        raise ValueError(f"group {name!r} needs distinct model indices, got {models}")
    used_on_image = np.zeros((tensor.n_images, tensor.n_clusters), dtype=bool)
    models_per_feature = np.zeros(tensor.n_clusters, dtype=np.int64)
    num_features = np.zeros(tensor.n_images, dtype=np.int64)
    for m in models:
        ids, on = tensor.model_features(m)
        used_on_image[:, ids] |= on
        models_per_feature[ids] += on.any(axis=0)
        num_features += on.sum(axis=1)
    confidence = None
    if true_class_prob is not None:
        true_class_prob = np.asarray(true_class_prob, dtype=np.float64)
        if true_class_prob.shape != (tensor.n_models, tensor.n_images):
            raise ValueError(f"true_class_prob must be (M, N) = {(tensor.n_models, tensor.n_images)}")
        confidence = true_class_prob[list(models)].mean(axis=0)
    return GroupStatistics(
        name=name,
        models=models,
        frequency=used_on_image.sum(axis=0),
        features_per_image=used_on_image.sum(axis=1),
        models_per_feature=models_per_feature,
        num_features=num_features,
        confidence=confidence,
    )


def shared_features(groups: Sequence[GroupStatistics]) -> np.ndarray:
    """(T,) bool: features used (F_t > 0) by every one of ``groups``."""
    return np.logical_and.reduce([g.used for g in groups])


def shared_frequencies(groups: Sequence[GroupStatistics]) -> dict[str, np.ndarray]:
    """Each group's F_t restricted to the features all ``groups`` share."""
    common = shared_features(groups)
    return {g.name: g.frequency[common] for g in groups}


def summary_table(groups: Sequence[GroupStatistics], paper: Mapping | None = None) -> pd.DataFrame:
    """The paper's Section 3 statistics for ``groups``, with reference values beside ours.

    Columns: statistic, groups, paper, ours. ``paper`` holds the reference values, keyed
    (statistic, group name) or (statistic, frozenset of group names), e.g.
    ``cdlib.experiments.paper.interaction_statistics(names)``; the paper column is NaN
    where it has none.
    """
    names = [g.name for g in groups]
    paper = paper or {}
    rows = []

    def add(statistic: str, members: Sequence[str], ours: float) -> None:
        key = members[0] if len(members) == 1 else frozenset(members)
        rows.append({"statistic": statistic, "groups": " & ".join(members),
                     "paper": paper.get((statistic, key), np.nan), "ours": ours})

    for g in groups:
        add("features |F|", [g.name], g.n_features)
    for g in groups:
        add("mean frequency E[F]", [g.name], g.mean_frequency)
    common = shared_frequencies(groups)
    add("features shared by all groups", names, int(shared_features(groups).sum()))
    for g in groups:
        shared = common[g.name]
        add("mean frequency of features shared by all", [g.name], float(shared.mean()) if shared.size else np.nan)
    if len(groups) > 2:
        for a, b in itertools.combinations(groups, 2):
            add("features shared by the pair", [a.name, b.name], int(shared_features([a, b]).sum()))
    for g in groups:
        add("features per image D", [g.name], g.mean_features_per_image)
    return pd.DataFrame(rows, columns=["statistic", "groups", "paper", "ours"])
