"""Calibration: expected calibration error, reliability curves, and temperature scaling.

Temperature scaling (Guo et al. 2017) divides each model output's logit by a temperature fitted on
the validation split by minimising the negative log-likelihood; it changes no ranking (AUROC stays
the same) but makes a "0.8" mean eight in ten. The fitted temperatures live next to the weights,
in the checkpoint directory, as ``calibration.json``::

    {"temperature": [T_0, T_1, ...]}     # one float per model output

and scoring applies ``logits / T`` before the sigmoid/softmax. Multi-label and ordinal tasks get one
temperature per output; a multi-class softmax gets one shared temperature (repeated per output), as
per-class temperatures would change which class is most probable.

Evaluation only sees probabilities, so logits are recovered from them: ``log(p / (1 - p))`` for
sigmoid outputs, ``log p`` for a softmax (equal to the logits up to a constant, which a softmax
ignores) and the cumulative "grade > k" probabilities for ordinal outputs.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import torch
from scipy.optimize import minimize_scalar

from medray.io import storage
from medray.training.losses import probabilities

CALIBRATION_FILE = "calibration.json"
_EPS = 1e-7


def expected_calibration_error(y, p, bins: int = 10) -> float:
    """ECE over equal-width probability bins: Σ (bin size / n) · |observed rate − mean probability|."""
    table = reliability(y, p, bins)
    if table["count"].sum() == 0:
        return float("nan")
    gap = (table["observed"] - table["predicted"]).abs().fillna(0)
    return float((table["count"] * gap).sum() / table["count"].sum())


def reliability(y, p, bins: int = 10) -> pd.DataFrame:
    """Per bin: how many images, their mean predicted probability and the observed positive rate."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    keep = ~np.isnan(y) & ~np.isnan(p)
    y, p = y[keep], p[keep]
    index = np.clip((p * bins).astype(int), 0, bins - 1)  # p == 1 belongs to the last bin
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return pd.DataFrame(
            {
                "lower": np.arange(bins) / bins,
                "count": count,
                "predicted": np.bincount(index, p, minlength=bins) / count,
                "observed": np.bincount(index, y, minlength=bins) / count,
            }
        )


def logits_from_probabilities(task: str, probs: np.ndarray) -> np.ndarray:
    """One logit per model output, from the per-label probabilities that ``losses.probabilities`` gave."""
    probs = np.clip(np.asarray(probs, float), _EPS, 1 - _EPS)
    if task == "multi-class":
        return np.log(probs)
    if task == "ordinal":
        exceeds = np.clip(1 - np.cumsum(probs, axis=1)[:, :-1], _EPS, 1 - _EPS)  # P(grade > k)
        return np.log(exceeds / (1 - exceeds))
    return np.log(probs / (1 - probs))


def apply_temperature(task: str, logits: np.ndarray, temperature) -> np.ndarray:
    """Per-label probabilities from ``logits / temperature`` (one temperature per output)."""
    scaled = torch.as_tensor(np.asarray(logits, float) / np.asarray(temperature, float))
    return probabilities(task, scaled).double().numpy()


def _nll(task: str, logits: np.ndarray, targets: np.ndarray, t: float) -> float:
    p = np.clip(apply_temperature(task, logits, t), _EPS, 1 - _EPS)
    if task == "multi-class":
        return float(-(targets * np.log(p)).sum(axis=1).mean())
    return float(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean())


def _fit_one(task: str, logits: np.ndarray, targets: np.ndarray) -> float:
    if len(targets) == 0 or len(np.unique(targets)) < 2:
        return 1.0  # nothing to calibrate against
    found = minimize_scalar(lambda log_t: _nll(task, logits, targets, float(np.exp(log_t))), bounds=(-4, 4), method="bounded")
    return float(np.exp(found.x))


def fit_temperature(task: str, probs: np.ndarray, targets: np.ndarray) -> list[float]:
    """Temperatures (one per model output) minimising the validation negative log-likelihood."""
    logits, targets = logits_from_probabilities(task, probs), np.asarray(targets, float)
    if task == "multi-class":
        known = ~np.isnan(targets).any(axis=1)
        return [_fit_one(task, logits[known], targets[known])] * logits.shape[1]
    if task == "ordinal":
        known = ~np.isnan(targets).any(axis=1)
        grade = targets[known].argmax(axis=1)
        exceeds = (grade[:, None] > np.arange(logits.shape[1])[None, :]).astype(float)
        return [_fit_one("multi-label", logits[known][:, [k]], exceeds[:, [k]]) for k in range(logits.shape[1])]
    temperatures = []
    for k in range(logits.shape[1]):
        known = ~np.isnan(targets[:, k])
        temperatures.append(_fit_one(task, logits[known][:, [k]], targets[known][:, [k]]))
    return temperatures


def calibrate(task: str, probs: np.ndarray, temperature: list[float]) -> np.ndarray:
    return apply_temperature(task, logits_from_probabilities(task, probs), temperature)


def save_temperature(checkpoint_uri: str, temperature: list[float]) -> str:
    uri = storage.join(checkpoint_uri, CALIBRATION_FILE)
    storage.write_text(uri, json.dumps({"temperature": [float(t) for t in temperature]}, indent=2))
    return uri


def load_temperature(checkpoint_uri: str) -> list[float] | None:
    """The checkpoint's temperatures, or None when it was never calibrated."""
    uri = storage.join(checkpoint_uri, CALIBRATION_FILE)
    if not storage.exists(uri):
        return None
    temperature = json.loads(storage.read_text(uri)).get("temperature")
    if not isinstance(temperature, list) or not all(isinstance(t, (int, float)) and t > 0 for t in temperature):
        raise ValueError(f"{uri}: 'temperature' must be a list of positive numbers, one per model output")
    return [float(t) for t in temperature]
