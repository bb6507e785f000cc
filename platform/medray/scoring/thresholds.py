"""The operating threshold of each label in a score output: what a positive is, in SRs and in drift statistics.

They are the thresholds ``medray evaluate`` chose on the validation split (``<run>/evaluation/metrics.json``),
used only when that evaluation is of this very model. They were chosen on raw outputs; scores that went through
``calibration.json`` get them mapped through the same monotone maps (multi-label), so that "at or above the
threshold" picks the same inputs either way. Without such an evaluation the threshold is ``DEFAULT_THRESHOLD``,
and the rule in words says so wherever a threshold is shown.
"""

from __future__ import annotations

import json

import numpy as np

from medray.io import storage

DEFAULT_THRESHOLD = 0.5


def frozen_thresholds(run_dir: str, checkpoint_uri: str, model_sha256: str, labels: list[str], task: str, calibrated: bool):
    """(threshold per label, rule in words): the val-chosen thresholds of ``<run>/evaluation/metrics.json``
    when it evaluated this model, on the score output's scale; else ``DEFAULT_THRESHOLD``."""
    from medray.evaluation import calibration
    from medray.training import checkpoint

    default = {label: DEFAULT_THRESHOLD for label in labels}
    uri = storage.join(run_dir, "evaluation", "metrics.json")
    if not storage.exists(uri):
        return default, f"{DEFAULT_THRESHOLD} for every finding (this run has no evaluation: medray evaluate chooses thresholds on val)"
    metrics = json.loads(storage.read_text(uri))
    evaluated = str(metrics.get("checkpoint", ""))
    same = evaluated == checkpoint_uri or (storage.exists(evaluated) and checkpoint.identity(evaluated) == model_sha256)
    table = metrics.get("labels") or {}
    if not same or not all(isinstance(table.get(label, {}).get("threshold"), (int, float)) for label in labels):
        return default, f"{DEFAULT_THRESHOLD} for every finding (the run's evaluation is of another model)"
    chosen = {label: float(table[label]["threshold"]) for label in labels}
    if not calibrated:
        return chosen, "chosen on the validation split by medray evaluate"
    if task != "multi-label":
        return default, f"{DEFAULT_THRESHOLD} for every finding (calibrated {task} outputs: val thresholds do not map onto them)"
    fitted = calibration.load(checkpoint_uri, task, len(labels))
    mapped = fitted.apply(np.array([[chosen[label] for label in labels]]))[0]
    return dict(
        zip(labels, map(float, mapped), strict=True)
    ), "chosen on the validation split by medray evaluate, mapped through calibration.json"
