"""What training watches at the end of every epoch: AUROC per label and sensitivity at 90 % specificity
on the validation split (scikit-learn). ``medray.evaluation.metrics`` builds the full report on these."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def known(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pairs whose label and score are both known (an unknown label is NaN, masked out)."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    keep = ~np.isnan(y) & ~np.isnan(p)
    return y[keep].astype(int), p[keep]


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC over known labels; NaN when only one class is present."""
    y, p = known(y, p)
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def auroc_per_label(targets: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict[str, float]:
    return {label: auroc(targets[:, i], probs[:, i]) for i, label in enumerate(labels)}


def sensitivity_at_specificity(y: np.ndarray, p: np.ndarray, specificity: float = 0.9) -> float:
    """The best sensitivity among thresholds whose specificity is at least ``specificity``."""
    y, p = known(y, p)
    if len(np.unique(y)) < 2:
        return float("nan")
    fpr, tpr, _ = roc_curve(y, p)
    return float(tpr[fpr <= 1 - specificity].max())
