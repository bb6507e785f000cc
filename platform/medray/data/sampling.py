"""Resampling the training split, with a fresh sample every epoch.

Each strategy is a number per row: how many times the row is expected to be drawn in one epoch.
The Ray Data pipeline draws the actual count of each row on every pass by stochastic rounding
(⌊m⌋, plus one with probability m − ⌊m⌋), which is exact in expectation and leaves a row with m = 1
drawn exactly once. Because the draw happens inside the pipeline, each epoch sees a new sample, and
Ray Train's streaming split gives every DDP worker a disjoint shard of it.

- ``none``: every row once.
- ``undersample``: all rows of the minority class of ``label``; majority rows down to the same number.
- ``oversample``: all majority rows; minority rows drawn with replacement up to the same number.
- ``balanced`` (multi-label): each row weighted by the rarest of its positive labels, so every finding
  (and "no finding") gets the same expected number of draws.
- ``patient_balanced``: each patient equally likely, however many studies they have.

``samples_per_epoch`` rescales the expectations to a fixed epoch length.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

STRATEGIES = ("none", "undersample", "oversample", "balanced", "patient_balanced")
COLUMN = "multiplicity"


def _binary(frame: pd.DataFrame, label: str, strategy: str) -> np.ndarray:
    positive = (frame[label] == 1).to_numpy()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"sampling.strategy {strategy!r} needs positives and negatives of {label!r} in train")
    minority = positive if n_pos <= n_neg else ~positive
    n_min, n_maj = min(n_pos, n_neg), max(n_pos, n_neg)
    if strategy == "undersample":
        return np.where(minority, 1.0, n_min / n_maj)
    return np.where(minority, n_maj / n_min, 1.0)


def _balanced(frame: pd.DataFrame, labels: list[str]) -> np.ndarray:
    positives = (frame[labels] == 1).to_numpy()
    counts = positives.sum(axis=0).astype(float)
    rarest = np.where(positives, counts[None, :], np.inf).min(axis=1)
    no_finding = ~positives.any(axis=1)
    rarest[no_finding] = max(int(no_finding.sum()), 1)
    weights = 1.0 / rarest
    return weights * len(frame) / weights.sum()


def expected_draws(
    frame: pd.DataFrame, labels: list[str], strategy: str, label: str | None = None, samples: int | None = None
) -> np.ndarray:
    """How many times each row of ``frame`` is expected to be drawn in one epoch."""
    if strategy == "none":
        expected = np.ones(len(frame))
    elif strategy in ("undersample", "oversample"):
        expected = _binary(frame, label or labels[0], strategy)
    elif strategy == "balanced":
        expected = _balanced(frame, labels)
    elif strategy == "patient_balanced":
        per_patient = frame.groupby("patient_id")["patient_id"].transform("size").to_numpy()
        expected = len(frame) / (per_patient * frame["patient_id"].nunique())
    else:
        raise ValueError(f"unknown sampling strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    if samples:
        expected = expected * samples / expected.sum()
    return expected


def draw(expected: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Stochastic rounding of the expected draws: integer counts with the same expectation."""
    whole = np.floor(expected)
    return (whole + (rng.random(len(expected)) < expected - whole)).astype(np.int64)


def resample_batch(batch: dict) -> dict:
    """Ray Data UDF: repeat (or drop) each row by its drawn count; runs anew on every epoch."""
    counts = draw(batch[COLUMN], np.random.default_rng())
    return {key: np.repeat(values, counts, axis=0) for key, values in batch.items() if key != COLUMN}
