"""Calibration: expected calibration error, reliability curves, and a calibration fitted on val.

A model trained with class weights learns shifted probabilities. Weighted binary cross-entropy with
weights wp on positives and wn on negatives is minimised by p/(1 − p) = (wp/wn) · π/(1 − π), where π is
the true probability: the model's logit is the calibrated one plus log(wp/wn). With ``seed`` weighting
(wp = N−/N, wn = N+/N) a finding of 5 % prevalence is pushed to about 50 %, and no temperature can move
that intercept. So calibration first undoes the shift exactly (the *prior correction*, from the
training split's weights, recorded in the checkpoint's ``meta.json`` as ``prior_shift``), then may fit
a slope and intercept on val (Platt scaling) or, where val has enough positives and negatives, an
isotonic map. Which one a label keeps is decided on val itself, on out-of-fold predictions (folds
grouped by patient, so that one patient's images never both fit and judge a map): the lowest log loss
among the maps whose expected calibration error (ECE) is no worse than the raw outputs'. ``none`` is
always a candidate, so calibration never makes val worse.

Single-label tasks: a multi-class softmax gets the prior correction per class (log of its class
weight) and one shared temperature, as per-class maps would change which class is most probable;
ordinal outputs ("grade > k") are calibrated like independent sigmoid outputs.

The result lives next to the weights, in the checkpoint directory, as ``calibration.json``::

    {"version": 2, "task": "multi-label",
     "outputs": [{"method": "platt", "shift": 2.9, "slope": 0.8, "intercept": -0.2}, ...]}

and scoring applies it to the logits. A file of the first version (``{"temperature": [T, ...]}``)
still loads: it divides each logit by its temperature.

Evaluation only sees probabilities, so logits are recovered from them: ``log(p / (1 - p))`` for
sigmoid outputs, ``log p`` for a softmax (equal to the logits up to a constant, which a softmax
ignores) and the cumulative "grade > k" probabilities for ordinal outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.optimize import minimize_scalar
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold

from medray.io import storage
from medray.training.losses import probabilities

CALIBRATION_FILE = "calibration.json"
METHODS = ("none", "prior", "platt", "isotonic", "temperature")
# Isotonic regression has as many free steps as the data allow: only with this many positives and negatives.
ISOTONIC_MIN_CASES = 50
_EPS = 1e-7


class CalibrationError(ValueError):
    """A calibration.json that cannot be used: the message names the file and what is wrong."""


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
        return _logit(np.clip(1 - np.cumsum(probs, axis=1)[:, :-1], _EPS, 1 - _EPS))  # P(grade > k)
    return _logit(probs)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def _map(output: dict, z: np.ndarray) -> np.ndarray:
    """One output's calibrated logits."""
    method, z = output["method"], z - output.get("shift", 0.0)
    if method == "platt":
        return output["slope"] * z + output["intercept"]
    if method == "isotonic":
        return _logit(np.interp(z, output["x"], output["y"]))
    if method == "temperature":
        return z / output["temperature"]
    return z  # "none" (no shift) or "prior"


@dataclass(frozen=True)
class Calibration:
    """Per model output, a map from the model's logit to a calibrated one (see the module docstring)."""

    task: str
    outputs: tuple[dict, ...]

    @property
    def methods(self) -> list[str]:
        return [o["method"] for o in self.outputs]

    def logits(self, logits: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits, float)
        return np.stack([_map(o, logits[:, k]) for k, o in enumerate(self.outputs)], axis=1)

    def from_logits(self, logits: np.ndarray) -> np.ndarray:
        """Per-label calibrated probabilities from the model's raw logits."""
        return probabilities(self.task, torch.as_tensor(self.logits(logits))).double().numpy()

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """Per-label calibrated probabilities from the model's raw probabilities."""
        return self.from_logits(logits_from_probabilities(self.task, probs))

    def to_json(self) -> dict:
        return {"version": 2, "task": self.task, "outputs": [dict(o) for o in self.outputs]}


def identity(task: str, outputs: int) -> Calibration:
    return Calibration(task, tuple({"method": "none"} for _ in range(outputs)))


# ---- fitting -------------------------------------------------------------------------------------


def _platt(z: np.ndarray, y: np.ndarray) -> dict:
    if len(np.unique(y)) < 2:
        return {"slope": 1.0, "intercept": 0.0}
    # Mild regularisation keeps the slope finite when val separates the classes perfectly.
    fitted = LogisticRegression(C=100.0).fit(z.reshape(-1, 1), y)
    return {"slope": float(fitted.coef_[0, 0]), "intercept": float(fitted.intercept_[0])}


def _isotonic(z: np.ndarray, y: np.ndarray) -> dict:
    fitted = IsotonicRegression(y_min=_EPS, y_max=1 - _EPS, out_of_bounds="clip").fit(z, y)
    return {"x": fitted.X_thresholds_.tolist(), "y": fitted.y_thresholds_.tolist()}


def _candidate(method: str, shift: float, z: np.ndarray, y: np.ndarray) -> dict:
    """``method``'s map fitted on (z, y); z are raw logits."""
    output = {"method": method}
    if method == "none":
        return output
    output["shift"] = float(shift)
    if method == "platt":
        output.update(_platt(z - shift, y))
    elif method == "isotonic":
        output.update(_isotonic(z - shift, y))
    return output


def _folds(groups: np.ndarray, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    k = min(5, len(np.unique(groups)))
    return list(GroupKFold(n_splits=k).split(np.zeros(n), groups=groups)) if k >= 2 else []


def _out_of_fold(method: str, shift: float, z, y, folds) -> np.ndarray:
    """Val probabilities from ``method``'s map, each fold's from a map fitted on the other folds."""
    if method in ("none", "prior") or not folds:  # nothing fitted: no need to hold data out
        return _sigmoid(_map(_candidate(method, shift, z, y), z))
    predicted = np.empty_like(z)
    for fit_rows, held_rows in folds:
        predicted[held_rows] = _map(_candidate(method, shift, z[fit_rows], y[fit_rows]), z[held_rows])
    return _sigmoid(predicted)


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, _EPS, 1 - _EPS)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def _choose(scores: dict[str, dict[str, float]]) -> str:
    """The map with the lowest out-of-fold log loss among those whose out-of-fold ECE is no worse than
    leaving the outputs alone. Log loss decides between maps because ECE alone favours an isotonic map's
    steps on noise; the ECE condition keeps the promise that calibration never worsens val ECE."""
    admissible = [m for m in scores if scores[m]["ece"] <= scores["none"]["ece"]]
    return min(admissible, key=lambda m: (scores[m]["log_loss"], list(scores).index(m)))  # ties: the simpler map


def _fit_sigmoid(z: np.ndarray, y: np.ndarray, groups: np.ndarray, shift: float, bins: int) -> tuple[dict, dict]:
    """One sigmoid output's chosen map, refitted on all of val; and each candidate's out-of-fold val ECE and log loss."""
    known = ~np.isnan(y)
    z, y, groups = z[known], y[known], groups[known]
    if len(y) == 0 or len(np.unique(y)) < 2:
        return {"method": "none"}, {}
    candidates = ["none", *(["prior"] if shift else []), "platt"]
    if min(y.sum(), len(y) - y.sum()) >= ISOTONIC_MIN_CASES:
        candidates.append("isotonic")
    folds = _folds(groups, len(y))
    scores = {}
    for method in candidates:
        p = _out_of_fold(method, shift, z, y, folds)
        scores[method] = {"ece": expected_calibration_error(y, p, bins), "log_loss": _log_loss(y, p)}
    return _candidate(_choose(scores), shift, z, y), scores


def _nll_multiclass(z: np.ndarray, targets: np.ndarray, t: float) -> float:
    p = np.clip(probabilities("multi-class", torch.as_tensor(z / t)).double().numpy(), _EPS, 1)
    return float(-(targets * np.log(p)).sum(axis=1).mean())


def _fit_multiclass(z: np.ndarray, targets: np.ndarray, shift: np.ndarray, bins: int) -> tuple[list[dict], dict[str, float]]:
    """Softmax outputs: none, prior correction, or prior correction and one shared temperature (its
    val ECE the mean over classes, one against the rest). The temperature is fitted on all of val: one
    number, which cannot overfit as a map can."""
    known = ~np.isnan(targets).any(axis=1)
    z, targets = z[known] - shift, targets[known]
    if len(targets) == 0:
        return [{"method": "none"}] * z.shape[1], {}
    found = minimize_scalar(lambda log_t: _nll_multiclass(z, targets, float(np.exp(log_t))), bounds=(-4, 4), method="bounded")
    t = float(np.exp(found.x))
    options = {
        "none": [{"method": "none"}] * z.shape[1],
        "prior": [{"method": "prior", "shift": float(s)} for s in shift],
        "temperature": [{"method": "temperature", "shift": float(s), "temperature": t} for s in shift],
    }
    raw = z + shift

    def score(outputs: list[dict]) -> dict[str, float]:
        p = Calibration("multi-class", tuple(outputs)).from_logits(raw)
        ece = np.mean([expected_calibration_error(targets[:, c], p[:, c], bins) for c in range(p.shape[1])])
        return {"ece": float(ece), "log_loss": float(-(targets * np.log(np.clip(p, _EPS, 1))).sum(axis=1).mean())}

    scores = {name: score(outputs) for name, outputs in options.items()}
    return options[_choose(scores)], scores


def fit(task: str, probs: np.ndarray, targets: np.ndarray, groups, prior_shift=None, bins: int = 10) -> tuple[Calibration, list[dict]]:
    """The calibration of a model's val outputs: per model output, the map chosen as ``_choose`` says.
    ``groups``: the val rows' patients; ``prior_shift``: per output, the logit shift the training weights
    caused (the checkpoint's ``meta["prior_shift"]``; zeros when unknown). Also returns, per output, each
    candidate's out-of-fold val ECE and log loss."""
    logits, targets = logits_from_probabilities(task, probs), np.asarray(targets, float)
    groups = np.asarray(groups)
    shift = np.zeros(logits.shape[1]) if prior_shift is None else np.asarray(prior_shift, float)
    if len(shift) != logits.shape[1]:
        raise ValueError(f"prior_shift has {len(shift)} values for {logits.shape[1]} model outputs")
    if task == "multi-class":
        outputs, scores = _fit_multiclass(logits, targets, shift, bins)
        return Calibration(task, tuple(outputs)), [scores] * len(outputs)
    if task == "ordinal":
        known = ~np.isnan(targets).any(axis=1)
        grade = np.where(known, np.nan_to_num(targets).argmax(axis=1), -1)
        targets = np.where(known[:, None], (grade[:, None] > np.arange(logits.shape[1])[None, :]).astype(float), np.nan)
    fitted = [_fit_sigmoid(logits[:, k], targets[:, k], groups, shift[k], bins) for k in range(logits.shape[1])]
    return Calibration(task, tuple(o for o, _ in fitted)), [s for _, s in fitted]


# ---- the checkpoint's calibration.json -----------------------------------------------------------


def save(checkpoint_uri: str, calibration: Calibration) -> str:
    uri = storage.join(checkpoint_uri, CALIBRATION_FILE)
    storage.write_text(uri, json.dumps(calibration.to_json(), indent=2))
    return uri


def load(checkpoint_uri: str, task: str, outputs: int) -> Calibration | None:
    """The checkpoint's calibration for a model with ``outputs`` outputs, or None when it was never calibrated."""
    uri = storage.join(checkpoint_uri, CALIBRATION_FILE)
    if not storage.exists(uri):
        return None
    try:
        raw = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as err:
        raise CalibrationError(f"{uri}: not JSON ({err.msg}); delete it and run medray evaluate again") from None
    calibration = _parse(raw, task, uri)
    if len(calibration.outputs) != outputs:
        raise CalibrationError(f"{uri}: {len(calibration.outputs)} calibrated outputs for a model with {outputs} outputs")
    return calibration


def _parse(raw, task: str, uri: str) -> Calibration:
    if isinstance(raw, dict) and "temperature" in raw and "outputs" not in raw:  # the first version
        temperature = raw["temperature"]
        if not isinstance(temperature, list) or not all(isinstance(t, (int, float)) and t > 0 for t in temperature):
            raise CalibrationError(f"{uri}: 'temperature' must be a list of positive numbers, one per model output")
        return Calibration(task, tuple({"method": "temperature", "temperature": float(t)} for t in temperature))
    outputs = raw.get("outputs") if isinstance(raw, dict) else None
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and o.get("method") in METHODS for o in outputs):
        raise CalibrationError(f"{uri}: 'outputs' must list one map per model output, each with a method of {', '.join(METHODS)}")
    needs = {"platt": ("slope", "intercept"), "isotonic": ("x", "y"), "temperature": ("temperature",)}
    for k, output in enumerate(outputs):
        missing = [key for key in needs.get(output["method"], ()) if key not in output]
        if missing:
            raise CalibrationError(f"{uri}: output {k} ({output['method']}) lacks {', '.join(missing)}")
        if output["method"] == "temperature" and not output["temperature"] > 0:
            raise CalibrationError(f"{uri}: output {k} has a temperature of {output['temperature']}; it must be positive")
    return Calibration(raw.get("task", task), tuple(outputs))


# ---- calibration of fixed probabilities on new data (external validation) ----------------------


def calibration_in_the_large(y, p) -> dict[str, float]:
    """Whether predictions are too high or too low on average: ``mean_difference`` = mean predicted −
    observed rate, and ``intercept``, the logistic intercept with logit(p) as an offset (slope fixed at 1):
    0 when calibrated in the large, > 0 when the model under-predicts, < 0 when it over-predicts."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    keep = ~np.isnan(y) & ~np.isnan(p)
    y, z = y[keep], _logit(p[keep])
    nan = float("nan")
    if len(y) == 0:
        return {"mean_difference": nan, "intercept": nan}
    difference = float(_sigmoid(z).mean() - y.mean())
    if len(np.unique(y)) < 2:  # all one class: the intercept runs off to ±∞
        return {"mean_difference": difference, "intercept": nan}
    # The score equation Σ (y − σ(a + z)) = 0 has one root, the log loss being convex in a.
    found = minimize_scalar(lambda a: _log_loss(y, _sigmoid(a + z)), bounds=(-20, 20), method="bounded")
    return {"mean_difference": difference, "intercept": float(found.x)}


def calibration_slope(y, p) -> float:
    """The slope of the logistic regression of the outcome on logit(p): 1 when the spread of the predictions
    is right, < 1 when they are too extreme (overfitting, or a new site's images), > 1 when too timid.
    NaN with a single class, or when p separates the classes (the slope is then unbounded)."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    keep = ~np.isnan(y) & ~np.isnan(p)
    y, z = y[keep], _logit(p[keep])
    if len(np.unique(y)) < 2 or z[y == 0].max() < z[y == 1].min():
        return float("nan")
    return float(LogisticRegression(C=np.inf).fit(z.reshape(-1, 1), y).coef_[0, 0])
