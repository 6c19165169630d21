"""Scaled schedules keep their budget: every method of every profile trains as many epochs as
its paper counterpart scaled to the profile, and CD's phases sum to exactly that."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from cdlib.experiments import paper, plans
from cdlib.experiments.profiles import builtin_names, get_profile

PROFILES = {name: get_profile(name) for name in builtin_names()}
# The built-in profiles, and the 15-epoch CIFAR-10 case where CD-200 used to get 14 epochs.
CASES = {**PROFILES, "cifar10-15": get_profile("quick", overrides={"dataset": "cifar10", "width": 0.125, "epochs": 15})}
NOTEBOOKS = ("01", "02", "03", "04", "05")


@pytest.mark.parametrize("name", CASES)
def test_every_method_gets_the_budget_of_its_paper_counterpart(name):
    profile = CASES[name]
    for method in plans.table2_methods(profile):
        _, args, paper_epochs = plans.TABLE2_METHODS[method]
        config = plans.method_config(profile, method, profile.student_arch, 0)
        assert config.epochs == profile.scaled(paper_epochs), (method, config.epochs)
        if "schedule" in args:
            assert sum(config.objective_args["schedule"]) == config.epochs
    for (label, _, schedule, _), (_, config, _) in zip(paper.TABLE1, plans.table1(profile)):
        if schedule:  # at least one epoch per phase, where a profile has fewer epochs than the row has phases
            budget = max(profile.scaled(sum(schedule)), len(schedule))
            assert sum(config.objective_args["schedule"]) == config.epochs == budget, label


def test_the_paper_profile_keeps_the_papers_schedules():
    paper = PROFILES["paper"]
    assert paper.validation == 0  # the paper's 50,000 training images
    for method in plans.table2_methods(paper):
        args = plans.TABLE2_METHODS[method][1]
        if "schedule" in args:
            assert plans.method_config(paper, method, "resnet18", 0).objective_args["schedule"] == args["schedule"]


@pytest.mark.parametrize("name", ["smoke", "quick", "paper"])  # the profiles that had runs under the old rule
def test_run_ids_change_only_where_rounding_each_phase_drifted(name):
    """The old rule rounded each phase on its own; where that kept the budget, the run is the same run."""
    profile = PROFILES[name]
    for method in plans.table2_methods(profile):
        _, args, paper_epochs = plans.TABLE2_METHODS[method]
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


@pytest.mark.parametrize("name", ["smoke", "quick", "paper"])
def test_the_builtin_profiles_as_files_keep_their_run_ids(name):
    """The profiles moved from Python to TOML files and gained keys (validation, teacher_width) and Table 2
    gained the eval-mode CD source and the 300-epoch controls: every run the notebooks planned before is
    planned again, same id, and the only new runs are those methods'. (smoke holds 1,500 images out since issue 19, to halve CI's
    notebook time, which changed its ids by design: its check runs with validation 0.)"""
    before = set(json.loads((Path(__file__).parent / "data" / "builtin_run_ids.json").read_text())[name])
    profile = replace(PROFILES[name], validation=0) if name == "smoke" else PROFILES[name]
    now = {c.run_id() for nb in NOTEBOOKS for c in plans.notebook_plan(profile, nb)}
    assert before <= now
    assert {i.rsplit("-", 2)[0] for i in now - before} == {"cd300-train_eval", "baseline300", "ls300"}


def test_the_holdout_source_is_planned_only_with_a_validation_split():
    assert "cd300-holdout" not in plans.table2(PROFILES["quick"])
    holdout = plans.table2(PROFILES["cpu"])["cd300-holdout"]
    assert {c.validation for c in holdout} == {5000} and len(holdout) == PROFILES["cpu"].seeds


def test_teachers_train_the_profiles_teacher_epochs_and_their_students_the_profiles_epochs():
    cpu = PROFILES["cpu"]
    assert cpu.teacher_epochs == 3 * cpu.epochs and cpu.train_images == 12000
    assert {c.epochs for c in plans.teachers(cpu)} == {cpu.teacher_epochs}
    assert {c.epochs for c in plans.kd_students(cpu)} == {cpu.epochs}
    assert {c.train_images for nb in NOTEBOOKS for c in plans.notebook_plan(cpu, nb)} == {12000}
    assert {c.epochs for c in plans.teachers(PROFILES["paper"])} == {200}  # None: the profile's epochs
