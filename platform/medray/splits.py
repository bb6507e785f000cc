"""Patient-level train / val / test splits, sampled the way a clinical test set is built.

Test is sampled first, then val, each from whole patients and each enriched to a minimum share of
positive images for one label (default 50 %), so that sensitivity is measured on enough positives;
the remaining patients go to train. Because enriching a rare finding could starve training, val and
test together never take more than ``1 - train_keeps_positive`` of the positive patients. Split
sizes are kept as requested — the other labels need enough cases too — so where the positives run
short, the share is reached as far as the data allow and a warning says how far.

No patient is ever in two splits — and this is checked on the result, not assumed.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from medray.manifest import SPLITS, Manifest

log = logging.getLogger(__name__)


class LeakageError(AssertionError):
    pass


def assert_patient_disjoint(frame: pd.DataFrame) -> None:
    per_patient = frame.groupby("patient_id")["split"].nunique()
    shared = int((per_patient > 1).sum())
    if shared:
        raise LeakageError(f"{shared} patients appear in more than one split")


def _take(pool: list, images: pd.Series, positives: pd.Series, want_pos: int, target: int, cap: int) -> list:
    """Positive patients until ``want_pos`` positive images (at most ``cap`` patients), then negative
    patients up to ``target`` images — never past it, so the positive share cannot be diluted."""
    taken, n_images, n_pos = [], 0, 0
    for patient in [p for p in pool if positives[p] > 0]:
        if n_pos >= want_pos or len(taken) >= cap:
            break
        taken.append(patient)
        n_images, n_pos = n_images + images[patient], n_pos + positives[patient]
    for patient in [p for p in pool if positives[p] == 0]:
        if n_images + images[patient] <= target:
            taken.append(patient)
            n_images += images[patient]
    return taken


def split_by_patient(
    manifest: Manifest,
    val: float = 0.15,
    test: float = 0.15,
    min_positive: float = 0.5,
    label: str | None = None,
    seed: int = 0,
    train_keeps_positive: float = 0.5,
) -> pd.DataFrame:
    """The manifest's rows with a ``split`` column; deterministic for a seed."""
    label = label or manifest.labels[0]
    if label not in manifest.labels:
        raise ValueError(f"split.label {label!r} is not a label of this manifest: {manifest.labels}")
    frame = manifest.frame.drop(columns=["split"], errors="ignore")
    by_patient = frame.groupby("patient_id", sort=True)
    images = by_patient.size()
    positives = by_patient[label].apply(lambda s: int((s == 1).sum()))

    rng = np.random.default_rng(seed)
    pool = list(rng.permutation(images.index.to_numpy()))
    positive_patients = int((positives > 0).sum())
    held_out_cap = math.floor(positive_patients * (1 - train_keeps_positive))

    assignment = {}
    for name, fraction in (("test", test), ("val", val)):
        target = round(fraction * len(frame))
        cap = math.floor(held_out_cap * fraction / (val + test))
        taken = _take(pool, images, positives, math.ceil(min_positive * target), target, cap)
        assignment.update(dict.fromkeys(taken, name))
        chosen = set(taken)
        pool = [p for p in pool if p not in chosen]
        share = positives[taken].sum() / max(images[taken].sum(), 1)
        if share < min_positive:
            log.warning(
                "%s: %.0f%% %r-positive images, short of the requested %.0f%%: the data allow no more "
                "while train keeps %.0f%% of the positive patients",
                name, 100 * share, label, 100 * min_positive, 100 * train_keeps_positive,
            )  # fmt: skip
    assignment.update(dict.fromkeys(pool, "train"))

    result = frame.assign(split=frame["patient_id"].map(assignment))
    assert_patient_disjoint(result)
    return result


def summary(frame: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """Patients, images and prevalence of each label per split: the table a reader checks first."""
    rows = []
    for name in SPLITS:
        part = frame[frame["split"] == name]
        row = {"split": name, "patients": part["patient_id"].nunique(), "images": len(part)}
        for label in labels:
            known = part[label].dropna()
            row[f"{label} prevalence"] = float(known.mean()) if len(known) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows).set_index("split")
