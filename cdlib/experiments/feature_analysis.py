"""The paper's Section 3 from the run store: what KD students learn (claims 1-3).

:func:`analyse_profile` loads the feature-analysis baselines, the KD students and
their teachers of a profile (``plans.feature_baselines / kd_students / teachers``),
runs every network on the un-augmented test images, builds one Interaction Tensor
over all of them (:mod:`cdlib.core.interaction`) and summarises each group of models,
with each image's confidence taken from the runs' stored test logits. The result is
a :class:`FeatureAnalysis`; :func:`measures_table` and :func:`interaction_claims`
turn it into the numbers behind claims 1-3 and verdicts by stated rules.

:func:`analyse_runs` does the work for any grouping of finished runs (anything with
``load_model``, ``test_logits`` and ``config.run_id()``), so the baseline-vs-CD
tensor of the paper's Section 4.3 is the same call with other groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import warnings

import numpy as np
import pandas as pd
import torch
from scipy import special, stats

from cdlib.experiments import plans
from cdlib.experiments.paper import KD_TENSOR, interaction_statistics
from cdlib.core import runs
from cdlib.experiments.claims import NOT_SUPPORTED, SUPPORTED, Claim, not_measured
from cdlib.core.data import DeviceData, load_dataset
from cdlib.core.util import resolve_device
from cdlib.core.feature_statistics import GroupStatistics, group_statistics, summary_table
from cdlib.core.interaction import PAPER_COMPONENTS, InteractionTensor, build_interaction_tensor, iter_activations
from cdlib.core.models import build_model
from cdlib.experiments.profiles import Profile

KD_GROUPS = ("baseline", "student", "teacher")

# Which plan supplies each group's runs (order within a group: seed 0, 1, ...).
GROUP_PLANS = {
    "baseline": plans.feature_baselines,
    "student": plans.kd_students,
    "teacher": plans.teachers,
    "cd": plans.cd_feature_models,
}

# A feature is "low-frequency" when it is on for fewer than this fraction of the test
# images. Each component is on for 10% of images on average (the presence rule's 90th
# percentile), so 5% is half of what a single component of a single model gives; the
# paper's baseline mean, 1329 of 10,000 images, is 13%.
LOW_FREQUENCY = 0.05


# --------------------------------------------------------------------------------------
# Inputs: test images and confidences
# --------------------------------------------------------------------------------------

def test_images(dataset: str, data_root=None, device=None) -> tuple[torch.Tensor, np.ndarray]:
    """The test images, un-augmented and normalised exactly as in evaluation, on ``device``; and their labels.

    Normalisation uses the training set's per-channel mean and std (:class:`DeviceData`),
    so activations come from the same inputs as the runs' stored test logits.
    """
    ds = load_dataset(dataset, data_root)
    data = DeviceData(ds, "cpu", rotation=0)
    return data.normalise(data.test_images).to(resolve_device(device)), np.asarray(ds.test_labels).copy()


def true_class_probabilities(logits: Iterable[np.ndarray], labels) -> np.ndarray:
    """(M, N) float64: each model's softmax probability (T = 1) of each image's true class.

    ``logits``: one (N, C) array per model, in test-set order (``Run.test_logits()``);
    any iterable, so that only one model's logits need be in memory.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rows = []
    for m, z in enumerate(logits):
        z = np.asarray(z, dtype=np.float64)
        if z.ndim != 2 or len(z) != len(labels):
            raise ValueError(f"model {m}: logits of shape {z.shape} do not match {len(labels)} labels")
        rows.append(special.softmax(z, axis=1)[np.arange(len(labels)), labels])
    return np.stack(rows)


# --------------------------------------------------------------------------------------
# The analysis
# --------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class FeatureAnalysis:
    """One Interaction Tensor over several groups of models, and each group's statistics.

    ``groups``: group name -> :class:`GroupStatistics` (with confidence), in the order
    the groups' models sit in the tensor; ``run_ids``: group name -> the run ids, in
    tensor order; ``labels``: the N test labels.
    """

    tensor: InteractionTensor
    groups: dict[str, GroupStatistics]
    run_ids: dict[str, list[str]]
    labels: np.ndarray
    dataset: str = ""
    profile: str = ""

    @property
    def n_images(self) -> int:
        return self.tensor.n_images

    def statistics(self) -> list[GroupStatistics]:
        return list(self.groups.values())

    def summary_table(self) -> pd.DataFrame:
        """The paper's Section 3 statistics, paper column beside ours (:func:`cdlib.core.feature_statistics.summary_table`)."""
        return summary_table(self.statistics(), interaction_statistics(self.groups))

    def tensor_table(self) -> pd.DataFrame:
        """How the tensor was built: sizes, parameters and the wall time of each stage."""
        t = self.tensor
        rows = {"dataset": self.dataset, "profile": self.profile, "layer": t.layer,
                "models M": t.n_models, **{f"models: {g}": len(s.models) for g, s in self.groups.items()},
                "images N": t.n_images, "components per model K": t.n_components,
                "PCA": "centred" if t.centered else "uncentred SVD",
                "correlation percentile": t.corr_percentile, "gamma_corr": round(t.gamma_corr, 4),
                "presence percentile": t.presence_percentile, "features T": t.n_clusters,
                "compact size (MB)": round(t.nbytes / 2**20, 2),
                **{f"seconds: {k}": round(v, 2) for k, v in t.stage_seconds.items()}}
        return pd.DataFrame({"setting": list(rows), "value": [str(v) for v in rows.values()]})

    def source(self) -> str:
        """One line saying what the numbers come from, for claims."""
        counts = ", ".join(f"{len(s.models)} {g}" for g, s in self.groups.items())
        t = self.tensor
        return (f"{self.dataset}, profile {self.profile}: one tensor of {t.n_models} models ({counts}), "
                f"N = {t.n_images} test images, {t.layer} layer, K = {t.n_components}, "
                f"gamma at the {t.corr_percentile:g}th percentile, T = {t.n_clusters}")

    # Per-group arrays keyed by group name, as cdlib.experiments.interaction_figures takes them.
    def frequencies(self) -> dict[str, np.ndarray]:
        return {g: s.frequency for g, s in self.groups.items()}

    def features_per_image(self) -> dict[str, np.ndarray]:
        return {g: s.features_per_image for g, s in self.groups.items()}

    def confidence_points(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {g: (s.confidence, s.num_features) for g, s in self.groups.items()}


def analyse_runs(
    runs_by_group: Mapping[str, Sequence],
    images: torch.Tensor,
    labels,
    *,
    layer: str = "pooled",
    device=None,
    batch_size: int = 500,
    dataset: str = "",
    profile: str = "",
    **tensor_options,
) -> FeatureAnalysis:
    """Build one Interaction Tensor over every group's runs and compute each group's statistics.

    ``runs_by_group``: group name -> finished runs (anything with ``load_model(device)``,
    ``test_logits()`` and ``config.run_id()``); models enter the tensor group by group,
    in the given order. ``images``: the normalised test images (N, 3, H, W), ideally
    already on ``device``; ``labels`` their classes. Models are loaded one at a time
    and run in batches of ``batch_size`` on ``device`` (default CUDA when available);
    ``tensor_options`` go to :func:`cdlib.core.interaction.build_interaction_tensor`
    (``n_components``, ``centered``, ``corr_percentile``, ``presence_percentile``).
    """
    device = resolve_device(device)
    names = list(runs_by_group)
    members = [list(runs_by_group[g]) for g in names]
    if any(not m for m in members):
        raise ValueError(f"every group needs at least one run: {dict(zip(names, map(len, members)))}")
    ordered = [run for group in members for run in group]
    # Loaded on the CPU; iter_activations moves each to the device for its pass and back.
    models = (run.load_model("cpu") for run in ordered)
    tensor = build_interaction_tensor(iter_activations(models, images, layer, batch_size, device),
                                      layer=layer, device=device, **tensor_options)
    probabilities = true_class_probabilities((run.test_logits() for run in ordered), labels)
    groups, start = {}, 0
    for name, group in zip(names, members):
        groups[name] = group_statistics(tensor, name, range(start, start + len(group)), probabilities)
        start += len(group)
    return FeatureAnalysis(tensor=tensor, groups=groups,
                           run_ids={g: [run.config.run_id() for run in m] for g, m in zip(names, members)},
                           labels=np.asarray(labels), dataset=dataset, profile=profile)


def penultimate_width(config) -> int:
    """D, the pooled penultimate features of ``config``'s network (built on the meta device: no memory)."""
    with torch.device("meta"):
        return build_model(config.arch, 10, config.width).feature_dim


def pooled_components(configs: Iterable, requested: int = PAPER_COMPONENTS) -> int:
    """K for the pooled layer: ``requested`` (the paper's 50 assumes 512 or more features), or, with a
    warning, the narrowest network's feature count where that is smaller (width-1/16 ResNet-18: 32)."""
    narrowest = min(penultimate_width(c) for c in configs)
    if requested <= narrowest:
        return requested
    warnings.warn(f"K = {requested} principal axes asked for, but the narrowest network has {narrowest} pooled "
                  f"features: K = {narrowest}")
    return narrowest


def group_runs(profile: Profile, groups: Sequence[str] = KD_GROUPS, root=None) -> dict[str, list]:
    """Each group's finished runs from the run store (a missing run is an error naming how to train it)."""
    unknown = set(groups) - set(GROUP_PLANS)
    if unknown:
        raise ValueError(f"unknown groups {sorted(unknown)}; known: {list(GROUP_PLANS)}")
    return {g: runs.finished_runs(GROUP_PLANS[g](profile), root) for g in groups}


def analyse_profile(profile: Profile, groups: Sequence[str] = KD_GROUPS, *, device=None, data_root=None,
                    layer: str = "pooled", batch_size: int = 500, **tensor_options) -> FeatureAnalysis:
    """The paper's Section 3 analysis for ``profile``: baselines, KD students and teachers in one tensor.

    Defaults (the paper's Sections 3.2-3.4, and README "Deviations" where its released code
    differs): pooled penultimate layer, K = 50 centred PCA (fewer for networks with fewer pooled
    features: ``pooled_components``), gamma at the 99th percentile,
    presence above the 90th, float "best so far".
    ``groups`` may name any of ``GROUP_PLANS`` (e.g. ``("baseline", "cd")`` for Figure 3).
    """
    device = resolve_device(device)
    by_group = group_runs(profile, groups)
    if layer == "pooled":
        tensor_options["n_components"] = pooled_components(
            [run.config for group in by_group.values() for run in group], tensor_options.get("n_components", PAPER_COMPONENTS))
    images, labels = test_images(profile.dataset, data_root, device)
    return analyse_runs(by_group, images, labels, layer=layer, device=device, batch_size=batch_size,
                        dataset=profile.dataset, profile=profile.name, **tensor_options)


# --------------------------------------------------------------------------------------
# Measures behind claims 1-3
# --------------------------------------------------------------------------------------

def low_frequency_fraction(group: GroupStatistics, n_images: int, threshold: float = LOW_FREQUENCY) -> float:
    """Fraction of the group's features (F_t > 0) that are on for fewer than ``threshold * n_images`` images."""
    used = group.frequency[group.used]
    return float((used < threshold * n_images).mean()) if used.size else float("nan")


def jaccard(a: GroupStatistics, b: GroupStatistics) -> float:
    """|F_a ∩ F_b| / |F_a ∪ F_b| over the features each group uses."""
    union = (a.used | b.used).sum()
    return float((a.used & b.used).sum() / union) if union else float("nan")


def frequency_distance(a: GroupStatistics, b: GroupStatistics, n_images: int) -> float:
    """Wasserstein-1 distance between the two groups' distributions of F_t / N (over used features).

    Compares the shapes of Figure 1a's curves regardless of which features they are:
    0 when the groups' frequency distributions are equal, at most 1.
    """
    fa, fb = a.frequency[a.used], b.frequency[b.used]
    if not fa.size or not fb.size:
        return float("nan")
    return float(stats.wasserstein_distance(fa / n_images, fb / n_images))


@dataclass(frozen=True)
class Correlation:
    """A Spearman correlation over n images with its 95% confidence interval."""
    rho: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.rho:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def confidence_correlation(group: GroupStatistics) -> Correlation:
    """Spearman rho between confidence and num_features over the images, with a 95% interval.

    The interval is Fisher's z-transform with the Bonett-Wright (2000) variance for
    Spearman's rho, (1 + rho^2 / 2) / (n - 3). NaN when either variable is constant.
    """
    if group.confidence is None:
        raise ValueError(f"group {group.name!r} has no confidence")
    x, y = np.asarray(group.confidence, float), np.asarray(group.num_features, float)
    n = len(x)
    if n < 4 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return Correlation(float("nan"), float("nan"), float("nan"), n)
    rho = float(stats.spearmanr(x, y).statistic)
    z = np.arctanh(np.clip(rho, -0.999999, 0.999999))
    half = stats.norm.ppf(0.975) * np.sqrt((1 + rho ** 2 / 2) / (n - 3))
    return Correlation(rho, float(np.tanh(z - half)), float(np.tanh(z + half)), n)


def _paper_jaccard(a: str, b: str) -> float:
    shared = KD_TENSOR[("features shared by the pair", frozenset({a, b}))]
    return shared / (KD_TENSOR[("features |F|", a)] + KD_TENSOR[("features |F|", b)] - shared)


def measures_table(result: FeatureAnalysis, low_frequency: float = LOW_FREQUENCY) -> pd.DataFrame:
    """The measures claims 1-3 are judged on, per group or pair: measure, groups, paper, ours.

    The paper column holds what can be derived from the paper's reported numbers
    (the Jaccard overlaps follow from its |F| and shared counts); it reports no
    frequency distribution, correlation or spread, so those cells are empty.
    """
    groups, n = result.groups, result.n_images
    kd = set(groups) == set(KD_GROUPS)
    rows = []

    def add(measure, members, ours, paper=np.nan):
        rows.append({"measure": measure, "groups": " & ".join(members), "paper": paper, "ours": ours})

    for g, s in groups.items():
        add(f"fraction of features with F_t < {low_frequency:.0%} of images", [g],
            low_frequency_fraction(s, n, low_frequency))
    names = list(groups)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    for a, b in pairs:
        add("Jaccard overlap of used features", [a, b], jaccard(groups[a], groups[b]),
            _paper_jaccard(a, b) if kd else np.nan)
    for a, b in pairs:
        add("Wasserstein-1 distance of F_t / N", [a, b], frequency_distance(groups[a], groups[b], n))
    for g, s in groups.items():
        if s.confidence is not None:
            add("Spearman rho(confidence, num_features)", [g], confidence_correlation(s).rho)
    for g, s in groups.items():
        add("std of num_features over images", [g], float(np.std(s.num_features)))
    for g, s in groups.items():
        add("mean num_features", [g], float(np.mean(s.num_features)))
    for g, s in groups.items():
        if s.confidence is not None:
            add("mean confidence", [g], float(np.mean(s.confidence)))
    return pd.DataFrame(rows, columns=["measure", "groups", "paper", "ours"])


# --------------------------------------------------------------------------------------
# Claims 1-3
# --------------------------------------------------------------------------------------

def _by_group(values: Mapping[str, float], fmt: str) -> str:
    return ", ".join(f"{g} {format(v, fmt)}" for g, v in values.items())


def interaction_claims(result: FeatureAnalysis, low_frequency: float = LOW_FREQUENCY,
                       links: Mapping[int, Sequence[str]] | None = None) -> list[Claim]:
    """Verdicts on the paper's claims 1, 2 and 3 from one KD tensor, each by the rule it states.

    ``result`` must hold the groups baseline, student and teacher, else the claims are
    "not measured". ``links``: claim number -> figures/tables (relative to outputs/).
    """
    if not set(KD_GROUPS) <= set(result.groups):
        return [not_measured(k, f"needs groups {KD_GROUPS}, got {list(result.groups)}") for k in (1, 2, 3)]
    links = links or {}
    b, s, t = (result.groups[g] for g in KD_GROUPS)
    kd = {g: result.groups[g] for g in KD_GROUPS}
    n, source = result.n_images, result.source()
    paper = KD_TENSOR
    n_features = {g: x.n_features for g, x in kd.items()}
    mean_frequency = {g: x.mean_frequency for g, x in kd.items()}
    paper_features = " / ".join(str(paper[("features |F|", g)]) for g in KD_GROUPS)
    paper_frequency = " / ".join(str(paper[("mean frequency E[F]", g)]) for g in KD_GROUPS)
    verdict = lambda ok: SUPPORTED if ok else NOT_SUPPORTED  # noqa: E731

    # Claim 1: more features than student and teacher, and a heavier low-frequency tail.
    tail = {g: low_frequency_fraction(x, n, low_frequency) for g, x in kd.items()}
    claim1 = Claim(
        1,
        paper=f"|F| {paper_features}, E[F] {paper_frequency} (baseline / student / teacher, N = 10,000); "
              "tail fraction not reported",
        ours=f"|F|: {_by_group(n_features, 'd')}; E[F]: {_by_group(mean_frequency, '.0f')}; "
             f"fraction of features with F_t < {low_frequency:.0%} of images: {_by_group(tail, '.2f')}",
        verdict=verdict(n_features["baseline"] > max(n_features["student"], n_features["teacher"])
                        and tail["baseline"] > max(tail["student"], tail["teacher"])),
        rule=f"supported iff the baseline group uses more features (|F|) than the student group and than the "
             f"teacher group, and a larger fraction of its features is low-frequency (on for fewer than "
             f"{low_frequency:.0%} of the test images) than of the student's and of the teacher's",
        source=source, links=list(links.get(1, [])))

    # Claim 2: the student prunes features, reuses them more, and resembles the teacher.
    similarity = {"jaccard": (jaccard(s, t), jaccard(s, b)),
                  "distance": (frequency_distance(s, t, n), frequency_distance(s, b, n))}
    claim2 = Claim(
        2,
        paper=f"|F| student {paper['features |F|', 'student']} vs baseline {paper['features |F|', 'baseline']}; "
              f"E[F] {paper['mean frequency E[F]', 'student']} vs {paper['mean frequency E[F]', 'baseline']}; "
              f"Jaccard student-teacher {_paper_jaccard('student', 'teacher'):.2f} vs student-baseline "
              f"{_paper_jaccard('student', 'baseline'):.2f} (from its shared counts)",
        ours=f"|F| student {s.n_features} vs baseline {b.n_features}; E[F] {s.mean_frequency:.0f} vs "
             f"{b.mean_frequency:.0f}; Jaccard student-teacher {similarity['jaccard'][0]:.2f} vs student-baseline "
             f"{similarity['jaccard'][1]:.2f}; W1 distance of F_t/N student-teacher {similarity['distance'][0]:.3f} "
             f"vs student-baseline {similarity['distance'][1]:.3f}",
        verdict=verdict(s.n_features < b.n_features and s.mean_frequency > b.mean_frequency
                        and similarity["jaccard"][0] > similarity["jaccard"][1]
                        and similarity["distance"][0] < similarity["distance"][1]),
        rule="supported iff the student group uses fewer features than the baseline group (|F|), its mean feature "
             "frequency E[F] is higher, and it is closer to the teacher group than to the baseline group by both "
             "measures: a higher Jaccard overlap of the used-feature sets, and a smaller Wasserstein-1 distance "
             "between the distributions of F_t / N",
        source=source, links=list(links.get(2, [])))

    # Claim 3: confidence rises with num_features for the baseline; KD narrows the spread.
    if any(x.confidence is None for x in kd.values()):
        return [claim1, claim2, not_measured(3, "needs every model's test-set probabilities, which these tensors "
                                                "do not come with")]
    correlation = {g: confidence_correlation(x) for g, x in kd.items()}
    spread = {g: float(np.std(x.num_features)) for g, x in kd.items()}
    claim3 = Claim(
        3,
        paper="positive relation between confidence and num_features in Fig. 2a (no coefficient reported); "
              "the student's density is narrower (Fig. 2b)",
        ours=f"Spearman rho [95% CI]: {_by_group({g: str(c) for g, c in correlation.items()}, 's')}; "
             f"std of num_features: {_by_group(spread, '.1f')}",
        verdict=verdict(correlation["baseline"].low > 0 and spread["student"] < spread["baseline"]),
        rule="supported iff the baseline group's Spearman correlation between confidence (true-class softmax, "
             "mean over its models) and num_features over the test images is positive with its 95% interval "
             "above 0 (Fisher z, Bonett-Wright variance), and the student group's standard deviation of "
             "num_features over the images is smaller than the baseline group's",
        source=source, links=list(links.get(3, [])))
    return [claim1, claim2, claim3]
