"""Scaled schedules keep their budget: every method of every profile trains as many epochs as
its paper counterpart scaled to the profile, and CD's phases sum to exactly that."""
from __future__ import annotations

from dataclasses import replace

import pytest

from cdlib.experiments import plans
from cdlib.experiments.profiles import PROFILES

# The built-in profiles, and the 15-epoch CIFAR-10 case where CD-200 used to get 14 epochs.
CASES = {**PROFILES, "cifar10-15": replace(PROFILES["quick"], dataset="cifar10", width=0.125, epochs=15)}


@pytest.mark.parametrize("name", CASES)
def test_every_method_gets_the_budget_of_its_paper_counterpart(name):
    profile = CASES[name]
    for method, (_, args, paper_epochs) in plans.TABLE2_METHODS.items():
        config = plans.method_config(profile, method, profile.student_arch, 0)
        assert config.epochs == profile.scaled(paper_epochs), (method, config.epochs)
        if "schedule" in args:
            assert sum(config.objective_args["schedule"]) == config.epochs
    for (label, _, schedule, _), (_, config, _) in zip(plans.TABLE1_ROWS, plans.table1(profile)):
        if schedule:  # at least one epoch per phase, where a profile has fewer epochs than the row has phases
            budget = max(profile.scaled(sum(schedule)), len(schedule))
            assert sum(config.objective_args["schedule"]) == config.epochs == budget, label


def test_the_paper_profile_keeps_the_papers_schedules():
    paper = PROFILES["paper"]
    for method, (_, args, _) in plans.TABLE2_METHODS.items():
        if "schedule" in args:
            assert plans.method_config(paper, method, "resnet18", 0).objective_args["schedule"] == args["schedule"]


@pytest.mark.parametrize("name", PROFILES)
def test_run_ids_change_only_where_rounding_each_phase_drifted(name):
    """The old rule rounded each phase on its own; where that kept the budget, the run is the same run."""
    profile = PROFILES[name]
    for method, (_, args, paper_epochs) in plans.TABLE2_METHODS.items():
        if "schedule" not in args:
            continue
        old = [profile.scaled(e) for e in args["schedule"]]
        config = plans.method_config(profile, method, profile.student_arch, 0)
        if sum(old) == profile.scaled(paper_epochs):
            assert config.objective_args["schedule"] == old, method
        else:  # corrected: quick's CD-200 (28 -> 30 epochs) and CD-300 (43 -> 45)
            assert config.objective_args["schedule"] != old and name == "quick", method


@pytest.mark.parametrize("segments, epochs, expected", [
    ([30, 30, 30, 30, 80], 15, [3, 2, 2, 2, 6]), ([30, 30, 30, 30, 80], 30, [5, 5, 4, 4, 12]),
    ([30, 30, 60, 30, 150], 30, [5, 5, 9, 4, 22]), ([30, 170], 30, [4, 26]),
    ([30, 30, 30, 30, 80], 3, [1, 1, 1, 1, 1]),  # fewer epochs than phases: one each
])
def test_scaled_schedule(segments, epochs, expected):
    assert replace(PROFILES["smoke"], epochs=epochs).scaled_schedule(segments) == expected
