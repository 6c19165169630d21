"""The paper's five claims (as its abstract and introduction make them) and how a measured verdict is recorded.

Each analysis module turns its measurements into :class:`Claim` objects; notebooks show
them as a table and ``cdlib.experiments.report`` collects them into ``outputs/REPORT.md``. A verdict
is always computed from this run's numbers by a rule stated in ``rule``, never typed in.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import pandas as pd

from cdlib.experiments import paper

SUPPORTED, NOT_SUPPORTED, NOT_MEASURED = "supported", "not supported", "not measured"

STATEMENTS = {
    1: "Baselines trained alone learn many low-frequency, sample-specific features (long-tailed feature frequency).",
    2: "KD prunes these: the student uses far fewer features, each reused on more images, resembling the teacher.",
    3: "On CIFAR-100, high-confidence images activate more features; KD narrows the spread.",
    4: "A baseline's confusion matrix resembles the teacher's class-wise mean softmax "
       f"({paper.confusion_similarity_text()}).",
    5: f"Confusion Distillation beats CS-KD and PS-KD (+{paper.resnet34_margin():.1f} points on ResNet-34) and has "
       "KD-like feature effects.",
}


@dataclass
class Claim:
    number: int
    paper: str                 # what the paper reports, as text
    ours: str                  # this run's numbers with their spread
    verdict: str               # SUPPORTED | NOT_SUPPORTED | NOT_MEASURED
    rule: str                  # the rule that turned the numbers into the verdict
    source: str                # data set, profile, number of models/seeds
    links: list[str] = field(default_factory=list)  # figures/tables, relative to outputs/

    @property
    def statement(self) -> str:
        return STATEMENTS[self.number]


def not_measured(number: int, reason: str) -> Claim:
    return Claim(number, paper="", ours="", verdict=NOT_MEASURED, rule=reason, source="")


def claims_frame(claims: list[Claim]) -> pd.DataFrame:
    rows = [{"claim": c.number, "statement": c.statement, **{k: v for k, v in asdict(c).items() if k != "number"}}
            for c in claims]
    return pd.DataFrame(rows)
