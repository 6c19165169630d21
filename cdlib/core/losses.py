"""What every objective shares: the ``Objective`` interface, what the loop tells it when an epoch
ends (``EpochEnd``), and the losses the objectives of ``cdlib.core.objectives`` are built from."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cdlib.core.data import Batch
from cdlib.errors import ConfigError


@dataclass
class EpochEnd:
    """What the loop knows when an epoch ends; objectives may use any of it."""
    epoch: int                      # 0-based epoch that just ended
    train_confusion: torch.Tensor   # (C, C) counts of (label, argmax) over the epoch's training batches
    test_confusion: torch.Tensor    # (C, C) counts on the test split (eval mode)
    validation_confusion: torch.Tensor | None = None  # on the held-out split, when the run has one
    train_eval_confusion: torch.Tensor | None = None  # eval mode on un-augmented training images, if asked for


class Objective:
    """Base class. ``setup`` runs once before training and before a resume loads state."""

    name = "base"
    extra_forwards: tuple[str, ...] = ()  # "teacher" and/or "partner", see the module doc

    def check(self, config) -> None:
        """Raise ``ConfigError`` if the objective cannot train ``config`` (run when the config is made)."""

    def setup(self, config, train_labels: torch.Tensor, num_classes: int) -> None:
        """``config``: the run's TrainConfig; ``train_labels`` on the training device."""

    def partners(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training indices whose augmented images the engine forwards for ``"partner"``;
        draw from ``generator`` (the run's, reseeded at every epoch start)."""
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, batch: Batch, epoch: int) -> torch.Tensor:
        """The scalar loss of ``logits`` (the student's, of ``batch.images``)."""
        raise NotImplementedError

    def needs_train_eval(self, epoch: int) -> bool:
        """Whether ``end_epoch`` of 0-based ``epoch`` needs ``train_eval_confusion`` (an extra inference
        pass over the training images, so the loop runs it only when asked)."""
        return False

    def end_epoch(self, info: EpochEnd) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain python values only (checkpoints load with ``weights_only=True``).
        Like ``nn.Module.state_dict`` the tensors are the live ones, not copies."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Batch-mean cross-entropy to hard labels, in float32."""
    return F.cross_entropy(logits.float(), labels)


def soft_loss(target: torch.Tensor, logits: torch.Tensor, T: float = 1.0, *, kl: bool = True) -> torch.Tensor:
    """``T^2 * batch-mean of sum_k target_k * (log target_k - log softmax(logits / T)_k)``.

    That is ``T^2 * KL(target || softmax(logits / T))``, summed over classes and
    averaged over the batch; ``target`` holds probability rows (not temperature-
    scaled here) and must carry no gradient. With ``kl=False`` the target's
    entropy term is dropped, leaving the soft cross-entropy
    ``sum_k -target_k log softmax(logits / T)_k``: same gradient, and the value
    PS-KD reports. The T^2 keeps gradient magnitudes comparable across
    temperatures (Hinton et al.). Every soft target in this module goes through here.
    """
    target = target.float()
    per_sample = -(target * F.log_softmax(logits.float() / T, dim=1)).sum(1)
    if kl:
        per_sample = per_sample + torch.xlogy(target, target).sum(1)  # 0 log 0 = 0
    return T * T * per_sample.mean()


def in_range(objective: str, name: str, value, low: float, high: float = math.inf, *,
             low_open: bool = False, high_open: bool = False) -> float:
    """``value`` if it is a number in the range, else a ``ConfigError`` naming the argument."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open or high == math.inf else ']'}"
        raise ConfigError(f"objective {objective!r}: {name} must be a number in {bounds}, got {value!r}")
    return value


def smoothing_matrix(num_classes: int, eps: float, device=None) -> torch.Tensor:
    """(C, C) label-smoothing targets S = (1 - eps) I + eps / C, row k for class k (float64)."""
    S = torch.full((num_classes, num_classes), eps / num_classes, dtype=torch.float64, device=device)
    S.diagonal().add_(1 - eps)
    return S
