"""What each notebook trains, as lists of run configs, available without running a notebook.

Names are ``<objective>-<arch>`` so that equal recipes share one run: the first
seeds of the feature-analysis baselines are also Table 2's ResNet-18 baselines.
A student ``i`` distils from teacher ``i``.
"""
from __future__ import annotations

from .config import TrainConfig
from .profiles import Profile


def baseline(profile: Profile, arch: str, seed: int, **changes) -> TrainConfig:
    return profile.recipe(name=f"ce-{arch}", arch=arch, seed=seed, **changes)


def feature_baselines(profile: Profile) -> list[TrainConfig]:
    """Cross-entropy students for the Interaction Tensor (paper: 20 ResNet-18)."""
    return [baseline(profile, profile.student_arch, s) for s in range(profile.feature_models)]


def table_baselines(profile: Profile) -> list[TrainConfig]:
    """Cross-entropy baselines of Table 2: every network, ``profile.seeds`` seeds."""
    return [baseline(profile, arch, s) for arch in profile.table_archs for s in range(profile.seeds)]


def teachers(profile: Profile) -> list[TrainConfig]:
    """Teachers for KD, trained with the baseline recipe (paper: 20 ResNet-152)."""
    return [baseline(profile, profile.teacher_arch, s) for s in range(profile.feature_models)]


def kd_students(profile: Profile, T: float = 2.0, w_kd: float = 0.85, w_ce: float = 0.15) -> list[TrainConfig]:
    """Hinton-KD students, student ``i`` from teacher ``i`` (paper: T = 2, 0.85 / 0.15)."""
    return [profile.recipe(name=f"kd-{profile.student_arch}", arch=profile.student_arch, seed=s,
                           objective="kd", objective_args={"teacher": t.run_id(), "T": T, "w_kd": w_kd, "w_ce": w_ce})
            for s, t in enumerate(teachers(profile))]


def unique(configs: list[TrainConfig]) -> list[TrainConfig]:
    """Drop repeated configs, keeping the first occurrence (order is the training order)."""
    seen, out = set(), []
    for c in configs:
        if c.run_id() not in seen:
            seen.add(c.run_id())
            out.append(c)
    return out


def notebook_plan(profile: Profile, notebook: str) -> list[TrainConfig]:
    """Every run a notebook trains, in training order (teachers before their students)."""
    plans = {
        "01": lambda: feature_baselines(profile) + table_baselines(profile) + teachers(profile),
        "02": lambda: teachers(profile) + kd_students(profile),
    }
    if notebook not in plans:
        raise ValueError(f"no plan for notebook {notebook!r}; known: {sorted(plans)}")
    return unique(plans[notebook]())
