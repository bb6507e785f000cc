"""NIH ChestX-ray14: ``Data_Entry_2017.csv`` (local or S3) → canonical manifest.

The published CSV has bracketed two-field headers (``OriginalImage[Width,Height]``) and a trailing
comma; only the named columns are used, so both quirks are harmless. Images are found anywhere
under the CSV's folder (the release spreads them over ``images_001/images/`` … ``images_012/``).
Rows whose image is missing or unreadable, or whose findings are not NIH labels, are quarantined.
When the release's ``train_val_list.txt`` / ``test_list.txt`` sit next to the CSV, the official split
is kept as the ``split`` column, with val carved out of train_val by whole patients.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from medray.data.datasets.encoding import read_csv
from medray.data.datasets.ingest import FileIndex, IngestResult, Options, Rejects, finish
from medray.io import storage

log = logging.getLogger(__name__)

NIH_LABELS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip
NO_FINDING = "No Finding"
COLUMNS = {"Image Index": "name", "Finding Labels": "findings", "Patient ID": "patient_id", "Follow-up #": "follow_up"}
OPTIONAL = {"Patient Age": "age", "Patient Gender": "sex", "Patient Sex": "sex", "View Position": "view"}


def read_entries(csv_uri: str, encoding: str | None = None) -> pd.DataFrame:
    raw = read_csv(csv_uri, encoding, dtype=str, skipinitialspace=True)
    raw.columns = [c.strip() for c in raw.columns]
    missing = [c for c in COLUMNS if c not in raw]
    if missing:
        raise ValueError(f"{csv_uri}: missing NIH column(s) {missing}; found {list(raw.columns)}")
    frame = raw[[*COLUMNS, *(c for c in OPTIONAL if c in raw)]].rename(columns={**COLUMNS, **OPTIONAL})
    return frame


def official_split(names: pd.Series, patients: pd.Series, root: str, val: float, seed: int) -> pd.Series | None:
    """The published split, when its lists are present: test from ``test_list.txt``, val a share of
    train_val's patients (so no patient straddles train and val), the rest train."""
    lists = {name: storage.join(root, f"{name}_list.txt") for name in ("train_val", "test")}
    if not all(storage.exists(uri) for uri in lists.values()):
        return None
    listed = {name: set(storage.read_text(uri).split()) for name, uri in lists.items()}
    split = pd.Series(np.where(names.isin(listed["test"]), "test", None), index=names.index, dtype=object)
    in_train_val = names.isin(listed["train_val"]) & split.isna()
    pool = np.array(sorted(set(patients[in_train_val])))
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(pool, size=round(val * len(pool)), replace=False)) if len(pool) else set()
    split[in_train_val] = np.where(patients[in_train_val].isin(chosen), "val", "train")
    unlisted = int(split.isna().sum())
    if unlisted:
        log.warning(
            "%d images are in neither train_val_list.txt nor test_list.txt: their split is left empty", unlisted
        )
    return split


def ingest_nih(
    csv_uri: str,
    out: str,
    labels: list[str] | None = None,
    check: bool = True,
    options: Options | None = None,
    val: float = 0.1,
    seed: int = 0,
) -> IngestResult:
    """Write ``out`` (the manifest) and ``<out>.quarantine.parquet`` (rows that could not be used)."""
    options = options or Options(check=check)
    labels = list(labels or NIH_LABELS)
    unknown = [label for label in labels if label not in NIH_LABELS]
    if unknown:
        raise ValueError(f"labels {unknown} are not NIH ChestX-ray14 labels; known: {list(NIH_LABELS)}")
    entries = read_entries(csv_uri, options.encoding)
    root = storage.parent(csv_uri)
    index = FileIndex(root)

    rows, rejects = [], Rejects()
    for entry in entries.itertuples(index=False):
        tokens = {t.strip() for t in str(entry.findings).split("|")} - {NO_FINDING, ""}
        uri = index.by_basename(entry.name)
        if uri is None:
            rejects.add(storage.join(root, str(entry.name)), "image file not found")
        elif tokens - set(NIH_LABELS):
            rejects.add(uri, f"unknown finding label(s) {sorted(tokens - set(NIH_LABELS))}")
        else:
            patient = "" if pd.isna(entry.patient_id) else str(entry.patient_id).strip()
            row = {
                "image": uri,
                "patient_id": patient,
                "study_id": f"{patient}_{entry.follow_up}" if patient else "",
                "name": entry.name,
                **{label: float(label in tokens) for label in labels},
            }
            for key in ("sex", "age", "view"):  # ages: integers in the 2017 release, '058Y' in the first
                if hasattr(entry, key):
                    row[key] = getattr(entry, key)
            rows.append(row)

    frame = pd.DataFrame(rows)
    if len(frame):
        split = official_split(frame["name"], frame["patient_id"], root, val, seed)
        if split is not None:
            frame["split"] = split
        frame = frame.drop(columns="name")
    return finish(frame, rejects, labels, "multi-label", out, len(entries), options, csv_uri)
