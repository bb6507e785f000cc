"""The model against clinical readers: each rater as a point on the model's ROC curve.

Each rater's reads of the test images give one operating point (sensitivity, specificity) against the
reference labels. The model is compared at that rater's specificity: its best sensitivity among the
thresholds that are at least as specific. A rater whose point lies under the model's curve (the model
is more sensitive at the same specificity) counts towards the CheXpert scorer's ``NumRadsUnderROC``.
The difference comes with a 95 % interval from a paired patient bootstrap: each resample draws
patients, and the rater's point and the model's sensitivity at it are both recomputed on it.
"""

from __future__ import annotations

import posixpath

import numpy as np
import pandas as pd

from medray.evaluation.intervals import patient_weights, percentile_interval


def weighted_sensitivity_at(y: np.ndarray, p: np.ndarray, w: np.ndarray, specificity: np.ndarray) -> np.ndarray:
    """Per row of weights ``w`` (``(B, N)``), the best sensitivity among thresholds whose specificity is at
    least that row's ``specificity`` (``(B,)``); as ``validation.sensitivity_at_specificity`` unweighted."""
    w = np.atleast_2d(w).astype(float)
    order = np.argsort(-p, kind="stable")
    starts = np.r_[0, np.nonzero(np.diff(p[order]))[0] + 1]  # ties form one step of the curve
    tp = np.cumsum(np.add.reduceat(w[:, order] * (y[order] == 1), starts, axis=1), axis=1)
    fp = np.cumsum(np.add.reduceat(w[:, order] * (y[order] == 0), starts, axis=1), axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr, fpr = tp / tp[:, -1:], fp / fp[:, -1:]
    allowed = fpr <= 1 - np.asarray(specificity, float)[:, None] + 1e-12
    return np.where(allowed, tpr, 0.0).max(axis=1)  # the threshold above every score: sensitivity 0


def _rater_counts(y: np.ndarray, v: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = (w * ((y == 1) & (v == 1))).sum(1) / (w * (y == 1)).sum(1)
        specificity = (w * ((y == 0) & (v == 0))).sum(1) / (w * (y == 0)).sum(1)
    return sensitivity, specificity


def rater_table(test: pd.DataFrame, votes: pd.DataFrame, labels: list[str], image: str = "Image Index", rater: str = "Rater",
                resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per label and rater: the rater's sensitivity and specificity on the test images they read, the
    model's sensitivity at that specificity, the difference (model − rater) with its 95 % interval, and
    whether the rater lies under the model's ROC curve. ``test``: image, patient_id, the labels and
    ``prob_<label>``; ``votes``: one row per (image, rater), joined on the image's file name."""
    votes = votes.assign(_key=votes[image].map(lambda name: posixpath.basename(str(name))))
    keys = test["image"].map(lambda uri: posixpath.basename(str(uri)))
    rows = []
    for label in [label for label in labels if label in votes]:
        for name, reads in votes.groupby(rater, sort=True):
            read = reads.drop_duplicates("_key").set_index("_key")[label]
            v = keys.map(read).to_numpy(float)
            y, p = test[label].to_numpy(float), test[f"prob_{label}"].to_numpy(float)
            keep = ~np.isnan(v) & ~np.isnan(y) & ~np.isnan(p)
            if keep.sum() == 0 or len(np.unique(y[keep])) < 2:
                continue
            y, p, v, patients = y[keep], p[keep], v[keep], test["patient_id"].to_numpy()[keep]
            ones = np.ones((1, len(y)))
            (sensitivity,), (specificity,) = _rater_counts(y, v, ones)
            model = float(weighted_sensitivity_at(y, p, ones, np.array([specificity]))[0])
            w = patient_weights(patients, resamples, seed)
            boot_sens, boot_spec = _rater_counts(y, v, w)
            differences = weighted_sensitivity_at(y, p, w, np.nan_to_num(boot_spec, nan=1.0)) - boot_sens
            lo, hi = percentile_interval(differences, 0.95)
            rows.append({"label": label, "rater": str(name), "images": int(keep.sum()), "positives": int(y.sum()),
                         "sensitivity": float(sensitivity), "specificity": float(specificity),
                         "model_sensitivity": model, "difference": model - float(sensitivity),
                         "difference_lo": lo, "difference_hi": hi, "under_curve": bool(model > sensitivity)})  # fmt: skip
    return pd.DataFrame(rows)


def consensus_check(test: pd.DataFrame, votes: pd.DataFrame, labels: list[str], image: str = "Image Index",
                    rater: str = "Rater") -> tuple[pd.DataFrame, pd.DataFrame]:
    """How the two consensus rules fare against the reference labels on the test images, per label: the share
    the majority vote and the Dawid–Skene consensus get right; and per label and rater the Dawid–Skene
    estimates (from all the votes, without the reference) beside the rater's accuracy measured against
    the reference on the test images — how far EM can be trusted where no reference exists."""
    from medray.data.labels import consensus, dawid_skene

    keys = test["image"].map(lambda uri: posixpath.basename(str(uri)))
    votes = votes.assign(**{image: votes[image].map(lambda name: posixpath.basename(str(name)))})
    named = [label for label in labels if label in votes]
    majority = consensus(votes, named, image, rater).reindex(keys.to_numpy())
    weighted = consensus(votes, named, image, rater, method="dawid-skene").reindex(keys.to_numpy())
    rules, estimates = [], []
    for label in named:
        y = test[label].to_numpy(float)
        for name, table in (("majority vote", majority), ("Dawid-Skene", weighted)):
            c = table[label].to_numpy(float)
            known = ~np.isnan(y) & ~np.isnan(c)
            rules.append({"label": label, "consensus": name, "images": int(known.sum()),
                          "agrees_with_reference": float((c[known] == y[known]).mean()) if known.any() else float("nan")})  # fmt: skip
        _, raters = dawid_skene(votes, label, image, rater)
        for name, row in raters.iterrows():
            estimates.append({"label": label, "rater": str(name), "em_sensitivity": row["sensitivity"], "em_specificity": row["specificity"]})
    return pd.DataFrame(rules), pd.DataFrame(estimates)


def raters_under_curve(table: pd.DataFrame) -> pd.Series:
    """Per label, how many raters lie under the model's ROC curve (the CheXpert scorer's ``NumRadsUnderROC``)."""
    if table.empty:
        return pd.Series(dtype=int)
    return table.groupby("label", sort=False)["under_curve"].sum().astype(int)
