"""Calibration of a classifier's probabilities: expected calibration error (ECE).

ECE (Guo et al., 2017, as the PS-KD paper reports it) bins the test images by
their top-1 confidence into equal-width bins and averages ``|accuracy - confidence|``
over the bins, weighted by the share of images in each. NLL, the other number
Table 2 reports, is the mean test cross-entropy the engine already records.
"""
from __future__ import annotations

import torch

ECE_BINS = 15


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE in percent of (N, C) ``logits`` against (N,) ``labels``; bins are (i/bins, (i+1)/bins]."""
    probabilities = torch.softmax(logits.double(), dim=1)
    confidence, prediction = probabilities.max(1)
    correct = (prediction == labels).double()
    # Bin i holds confidences in (i / bins, (i + 1) / bins]; a confidence is always > 1 / C > 0.
    which = (confidence * bins).ceil().long().clamp(1, bins) - 1
    gap = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, correct - confidence)
    return 100 * gap.abs().sum().item() / len(labels)
