"""Losses with class weights from the training split's counts, for each task kind.

- ``multi-label`` (findings on a chest X-ray): one sigmoid per label, a weighted binary cross-entropy
  per label, summed over labels; unknown labels (NaN) are masked out.
- ``multi-class`` (one diagnosis per image, e.g. a skin lesion type): softmax cross-entropy with a
  weight per class; label columns are one-hot.
- ``ordinal`` (grades, e.g. diabetic retinopathy 0–4): K−1 binary "grade > k" outputs (Frank & Hall's
  decomposition), so that confusing grade 1 with 4 costs more than with 2; columns are one-hot grades.

Weightings (per label for multi-label, per class otherwise):
``none``; ``seed`` — wp = N−/N, wn = N+/N, so positives and negatives contribute equally;
``pos_weight`` — wp = N−/N+, wn = 1 (PyTorch's convention); ``effective_number`` — Cui et al. 2019,
weight ∝ (1 − β) / (1 − β^n), normalised to average 1. ``focal_gamma`` > 0 multiplies each term by
(1 − p_t)^γ (Lin et al. 2017) and combines with any weighting. ``label_smoothing`` ε pulls each
binary target towards ½ (y(1 − ε) + ε/2) and each one-hot target towards uniform, so the model stops
pushing logits to infinity on a few hundred images; the class weights still follow the hard labels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TASKS = ("multi-label", "multi-class", "ordinal")
WEIGHTINGS = ("none", "seed", "pos_weight", "effective_number")


def _effective(counts: np.ndarray, beta: float) -> np.ndarray:
    weights = (1 - beta) / (1 - np.power(beta, np.maximum(counts, 1)))
    return weights / weights.mean()


def class_weights(targets: np.ndarray, weighting: str = "seed", beta: float = 0.999) -> tuple[np.ndarray, np.ndarray]:
    """Per-label (positive, negative) weights from an ``(N, L)`` array of 0 / 1 / NaN."""
    targets = np.asarray(targets, dtype=np.float64)
    n = (~np.isnan(targets)).sum(axis=0)
    n_pos = np.nansum(targets, axis=0)
    n_neg = n - n_pos
    if (n == 0).any():
        raise ValueError("a label has no known value in the training split")
    if weighting == "none":
        return np.ones_like(n_pos), np.ones_like(n_pos)
    if weighting == "seed":
        return n_neg / n, n_pos / n
    if weighting == "pos_weight":
        return n_neg / np.maximum(n_pos, 1), np.ones_like(n_pos)
    if weighting == "effective_number":
        pairs = np.stack([_effective(np.array([p, q]), beta) for p, q in zip(n_pos, n_neg)])
        return pairs[:, 0], pairs[:, 1]
    raise ValueError(f"unknown loss weighting {weighting!r}; known: {', '.join(WEIGHTINGS)}")


def per_class_weights(onehot: np.ndarray, weighting: str = "seed", beta: float = 0.999) -> np.ndarray:
    """One weight per class of a single-label task: ``seed`` and ``pos_weight`` both mean the balanced
    inverse frequency N / (K·N_c) here, since each image is a positive of one class and a negative of all others."""
    counts = np.nansum(np.asarray(onehot, dtype=np.float64), axis=0)
    if weighting == "none":
        return np.ones_like(counts)
    if weighting in ("seed", "pos_weight"):
        return counts.sum() / (len(counts) * np.maximum(counts, 1))
    if weighting == "effective_number":
        return _effective(counts, beta)
    raise ValueError(f"unknown loss weighting {weighting!r}; known: {', '.join(WEIGHTINGS)}")


def _focal(p_true: torch.Tensor, gamma: float) -> torch.Tensor:
    return (1 - p_true).clamp(min=0) ** gamma if gamma else torch.ones_like(p_true)


class WeightedBCE(nn.Module):
    """Sum over labels of each label's weighted binary cross-entropy, averaged over known entries."""

    def __init__(self, pos_weight, neg_weight, focal_gamma: float = 0.0, smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("pos_weight", torch.as_tensor(pos_weight, dtype=torch.float32))
        self.register_buffer("neg_weight", torch.as_tensor(neg_weight, dtype=torch.float32))
        self.gamma, self.smoothing = focal_gamma, smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(targets)
        y = torch.nan_to_num(targets) * (1 - self.smoothing) + self.smoothing / 2
        logits = logits.float()
        p = torch.sigmoid(logits)
        positive = self.pos_weight * y * _focal(p, self.gamma) * F.logsigmoid(logits)
        negative = self.neg_weight * (1 - y) * _focal(1 - p, self.gamma) * F.logsigmoid(-logits)
        per_label = (-(positive + negative) * known).sum(dim=0) / known.sum(dim=0).clamp(min=1)
        return per_label.sum()


class WeightedCE(nn.Module):
    """Softmax cross-entropy with class weights; rows whose class is unknown are left out."""

    def __init__(self, weights, focal_gamma: float = 0.0, smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("weights", torch.as_tensor(weights, dtype=torch.float32))
        self.gamma, self.smoothing = focal_gamma, smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(targets).any(dim=1)
        if not known.any():
            return logits.sum() * 0
        classes = torch.nan_to_num(targets[known]).argmax(dim=1)
        log_probs = F.log_softmax(logits[known].float(), dim=1)
        log_true = log_probs.gather(1, classes[:, None]).squeeze(1)
        # As torch's cross_entropy(label_smoothing=ε): (1 − ε)·the true class + ε·uniform over the classes.
        log_p = (1 - self.smoothing) * log_true + self.smoothing * log_probs.mean(dim=1)
        w = self.weights[classes] * _focal(log_true.exp(), self.gamma)
        return -(w * log_p).sum() / self.weights[classes].sum()


def ordinal_targets(onehot: torch.Tensor) -> torch.Tensor:
    """One-hot grades ``(B, K)`` → cumulative ``(B, K−1)``: column k is 1 when the grade exceeds k."""
    grade = torch.nan_to_num(onehot).argmax(dim=1, keepdim=True)
    steps = torch.arange(onehot.shape[1] - 1, device=onehot.device)[None, :]
    cumulative = (grade > steps).float()
    return torch.where(torch.isnan(onehot).any(dim=1, keepdim=True), torch.nan, cumulative)


class OrdinalBCE(nn.Module):
    """Weighted BCE over the K−1 "grade > k" outputs, weights from the cumulative counts."""

    def __init__(self, pos_weight, neg_weight, focal_gamma: float = 0.0, smoothing: float = 0.0):
        super().__init__()
        self.bce = WeightedBCE(pos_weight, neg_weight, focal_gamma, smoothing)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.bce(logits, ordinal_targets(targets))


def head_size(task: str, n_labels: int) -> int:
    return n_labels - 1 if task == "ordinal" else n_labels


def make_loss(
    task: str, train_targets: np.ndarray, weighting: str, beta: float = 0.999, focal_gamma: float = 0.0, smoothing: float = 0.0
) -> nn.Module:
    """The loss for ``task`` with weights computed from the training split's label columns."""
    if task == "multi-label":
        return WeightedBCE(*class_weights(train_targets, weighting, beta), focal_gamma, smoothing)
    if task == "multi-class":
        return WeightedCE(per_class_weights(train_targets, weighting, beta), focal_gamma, smoothing)
    if task == "ordinal":
        cumulative = ordinal_targets(torch.tensor(train_targets, dtype=torch.float32)).numpy()
        return OrdinalBCE(*class_weights(cumulative, weighting, beta), focal_gamma, smoothing)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def probabilities(task: str, logits: torch.Tensor) -> torch.Tensor:
    """Model outputs → one probability per label column (per class for single-label tasks).
    Half-precision outputs (autocast) are computed in float32; float64 (calibration) keeps its precision."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if task == "multi-class":
        return torch.softmax(logits, dim=1)
    if task == "ordinal":
        exceeds = torch.sigmoid(logits)  # P(grade > k), made monotone before differencing
        exceeds = torch.cummin(exceeds, dim=1).values
        ones, zeros = torch.ones_like(exceeds[:, :1]), torch.zeros_like(exceeds[:, :1])
        cumulative = torch.cat([ones, exceeds, zeros], dim=1)
        return cumulative[:, :-1] - cumulative[:, 1:]
    return torch.sigmoid(logits)


def prior_shift(loss: nn.Module) -> list[float]:
    """Per model output, the logit shift a weighted loss teaches the model: log(wp/wn) for sigmoid outputs
    (weighted BCE is minimised by p/(1 − p) = (wp/wn) · π/(1 − π)) and log(w_c) for softmax classes.
    Evaluation undoes it before calibrating (medray.evaluation.calibration)."""
    bce = getattr(loss, "bce", loss)  # OrdinalBCE wraps a WeightedBCE

    def values(weights: torch.Tensor) -> np.ndarray:
        return weights.detach().cpu().double().numpy()  # the worker's loss lives on its device

    if isinstance(bce, WeightedBCE):
        return np.log(values(bce.pos_weight) / values(bce.neg_weight)).tolist()
    return np.log(values(loss.weights)).tolist()
