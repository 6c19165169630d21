"""Configs are checked when they are made: a typo or an out-of-range value fails at once, naming
the field or argument and what it accepts, instead of epochs into a run."""
from __future__ import annotations

import pytest

from cdlib.core.config import TrainConfig
from cdlib.core.objectives import OBJECTIVES, make_objective
from cdlib.errors import ConfigError

KD = {"teacher": "teacher-0123456789"}


@pytest.mark.parametrize("objective, args, names", [
    ("ls", {"epsilon": 0.1}, ["epsilon", "eps=0.1"]),
    ("kd", {**KD, "temperature": 4}, ["temperature", "teacher", "T=2.0", "w_kd=0.85", "w_ce=0.15"]),
    ("kd", {}, ["teacher"]),
    ("cd", {"schedule": "cd200", "sourse": "train"}, ["sourse", "source='train'", "targets='confusion'"]),
    ("pskd", {"alpha": 0.8}, ["alpha", "alpha_T=0.8"]),
])
def test_a_misspelt_objective_argument_lists_the_accepted_ones(objective, args, names):
    with pytest.raises(ConfigError) as err:
        TrainConfig(objective=objective, objective_args=args)
    assert all(name in str(err.value) for name in names), str(err.value)


@pytest.mark.parametrize("objective, args, name", [
    ("ls", {"eps": 1.0}, "eps"), ("ls", {"eps": -0.1}, "eps"),
    ("kd", {**KD, "T": 0}, "T"), ("kd", {**KD, "w_kd": -1}, "w_kd"), ("kd", {**KD, "T": "4"}, "T"),
    ("tfkd_reg", {"a": 1.5}, "a"), ("tfkd_reg", {"correct_prob": 1.0}, "correct_prob"),
    ("cskd", {"T": -4}, "T"), ("cskd", {"lam": float("nan")}, "lam"),
    ("pskd", {"alpha_T": 1.2}, "alpha_T"),
    ("cd", {"schedule": [100, 0, 100]}, "schedule"), ("cd", {"schedule": [100.5, 99.5]}, "schedule"),
    ("cd", {"schedule": "cd200", "mu": 1.0}, "mu"), ("cd", {"schedule": "cd200", "T": 0}, "T"),
    ("cd", {"schedule": "cd300"}, "covers 300 epochs"), ("cd", {"schedule": "cd200", "source": "test"}, "leak"),
])
def test_objective_values_out_of_range_fail_when_the_config_is_made(objective, args, name):
    with pytest.raises(ConfigError, match=name):
        TrainConfig(objective=objective, objective_args=args)


@pytest.mark.parametrize("field, value", [
    ("lr", 0), ("lr", -0.1), ("momentum", 1.5), ("weight_decay", -1e-4), ("gamma", 0.0), ("gamma", 2.0),
    ("rotation", -5), ("rotation", 360), ("width", 0), ("epochs", 0), ("epochs", 2.5), ("batch_size", 0),
    ("seed", -1), ("warmup_epochs", 300), ("warmup_epochs", -1), ("schedule", "step"), ("milestones", (0.6, 0.3)),
    ("milestones", (0, 0.5)), ("milestones", (60.5,)), ("arch", "resnet19"), ("dataset", "cifar1000"),
    ("name", ""), ("name", "a/b"), ("nesterov", "yes"), ("objective", "kdd"), ("objective_args", [1]),
])
def test_config_values_out_of_range_fail_when_the_config_is_made(field, value):
    with pytest.raises(ConfigError, match=field if field != "objective" else "unknown objective"):
        TrainConfig(**{field: value})


def test_the_defaults_and_every_objective_with_its_defaults_are_valid():
    assert TrainConfig().run_id() == "run-68e3f90495"  # the checks change no run's identity
    for name in OBJECTIVES:
        args = {"kd": KD, "cd": {"schedule": "cd200"}}.get(name, {})
        TrainConfig(objective=name, objective_args=args)
        make_objective(name, args)


def test_unknown_config_fields_are_listed():
    with pytest.raises(ConfigError, match=r"unknown config fields \['learning_rate'\].*'lr'"):
        TrainConfig.from_dict({**TrainConfig().to_dict(), "learning_rate": 0.1})
