"""Subgroup analysis: the test metrics by sex, age band, view and site — whichever the manifest holds.

A model can look good overall and fail one group of patients. Each subgroup gets its AUROC with a
patient-bootstrap interval and the sensitivity/specificity at the overall (val-chosen) threshold;
a subgroup whose whole interval lies below the overall interval is **flagged**. Groups with too
few positives or negatives for a stable estimate are **marked small**, not hidden: their wide
intervals are the honest answer. A column the test split cannot support (no readable value, a single
group) is left out with a note that the report shows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from medray.data import metadata
from medray.evaluation.intervals import bootstrap_intervals
from medray.evaluation.metrics import at_threshold, auroc

AGE_BANDS = (0, 40, 60, 80, np.inf)
AGE_NAMES = ("<40", "40–59", "60–79", "80+")
DIMENSIONS = ("sex", "age band", "view", "site")


def dimensions(frame: pd.DataFrame) -> tuple[dict[str, pd.Series], list[str]]:
    """The subgroup columns this manifest can support, as group names per image (NaN: not recorded),
    and a note for each column it holds but cannot support. Age and sex are read by the rules of
    medray.data.metadata, so that a manifest written before ingest normalised them ('50+', 'Male') works."""
    found, notes = {}, []
    for name in DIMENSIONS:
        column = "age" if name == "age band" else name
        if column not in frame:
            continue
        if name == "age band":
            years, _ = metadata.ages(frame["age"])
            groups = pd.cut(years, AGE_BANDS, right=False, labels=AGE_NAMES).astype(object)
        elif name == "sex":
            sex, _ = metadata.sexes(frame["sex"])
            groups = sex.where(sex != metadata.UNKNOWN_SEX)
        else:
            groups = frame[name].astype(object).where(~metadata.is_blank(frame[name]))
        recorded = int(groups.notna().sum())
        if groups.nunique() < 2:
            what = "no test image has a readable value" if not recorded else "every test image is in the same group"
            notes.append(f"{name}: not analysed — {what}, so there is nothing to compare.")
            continue
        if recorded < len(frame):
            notes.append(f"{name}: {len(frame) - recorded} of {len(frame)} test images have no readable value "
                         "and are in no group.")  # fmt: skip
        found[name] = groups
    return found, notes


def subgroup_table(
    frame: pd.DataFrame,
    labels: list[str],
    probs: list[str],
    overall: pd.DataFrame,
    resamples: int = 500,
    seed: int = 0,
    min_cases: int = 10,
) -> pd.DataFrame:
    """One row per (dimension, group, label); ``overall`` is the per-label table with ``threshold``,
    ``auroc_lo`` and ``auroc_hi``."""
    rows = []
    found, notes = dimensions(frame)
    for dimension, groups in found.items():
        order = list(AGE_NAMES) if dimension == "age band" else sorted(groups.dropna().unique(), key=str)
        for group in [g for g in order if (groups == g).any()]:
            part = frame[(groups == group).to_numpy()]
            for label, prob in zip(labels, probs):
                y, p = part[label].to_numpy(float), part[prob].to_numpy(float)
                threshold = overall.loc[label, "threshold"]
                ci = bootstrap_intervals(y, p, part["patient_id"], threshold, resamples, seed)["auroc"]
                counts = at_threshold(y, p, threshold)
                positives, negatives = int(np.nansum(y == 1)), int(np.nansum(y == 0))
                rows.append(
                    {
                        "dimension": dimension,
                        "group": str(group),
                        "label": label,
                        "patients": int(part["patient_id"].nunique()),
                        "images": len(part),
                        "positives": positives,
                        "negatives": negatives,
                        "auroc": auroc(y, p),
                        "auroc_lo": ci[0],
                        "auroc_hi": ci[1],
                        "sensitivity": counts["sensitivity"],
                        "specificity": counts["specificity"],
                        "small": positives < min_cases or negatives < min_cases,
                        "below_overall": bool(ci[1] < overall.loc[label, "auroc_lo"]),
                    }
                )
    table = pd.DataFrame(rows)
    table.attrs["notes"] = notes  # what the report says it left out, and why
    return table
