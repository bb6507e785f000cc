"""Uncertainty of test metrics: bootstrap intervals over patients, and comparing two models.

Images of one patient are not independent — a model that misreads a patient tends to misread all of
their studies — so the bootstrap resamples **patients**: each resample draws patients with
replacement and every image of a drawn patient comes along, as often as the patient was drawn.
A resample is a row of integer weights over images, and every metric below is computed from
weighted counts for all resamples at once (matrix products and cumulative sums, no Python loop
over resamples), so a thousand resamples of a few thousand images take well under a second.

Two models on the same test set: DeLong's test for correlated AUROCs (DeLong et al. 1988, in the
fast form of Sun & Xu 2014), and a paired patient bootstrap of the AUROC difference. One model on two
sites' images (external validation): ``delong_unpaired``, the same variance without the covariance term.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import norm

INTERVAL_METRICS = ("auroc", "auprc", "sensitivity", "specificity", "ppv", "npv", "f1", "accuracy")


def patient_weights(patient_ids, resamples: int, seed: int = 0) -> np.ndarray:
    """``(resamples, images)`` integer weights: how often each image's patient was drawn."""
    codes, uniques = pd.factorize(pd.Series(patient_ids).astype(str))
    n, rng = len(uniques), np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n)) + n * np.arange(resamples)[:, None]
    counts = np.bincount(draws.ravel(), minlength=resamples * n).reshape(resamples, n)
    return counts[:, codes]


def _grouped(y: np.ndarray, p: np.ndarray, w: np.ndarray, descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Positive and negative weight per distinct score (ties pooled), scores sorted."""
    order = np.argsort(-p if descending else p, kind="stable")
    sorted_p = p[order]
    starts = np.r_[0, np.nonzero(np.diff(sorted_p))[0] + 1]
    pos = np.add.reduceat(w[:, order] * (y[order] == 1), starts, axis=1)
    neg = np.add.reduceat(w[:, order] * (y[order] == 0), starts, axis=1)
    return pos, neg


def weighted_auroc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """AUROC under each row of weights ``w`` (``(B, N)``): the weighted probability that a positive
    outscores a negative, ties counting one half. Equals scikit-learn's with ``sample_weight``."""
    pos, neg = _grouped(y, p, np.atleast_2d(w).astype(float), descending=False)
    below = np.cumsum(neg, axis=1) - neg
    total = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (pos * (below + 0.5 * neg)).sum(axis=1) / total, np.nan)


def weighted_average_precision(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision under each row of weights, as scikit-learn's ``average_precision_score``."""
    pos, neg = _grouped(y, p, np.atleast_2d(w).astype(float), descending=True)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        return (pos * precision).sum(axis=1) / pos.sum(axis=1)


def weighted_at_threshold(y: np.ndarray, p: np.ndarray, w: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    predicted, positive = p >= threshold, y == 1
    w = np.atleast_2d(w).astype(float)
    tp, fp = w @ (predicted & positive), w @ (predicted & ~positive)
    fn, tn = w @ (~predicted & positive), w @ (~predicted & ~positive)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "f1": 2 * tp / (2 * tp + fp + fn),
            "accuracy": (tp + tn) / (tp + tn + fp + fn),
        }


def percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_intervals(
    y, p, patient_ids, threshold: float, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of ``INTERVAL_METRICS`` over patient resamples, at a fixed ``threshold``
    (chosen on val, so it is not re-chosen per resample). Images with an unknown label are left out."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    keep = ~np.isnan(y) & ~np.isnan(p)
    y, p, ids = y[keep].astype(int), p[keep], np.asarray(patient_ids)[keep]
    if len(y) == 0:
        return {m: (float("nan"), float("nan")) for m in INTERVAL_METRICS}
    w = patient_weights(ids, resamples, seed)
    values = {"auroc": weighted_auroc(y, p, w), "auprc": weighted_average_precision(y, p, w)}
    values.update(weighted_at_threshold(y, p, w, threshold))
    return {metric: percentile_interval(values[metric], level) for metric in INTERVAL_METRICS}


def _midranks(x: np.ndarray) -> np.ndarray:
    return pd.Series(x).rank(method="average").to_numpy()


def _components(pos: np.ndarray, neg: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """The AUROC and DeLong's structural components from midranks (Sun & Xu 2014): per positive, the share of
    negatives it outscores (V10); per negative, the share of positives that outscore it (V01); ties count ½."""
    m, n = len(pos), len(neg)
    both = _midranks(np.r_[pos, neg])
    auc = (both[:m].sum() - m * (m + 1) / 2) / (m * n)
    return float(auc), (both[:m] - _midranks(pos)) / n, 1 - (both[m:] - _midranks(neg)) / m


def _z_test(difference: float, variance: float) -> tuple[float, float]:
    """z and the two-sided p-value of a difference with this variance; no variance: no doubt either way."""
    if variance <= 1e-15:
        z = 0.0 if abs(difference) < 1e-12 else float(np.copysign(np.inf, difference))
        return z, 1.0 if z == 0 else 0.0
    z = difference / np.sqrt(variance)
    return float(z), float(2 * norm.sf(abs(z)))


def delong(y, p_a, p_b) -> dict[str, float]:
    """DeLong's test of two correlated AUROCs on the same images: both AUROCs, their difference, its
    standard error, z and the two-sided p-value."""
    y, a, b = np.asarray(y, float), np.asarray(p_a, float), np.asarray(p_b, float)
    keep = ~np.isnan(y) & ~np.isnan(a) & ~np.isnan(b)
    y, scores = y[keep].astype(int), np.stack([a[keep], b[keep]])
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        nan = float("nan")
        return {"auroc_a": nan, "auroc_b": nan, "difference": nan, "se": nan, "z": nan, "p_value": nan}
    v10, v01, aucs = np.empty((2, m)), np.empty((2, n)), np.empty(2)
    for k in range(2):
        aucs[k], v10[k], v01[k] = _components(pos[k], neg[k])
    s10 = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((2, 2))
    s01 = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((2, 2))
    covariance = s10 / m + s01 / n
    variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
    difference = aucs[0] - aucs[1]
    z, p_value = _z_test(difference, variance)
    return {
        "auroc_a": float(aucs[0]), "auroc_b": float(aucs[1]), "difference": float(difference),
        "se": float(np.sqrt(max(variance, 0.0))), "z": float(z), "p_value": p_value,
    }  # fmt: skip


def paired_bootstrap(y, p_a, p_b, patient_ids, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """AUROC(a) − AUROC(b) over the same patient resamples for both models: the interval, and the
    share of resamples in which model b did at least as well (a one-sided bootstrap p-value)."""
    y, a, b = np.asarray(y, float), np.asarray(p_a, float), np.asarray(p_b, float)
    keep = ~np.isnan(y) & ~np.isnan(a) & ~np.isnan(b)
    w = patient_weights(np.asarray(patient_ids)[keep], resamples, seed)
    y = y[keep].astype(int)
    difference = weighted_auroc(y, a[keep], w) - weighted_auroc(y, b[keep], w)
    lo, hi = percentile_interval(difference, level)
    valid = difference[~np.isnan(difference)]
    return {
        "difference_lo": lo,
        "difference_hi": hi,
        "share_b_not_worse": float((valid <= 0).mean()) if len(valid) else float("nan"),
    }


def delong_variance(y, p) -> tuple[float, float]:
    """One AUROC and DeLong's estimate of its variance (images as the unit); NaN without both classes."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    keep = ~np.isnan(y) & ~np.isnan(p)
    y, p = y[keep], p[keep]
    pos, neg = p[y == 1], p[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan"), float("nan")
    auc, v10, v01 = _components(pos, neg)
    variance = (v10.var(ddof=1) / len(pos) if len(pos) > 1 else 0.0) + (v01.var(ddof=1) / len(neg) if len(neg) > 1 else 0.0)
    return auc, float(variance)


def delong_unpaired(y_a, p_a, y_b, p_b) -> dict[str, float]:
    """Two AUROCs measured on different images (another site's patients): independent, so the variance of
    the difference is the sum of each AUROC's DeLong variance, with no covariance term; a z-test on it.
    Keys as ``delong``'s: ``difference`` is AUROC(a) − AUROC(b)."""
    (auc_a, var_a), (auc_b, var_b) = delong_variance(y_a, p_a), delong_variance(y_b, p_b)
    difference, variance = auc_a - auc_b, var_a + var_b
    z, p_value = _z_test(difference, variance) if not np.isnan(variance) else (float("nan"), float("nan"))
    return {
        "auroc_a": auc_a, "auroc_b": auc_b, "difference": float(difference),
        "se": float(np.sqrt(variance)) if not np.isnan(variance) else float("nan"), "z": float(z), "p_value": p_value,
    }  # fmt: skip
