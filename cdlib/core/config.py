"""The training recipe as one plain dataclass, saved with every run.

Defaults are the recipe of the paper's Section 2 as its released training scripts (a fork of
weiaicunzai/pytorch-cifar100) run it:
SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128, one epoch of linear
warm-up stepped per iteration, lr x0.2 at 30/60/80% of the epochs, crop + flip +
rotation(15), 200 epochs. A run is identified by the hash of this config, so two
runs with equal configs are the same run.

A config is checked when it is made: unknown fields, values out of range and
objective arguments the objective does not accept raise ``ConfigError`` at once,
not epochs into a run.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from cdlib.core.models import ARCHITECTURES
from cdlib.core.objectives import make_objective
from cdlib.errors import ConfigError

DATASETS = ("cifar100", "cifar10", "synthetic")  # and "imagefolder:<folder>"
# Fields added after run ids were first published enter the hash only when they differ from these
# defaults, so every earlier run keeps its id.
LATER_FIELDS = {"validation": 0, "train_images": 0}


@dataclass(frozen=True)
class TrainConfig:
    name: str = "run"                 # human-readable prefix of the run folder
    # data
    dataset: str = "cifar100"         # cifar100 | cifar10 | imagefolder:<subfolder> | synthetic
    rotation: float = 15.0            # degrees of random rotation; 0 turns it off
    validation: int = 0               # training images held out for validation (stratified, fixed); 0: none
    train_images: int = 0             # train on this many of the rest (stratified, fixed subset); 0: all
    # network
    arch: str = "resnet18"
    width: float = 1.0                # channel multiplier; < 1 for tiny smoke/test networks
    # objective (cdlib.core.objectives)
    objective: str = "ce"
    objective_args: dict = field(default_factory=dict)
    # optimisation
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0        # linear warm-up, stepped per iteration
    schedule: str = "multistep"       # multistep | cosine
    milestones: tuple = (0.3, 0.6, 0.8)  # values < 1 are fractions of `epochs`, others epochs
    gamma: float = 0.2
    seed: int = 0

    def __post_init__(self):
        # JSON round-trips turn tuples into lists; keep one canonical form so hashes agree.
        object.__setattr__(self, "milestones", tuple(self.milestones))
        self._check()
        make_objective(self.objective, self.objective_args).check(self)

    def _check(self) -> None:
        def fail(field_name: str, rule: str):
            raise ConfigError(f"TrainConfig.{field_name} must be {rule}, got {getattr(self, field_name)!r}")

        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")

        def whole(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not isinstance(self.name, str) or not self.name or "/" in self.name or self.name.startswith("."):
            fail("name", "a non-empty folder-name prefix without '/' that does not start with '.'")
        if self.dataset not in DATASETS and not str(self.dataset).startswith("imagefolder:"):
            fail("dataset", f"one of {', '.join(DATASETS)} or imagefolder:<folder>")
        if self.arch not in ARCHITECTURES:
            fail("arch", f"one of {', '.join(ARCHITECTURES)}")
        if not (number(self.rotation) and 0 <= self.rotation <= 180):
            fail("rotation", "a number of degrees in [0, 180]")
        if not (number(self.momentum) and 0 <= self.momentum < 1):
            fail("momentum", "a number in [0, 1)")
        if not (number(self.gamma) and 0 < self.gamma <= 1):
            fail("gamma", "a number in (0, 1]")
        for name in ("width", "lr"):
            if not (number(getattr(self, name)) and getattr(self, name) > 0):
                fail(name, "a positive number")
        if not (number(self.weight_decay) and self.weight_decay >= 0):
            fail("weight_decay", "a number >= 0")
        for name in ("epochs", "batch_size"):
            if not (whole(getattr(self, name)) and getattr(self, name) >= 1):
                fail(name, "a whole number >= 1")
        if not whole(self.seed) or self.seed < 0:
            fail("seed", "a whole number >= 0")
        if not whole(self.validation) or self.validation < 0:
            fail("validation", "a whole number of training images >= 0")
        if not whole(self.train_images) or self.train_images < 0:
            fail("train_images", "a whole number of training images >= 0 (0: all)")
        if not (number(self.warmup_epochs) and 0 <= self.warmup_epochs <= self.epochs):
            fail("warmup_epochs", f"a number in [0, epochs = {self.epochs}]")
        if self.schedule not in ("multistep", "cosine"):
            fail("schedule", "'multistep' or 'cosine'")
        if not isinstance(self.nesterov, bool):
            fail("nesterov", "true or false")
        if not isinstance(self.objective_args, dict):
            fail("objective_args", "a dict of the objective's keyword arguments")
        if not all(number(m) and m > 0 and (m < 1 or float(m).is_integer()) for m in self.milestones):
            fail("milestones", "positive numbers: fractions of the epochs (< 1) or whole epochs")
        if self.schedule == "multistep" and self.milestone_epochs() != sorted(self.milestone_epochs()):
            fail("milestones", f"increasing (in epochs: {self.milestone_epochs()})")

    def milestone_epochs(self) -> list[int]:
        return [round(m * self.epochs) if m < 1 else int(m) for m in self.milestones]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config fields {sorted(unknown)}; this cdlib knows {sorted(known)}")
        return cls(**d)

    def run_hash(self) -> str:
        """Short stable hash of every field (``LATER_FIELDS`` only when set): the run's identity."""
        fields_ = {k: v for k, v in self.to_dict().items() if k not in LATER_FIELDS or v != LATER_FIELDS[k]}
        blob = json.dumps(fields_, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def run_id(self) -> str:
        return f"{self.name}-{self.run_hash()}"

    def replace(self, **changes) -> "TrainConfig":
        return replace(self, **changes)
