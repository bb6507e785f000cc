"""Multi-label losses with per-class weights from the training split's counts.

``seed`` weighting balances each label's positive and negative contributions to the loss:
wp = N−/N for positives and wn = N+/N for negatives, so that wp·N+ = wn·N−. Unknown labels (NaN)
are masked out of the loss.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def class_weights(targets: np.ndarray, weighting: str = "seed") -> tuple[np.ndarray, np.ndarray]:
    """Per-label (positive, negative) weights from an ``(N, L)`` array of 0 / 1 / NaN."""
    targets = np.asarray(targets, dtype=np.float64)
    n_labels = targets.shape[1]
    if weighting == "none":
        return np.ones(n_labels), np.ones(n_labels)
    if weighting != "seed":
        raise ValueError(f"unknown loss weighting {weighting!r}")
    known = ~np.isnan(targets)
    n = known.sum(axis=0)
    n_pos = np.nansum(targets, axis=0)
    if (n == 0).any():
        raise ValueError("a label has no known value in the training split")
    return (n - n_pos) / n, n_pos / n


class WeightedBCE(nn.Module):
    """Sum over labels of each label's weighted binary cross-entropy, averaged over known entries."""

    def __init__(self, pos_weight, neg_weight):
        super().__init__()
        self.register_buffer("pos_weight", torch.as_tensor(pos_weight, dtype=torch.float32))
        self.register_buffer("neg_weight", torch.as_tensor(neg_weight, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(targets)
        y = torch.nan_to_num(targets)
        logits = logits.float()
        per_entry = -(self.pos_weight * y * F.logsigmoid(logits) + self.neg_weight * (1 - y) * F.logsigmoid(-logits))
        per_label = (per_entry * known).sum(dim=0) / known.sum(dim=0).clamp(min=1)
        return per_label.sum()
