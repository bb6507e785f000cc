"""Per-label classification metrics, built on scikit-learn.

Thresholds are chosen on the validation split (Youden's J) and then applied, unchanged, to the
test split — choosing them on test would flatter the reported sensitivity and specificity.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve


def _known(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = ~np.isnan(y) & ~np.isnan(p)
    return y[keep].astype(int), p[keep]


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """AUROC over known labels; NaN when only one class is present."""
    y, p = _known(np.asarray(y, float), np.asarray(p, float))
    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def sensitivity_at_specificity(y: np.ndarray, p: np.ndarray, specificity: float = 0.9) -> float:
    """The best sensitivity among thresholds whose specificity is at least ``specificity``."""
    y, p = _known(np.asarray(y, float), np.asarray(p, float))
    if len(np.unique(y)) < 2:
        return float("nan")
    fpr, tpr, _ = roc_curve(y, p)
    return float(tpr[fpr <= 1 - specificity].max())


def auroc_per_label(targets: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict[str, float]:
    return {label: auroc(targets[:, i], probs[:, i]) for i, label in enumerate(labels)}


def youden_threshold(y: np.ndarray, p: np.ndarray) -> float:
    y, p = _known(np.asarray(y, float), np.asarray(p, float))
    if len(np.unique(y)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))


def at_threshold(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    y, p = _known(np.asarray(y, float), np.asarray(p, float))
    predicted = p >= threshold
    tp, fn = int((predicted & (y == 1)).sum()), int((~predicted & (y == 1)).sum())
    tn, fp = int((~predicted & (y == 0)).sum()), int((predicted & (y == 0)).sum())

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    return {
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
    }  # fmt: skip


def label_table(
    labels: list[str], val_y: np.ndarray, val_p: np.ndarray, test_y: np.ndarray, test_p: np.ndarray
) -> pd.DataFrame:
    """One row per label: test AUROC, and the metrics at the threshold chosen on val."""
    rows = []
    for i, label in enumerate(labels):
        y, p = test_y[:, i], test_p[:, i]
        known = ~np.isnan(y)
        threshold = youden_threshold(val_y[:, i], val_p[:, i])
        rows.append(
            {
                "label": label,
                "n": int(known.sum()),
                "positives": int(np.nansum(y)),
                "prevalence": float(np.nanmean(y)) if known.any() else float("nan"),
                "auroc": auroc(y, p),
                "threshold": threshold,
                **at_threshold(y, p, threshold),
            }
        )
    return pd.DataFrame(rows).set_index("label")
