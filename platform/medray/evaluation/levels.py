"""Results per study or per patient, beside the per-image ones.

A chest X-ray study often holds several images (PA and lateral, repeats); a clinician reads the study,
and the official CheXpert evaluation scores it by the highest probability among its images. A study is
positive for a finding when any of its images is. The same rule gives per-patient results.
"""

from __future__ import annotations

import pandas as pd

LEVELS = {"image": None, "study": ["patient_id", "study_id"], "patient": ["patient_id"]}


def aggregate(frame: pd.DataFrame, labels: list[str], probs: list[str], level: str) -> pd.DataFrame:
    """One row per study (or patient): the maximum of each label and of each probability over its images
    (unknown labels stay unknown unless an image of the group knows them), with ``patient_id`` and the
    number of images. Study ids are taken within their patient, since many archives number a patient's
    studies from 1."""
    keys = LEVELS[level]
    if keys is None:
        return frame
    grouped = frame.groupby(keys, sort=True, dropna=False)
    out = grouped[[*labels, *probs]].max()  # max skips NaN: a study is unknown only if all its images are
    out["images"] = grouped.size()
    return out.reset_index()
