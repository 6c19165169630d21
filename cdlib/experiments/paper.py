"""What the paper reports, in one place: Kang & Kim, "What Do Students Learn? A Feature-Level
Analysis of Dark Knowledge" (ICPR 2026, arXiv 2606.03052), CIFAR-100.

Every number of the paper that this project shows beside its own lives here, with the section or
table it comes from. They are never used to tune or to fill in a result; they only stand in
"paper" columns and lines. The method definitions (loss weights, temperatures, schedules) are the
objectives' arguments (``cdlib.core.objectives``) and the runs' configs (``plans``), not results.
"""
from __future__ import annotations

from collections.abc import Iterable

# Table 2: top-1 %, mean of 3 runs, best test epoch (the released code's reporting).
TABLE2_ARCHS = ("resnet18", "resnet34", "resnet50", "densenet121")
TABLE2 = {
    "baseline": (75.86, 77.61, 78.48, 79.03),
    "cskd": (76.38, 76.73, 76.31, 76.53),
    "pskd": (77.41, 77.33, 78.41, 79.84),
    "cd200": (76.85, 77.87, 78.63, 78.71),
    "cd300": (77.13, 78.53, 79.38, 79.64),
}

# Table 1: Confusion Distillation's schedule and weight sweep on ResNet-18, one run each, top-1 %:
# (the paper's row label, loss weights soft:CE or None for plain CE, schedule in epochs alternating
# hard/soft from hard, top-1).
TABLE1 = [
    ("CE 200 ep", None, None, 75.61),
    ("0.85:0.15 3H17S", (0.85, 0.15), [30, 170], 66.34),
    ("0.85:0.15 6H14S", (0.85, 0.15), [60, 140], 73.47),
    ("0.5:0.5 3H3S3H3S2H2S2H2S", (0.5, 0.5), [30, 30, 30, 30, 20, 20, 20, 20], 76.11),
    ("0.85:0.15 3H3S3H3S2H2S2H2S", (0.85, 0.15), [30, 30, 30, 30, 20, 20, 20, 20], 75.64),
    ("0.7:0.3 3H3S3H3S2H2S2H2S", (0.7, 0.3), [30, 30, 30, 30, 20, 20, 20, 20], 76.44),
    ("0.7:0.3 3H3S3H3S8H", (0.7, 0.3), [30, 30, 30, 30, 80], 76.96),
    ("0.7:0.3 14H2S2H2S", (0.7, 0.3), [140, 20, 20, 20], 75.78),
    ("0.7:0.3 2H2S4H2S10H", (0.7, 0.3), [20, 20, 40, 20, 100], 76.75),
    ("0.7:0.3 300 ep 3H3S6H3S15H", (0.7, 0.3), [30, 30, 60, 30, 150], 77.14),
    ("0.7:0.3 300 ep 4.5H4.5S4.5H4.5S12H", (0.7, 0.3), [45, 45, 45, 45, 120], 76.93),
]

# Section 4.1: the teacher's class-wise mean softmax M against a baseline's confusion matrix Q,
# off-diagonal entries, test set.
CONFUSION_SIMILARITY = {"pearson": 0.85, "cosine": 0.76, "soft_jaccard": 0.38}
_SIMILARITY_NAMES = {"pearson": "off-diagonal Pearson", "cosine": "per-class cosine", "soft_jaccard": "soft Jaccard"}

# Sections 3.3-3.4: the Interaction Tensor of 20 ResNet-18 baselines, 20 KD students and their 20
# ResNet-152 teachers on the 10,000 test images, keyed as the rows of
# ``cdlib.core.feature_statistics.summary_table`` (statistic, group or set of groups). Pairwise counts
# include the features shared by all three: the exclusive reading would need
# |student| >= 70 + 132 + 170 = 372 > 281. The CD tensor's numbers of Section 4.3 are internally
# inconsistent and are not listed.
KD_TENSOR_GROUPS = frozenset({"baseline", "student", "teacher"})
KD_TENSOR = {
    ("features |F|", "baseline"): 531,
    ("features |F|", "student"): 281,
    ("features |F|", "teacher"): 264,
    ("mean frequency E[F]", "baseline"): 1329,
    ("mean frequency E[F]", "student"): 2121,
    ("mean frequency E[F]", "teacher"): 2243,
    ("features shared by all groups", KD_TENSOR_GROUPS): 70,
    ("mean frequency of features shared by all", "baseline"): 2938,
    ("mean frequency of features shared by all", "student"): 3043,
    ("mean frequency of features shared by all", "teacher"): 3118,
    ("features shared by the pair", frozenset({"baseline", "student"})): 132,
    ("features shared by the pair", frozenset({"baseline", "teacher"})): 96,
    ("features shared by the pair", frozenset({"student", "teacher"})): 170,
    ("features per image D", "baseline"): 71,
    ("features per image D", "student"): 60,
    ("features per image D", "teacher"): 59,
}


def table2(method: str, arch: str) -> float | None:
    """The paper's Table 2 number for ``method`` on ``arch``, or None when it reports none."""
    if method not in TABLE2 or arch not in TABLE2_ARCHS:
        return None
    return TABLE2[method][TABLE2_ARCHS.index(arch)]


def resnet34_margin() -> float:
    """Claim 5's "+1.2 on ResNet-34": CD-300 minus the better of CS-KD and PS-KD (Table 2)."""
    return table2("cd300", "resnet34") - max(table2("cskd", "resnet34"), table2("pskd", "resnet34"))


def confusion_similarity_text() -> str:
    """Section 4.1's numbers as text: "off-diagonal Pearson 0.85, per-class cosine 0.76, soft Jaccard 0.38"."""
    return ", ".join(f"{_SIMILARITY_NAMES[m]} {v:.2f}" for m, v in CONFUSION_SIMILARITY.items())


def interaction_statistics(groups: Iterable[str]) -> dict:
    """The paper's numbers for a tensor of exactly these groups of models (``KD_TENSOR`` for
    baseline, student and teacher), keyed as ``KD_TENSOR``; empty for any other grouping."""
    return dict(KD_TENSOR) if frozenset(groups) == KD_TENSOR_GROUPS else {}
