"""Patient-level train / val / test splits, sampled the way a clinical test set is built.

Test is sampled first, then val, each from whole patients and each enriched to a minimum share of
positive images for every listed label (default 50 %), so that sensitivity is measured on enough
positives; the remaining patients go to train. Labels are served rarest first, and a patient taken
for one label counts for every label it is positive for. Because enriching a rare finding could
starve training, val and test together never take more than ``1 - train_keeps_positive`` of the
positive patients of any listed label. Split sizes are kept as requested — the other labels need
enough cases too — so where the positives run short, the share is reached as far as the data allow
and a warning says how far.

Two other ways to hold data out: ``sites`` makes whole sites the test split (a cross-site test), and
``folds`` divides the patients outside test into grouped, stratified cross-validation folds.

No patient is ever in two splits — and this is checked on the result, not assumed.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd

from medray.data.manifest import SPLITS, Manifest
from medray.errors import CheckFailed

log = logging.getLogger(__name__)
FOLD = "fold"


class LeakageError(CheckFailed, AssertionError):
    pass


def assert_patient_disjoint(frame: pd.DataFrame) -> None:
    per_patient = frame.groupby("patient_id")["split"].nunique()
    shared = int((per_patient > 1).sum())
    if shared:
        raise LeakageError(f"{shared} patients appear in more than one split")


def _labels(manifest: Manifest, label: str | list[str] | None) -> list[str]:
    wanted = [label] if isinstance(label, str) else list(label or manifest.labels[:1])
    for name in wanted:
        if name not in manifest.labels:
            raise ValueError(f"split.label {name!r} is not a label of this manifest: {manifest.labels}")
    return wanted


def _take(pool: list, images: pd.Series, positives: pd.DataFrame, want: dict, target: int, caps: dict) -> list:
    """For each label (rarest first), positive patients until ``want[label]`` positive images, never
    taking more than ``caps[label]`` positive patients of any label; then patients negative for every
    label up to ``target`` images — never past it, so the positive shares cannot be diluted."""
    taken, n_images = [], 0
    n_pos = dict.fromkeys(want, 0)
    n_patients = dict.fromkeys(want, 0)
    chosen = set()
    for label, wanted in want.items():
        for patient in pool:
            if n_pos[label] >= wanted or n_patients[label] >= caps[label]:
                break
            hits = [lab for lab in want if positives.at[patient, lab] > 0]
            if patient in chosen or label not in hits or any(n_patients[lab] >= caps[lab] for lab in hits):
                continue
            taken.append(patient)
            chosen.add(patient)
            n_images += images[patient]
            for lab in hits:
                n_pos[lab] += positives.at[patient, lab]
                n_patients[lab] += 1
    negative = positives.sum(axis=1) == 0
    for patient in pool:
        if patient not in chosen and negative[patient] and n_images + images[patient] <= target:
            taken.append(patient)
            n_images += images[patient]
    return taken


def _enriched(frame, pool, fractions, labels, min_positive, train_keeps_positive) -> dict:
    """``{patient: split}`` for the held-out splits in ``fractions`` (in order), sampled from ``pool``."""
    images = frame.groupby("patient_id", sort=True).size()
    positives = (frame[labels] == 1).groupby(frame["patient_id"], sort=True).sum().astype(int)
    positive_patients = (positives > 0).sum()
    labels = sorted(labels, key=lambda lab: (positive_patients[lab], labels.index(lab)))  # rarest first
    total = sum(fractions.values())
    assignment = {}
    for name, fraction in fractions.items():
        target = round(fraction * len(frame))
        want = {lab: math.ceil(min_positive * target) for lab in labels}
        caps = {lab: math.floor(math.floor(positive_patients[lab] * (1 - train_keeps_positive)) * fraction / total) for lab in labels}
        taken = _take(pool, images, positives, want, target, caps)
        assignment.update(dict.fromkeys(taken, name))
        chosen = set(taken)
        pool = [p for p in pool if p not in chosen]
        n_images = max(images[taken].sum(), 1)
        for label in labels:
            share = positives.loc[taken, label].sum() / n_images
            if share < min_positive:
                log.warning(
                    "%s: %.0f%% %r-positive images, short of the requested %.0f%%: the data allow no more "
                    "while train keeps %.0f%% of the positive patients",
                    name, 100 * share, label, 100 * min_positive, 100 * train_keeps_positive,
                )  # fmt: skip
    return assignment


def _site_test(frame: pd.DataFrame, sites: list[str]) -> set:
    """Patients with any image from a held-out site: all their images go to test."""
    if "site" not in frame:
        raise ValueError("split.sites needs a 'site' column in the manifest")
    present = set(frame["site"].dropna().astype(str))
    missing = [s for s in sites if s not in present]
    if missing:
        raise ValueError(f"split.sites {missing} do not occur in the manifest's 'site' column; sites: {sorted(present)}")
    at_site = frame["site"].astype(str).isin(sites)
    patients = set(frame.loc[at_site, "patient_id"])
    spanning = frame.loc[~at_site & frame["patient_id"].isin(patients), "patient_id"].nunique()
    if spanning:
        log.warning("%d patients also have images at other sites; all their images go to test", spanning)
    return patients


def stratum(frame: pd.DataFrame, labels: list[str]) -> pd.Series:
    """Per patient: the index of its rarest positive label (by positive patients), or -1 for none —
    one class per patient, so that every finding is spread over the folds, the rare ones first."""
    positives = (frame[labels] == 1).groupby(frame["patient_id"]).any()
    order = positives.sum().rank(method="first").to_numpy().astype(int) - 1  # 0 = rarest
    rarest = np.where(positives.to_numpy(), order[None, :], len(labels)).min(axis=1)
    return pd.Series(np.where(rarest == len(labels), -1, rarest), index=positives.index)


def assign_folds(frame: pd.DataFrame, labels: list[str], folds: int, seed: int = 0) -> pd.Series:
    """Grouped, stratified k-fold (scikit-learn's ``StratifiedGroupKFold``): a fold per row, by patient."""
    from sklearn.model_selection import StratifiedGroupKFold

    if frame["patient_id"].nunique() < folds:
        raise ValueError(f"split.folds={folds} needs at least {folds} patients, got {frame['patient_id'].nunique()}")
    y = frame["patient_id"].map(stratum(frame, labels)).to_numpy()
    fold = np.full(len(frame), -1, dtype=np.int64)
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(cv.split(np.zeros(len(frame)), y, groups=frame["patient_id"].to_numpy())):
        fold[held] = k
    return pd.Series(fold, index=frame.index)


def split_by_patient(
    manifest: Manifest,
    val: float = 0.15,
    test: float = 0.15,
    min_positive: float = 0.5,
    label: str | list[str] | None = None,
    seed: int = 0,
    train_keeps_positive: float = 0.5,
    sites: list[str] | None = None,
    folds: int | None = None,
) -> pd.DataFrame:
    """The manifest's rows with a ``split`` column (and ``fold`` with ``folds``); deterministic for a seed.

    ``label`` is one label or a list (default: the first label). With ``sites``, test is every
    patient seen at those sites instead of an enriched sample. With ``folds``, the patients outside
    test are divided into that many folds (column ``fold``, -1 for test); val is fold 0, so the
    result trains as it is, and ``data.fold`` picks another fold as val (see ``fold_view``).
    """
    labels = _labels(manifest, label)
    frame = manifest.frame.drop(columns=["split", FOLD], errors="ignore")
    rng = np.random.default_rng(seed)
    pool = list(rng.permutation(np.sort(frame["patient_id"].unique())))

    assignment = {}
    if sites:
        assignment.update(dict.fromkeys(_site_test(frame, [str(s) for s in sites]), "test"))
        pool = [p for p in pool if p not in assignment]
    held_out = {} if sites else {"test": test}
    if not folds:
        held_out["val"] = val
    if held_out:
        assignment.update(_enriched(frame, pool, held_out, labels, min_positive, train_keeps_positive))
    rest = frame["patient_id"].map(assignment).isna()
    result = frame.assign(split=frame["patient_id"].map(assignment).fillna("train"))
    if folds:
        fold = assign_folds(frame[rest], labels, folds, seed)
        result[FOLD] = fold.reindex(frame.index).fillna(-1).astype(np.int64)
        result.loc[result[FOLD] == 0, "split"] = "val"
    assert_patient_disjoint(result)
    return result


def fold_view(frame: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The split manifest with fold ``fold`` as val and the other folds as train; test unchanged."""
    if FOLD not in frame:
        raise ValueError("data.fold is set but the manifest has no 'fold' column: split with split.folds first")
    folds = sorted(int(k) for k in frame[FOLD].unique() if k >= 0)
    if fold not in folds:
        raise ValueError(f"data.fold={fold} is not a fold of this manifest; folds: {folds}")
    split = frame["split"].copy()
    inside = frame[FOLD] >= 0
    split[inside] = np.where(frame.loc[inside, FOLD] == fold, "val", "train")
    return frame.assign(split=split)


def split_with_config(manifest: Manifest, s, force: bool = False) -> pd.DataFrame:
    """``split_by_patient`` with a ``SplitConfig``: what ``medray split`` and the demo call.

    A manifest that came with a split of its own (NIH's official lists, MedMNIST's archive) keeps it,
    with a warning, since published results are measured on it and a re-split silently makes them
    incomparable; ``force`` replaces it by a patient-level split."""
    frame = manifest.frame
    if not force and "split" in frame and frame["split"].notna().any():
        counts = frame["split"].value_counts(dropna=False).to_dict()
        log.warning("the manifest already has a split (%s): kept; pass --force to replace it by a patient-level split",
                    ", ".join(f"{name} {n}" for name, n in counts.items()))  # fmt: skip
        return frame
    return split_by_patient(
        manifest, s.val, s.test, s.min_positive, s.labels or s.label, s.seed, s.train_keeps_positive, s.sites, s.folds
    )


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
