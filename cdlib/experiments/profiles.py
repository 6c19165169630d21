"""Profiles: how big a reproduction to run.

A profile fixes the data set, network width, epochs, and how many models and
seeds every notebook trains. ``smoke`` runs the whole pipeline on a CPU in
minutes (synthetic data, tiny networks); ``quick`` is real data, ResNet-18 only,
shortened schedules (an afternoon on one GPU); ``paper`` is the paper's recipe
(CIFAR-100, 200/300 epochs, 20 models per analysis group, 3 seeds per table cell).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from cdlib.core.config import TrainConfig
from cdlib.errors import ConfigError

PAPER_EPOCHS = 200  # the paper's baseline schedule; other profiles scale every schedule by epochs / 200


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    dataset: str
    width: float              # channel multiplier of every network
    epochs: int               # baseline / KD epochs (paper: 200)
    feature_models: int       # models per group in the Interaction Tensor (paper: 20)
    seeds: int                # seeds per table cell (paper: 3)
    table_archs: tuple        # networks of Table 2
    student_arch: str = "resnet18"
    teacher_arch: str = "resnet152"
    rotation: float = 15.0

    def scaled(self, paper_epochs: float) -> int:
        """A paper epoch count (e.g. 300, or a 30-epoch phase) in this profile's units, at least 1."""
        return max(1, round(paper_epochs * self.epochs / PAPER_EPOCHS))

    def scaled_schedule(self, segments: list[int]) -> list[int]:
        """Phase lengths (e.g. CD's hard/soft segments) scaled so that they sum to ``scaled(sum(segments))``,
        the budget every method of that paper length gets. Each phase is rounded as ``scaled`` rounds it
        (at least one epoch), then the drift is corrected on the phases rounding moved most (earlier
        phases first on ties), as largest-remainder rounding does; rounding alone drifts (CD-200 at 15
        epochs got 14). With fewer budget epochs than phases, each phase gets one."""
        total = max(self.scaled(sum(segments)), len(segments))
        exact = [s * total / sum(segments) for s in segments]
        lengths = [max(1, round(x)) for x in exact]
        while sum(lengths) != total:
            short = sum(lengths) < total
            movable = [i for i in range(len(lengths)) if short or lengths[i] > 1]
            i = max(movable, key=lambda i: (exact[i] - lengths[i]) if short else (lengths[i] - exact[i]))
            lengths[i] += 1 if short else -1
        return lengths

    def recipe(self, **changes) -> TrainConfig:
        """The profile's base training config, with ``changes`` applied."""
        base = TrainConfig(dataset=self.dataset, width=self.width, epochs=self.epochs, rotation=self.rotation)
        return replace(base, **changes)

    def with_dataset(self, dataset: str | None) -> "Profile":
        return self if not dataset else replace(self, dataset=dataset)


PROFILES = {
    "smoke": Profile(
        "smoke", "CPU plumbing check: synthetic data, width-1/8 networks, a few epochs",
        dataset="synthetic", width=0.125, epochs=6, feature_models=3, seeds=2,
        table_archs=("resnet18",), teacher_arch="resnet34"),
    "quick": Profile(
        "quick", "real data, ResNet-18 students, 30-epoch schedules, 5 models per group, 2 seeds",
        dataset="cifar100", width=1.0, epochs=30, feature_models=5, seeds=2, table_archs=("resnet18",)),
    "paper": Profile(
        "paper", "the paper's recipe: CIFAR-100, 200/300 epochs, 20 models per group, 3 seeds",
        dataset="cifar100", width=1.0, epochs=200, feature_models=20, seeds=3,
        table_archs=("resnet18", "resnet34", "resnet50", "densenet121")),
}


def get_profile(name: str = "auto", dataset: str | None = None, announce: bool = True) -> Profile:
    """A profile by name; ``auto`` is ``paper`` when CUDA is available, otherwise ``smoke``."""
    if name == "auto":
        name = "paper" if torch.cuda.is_available() else "smoke"
        reason = "CUDA is available" if name == "paper" else "no CUDA device found"
        if announce:
            print(f"profile: {name} ({reason}; pass profile='smoke'|'quick'|'paper' to choose)")
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)} or 'auto'")
    return PROFILES[name].with_dataset(dataset)
