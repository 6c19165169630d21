"""The training recipe as one plain dataclass, saved with every run.

Defaults are the recipe of the paper's released code (PAPER.md section 2):
SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128, one epoch of linear
warm-up stepped per iteration, lr x0.2 at 30/60/80% of the epochs, crop + flip +
rotation(15), 200 epochs. A run is identified by the hash of this config, so two
runs with equal configs are the same run.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any


@dataclass(frozen=True)
class TrainConfig:
    name: str = "run"                 # human-readable prefix of the run folder
    # data
    dataset: str = "cifar100"         # cifar100 | cifar10 | imagefolder:<subfolder> | synthetic
    rotation: float = 15.0            # degrees of random rotation; 0 turns it off
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
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be positive, got {self.epochs}, {self.batch_size}")
        if self.schedule not in ("multistep", "cosine"):
            raise ValueError(f"schedule must be 'multistep' or 'cosine', got {self.schedule!r}")

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
            raise ValueError(f"unknown config fields {sorted(unknown)}; this cdlib knows {sorted(known)}")
        return cls(**d)

    def run_hash(self) -> str:
        """Short stable hash of every field: the run's identity."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:10]

    def run_id(self) -> str:
        return f"{self.name}-{self.run_hash()}"

    def replace(self, **changes) -> "TrainConfig":
        return replace(self, **changes)
