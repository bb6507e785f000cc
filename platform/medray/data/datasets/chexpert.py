"""CheXpert: ``train.csv`` and/or ``valid.csv`` (local or S3) → canonical manifest.

Published layout: a folder (``CheXpert-v1.0`` or ``CheXpert-v1.0-small``) holding both CSVs and
``train/patientNNNNN/studyN/viewN_frontal.jpg``; the CSV's ``Path`` starts with that folder's name.
Label cells are 1 (positive), 0 (negative), −1 (uncertain) or blank (not mentioned → unknown, NaN).
Uncertain labels follow a policy **per label** (Irvin et al. 2019 found the best one differs by
pathology): ``ignore`` (U-Ignore → NaN, masked out), ``ones`` (U-Ones → 1) or ``zeros`` (U-Zeros → 0).
``Frontal/Lateral`` and ``AP/PA`` become the ``view`` and ``projection`` columns and can filter rows;
rows filtered out are recorded in the quarantine with that reason, so the count still balances.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from medray.data.datasets.encoding import read_csv
from medray.data.datasets.ingest import FileIndex, IngestResult, Options, Rejects, finish
from medray.io import storage

CHEXPERT_LABELS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)  # fmt: skip
POLICIES = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}
VALUES = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0, "": np.nan}
PATIENT = re.compile(r"(patient\d+)/(study\d+)/")
FILES = ("train.csv", "valid.csv")


def _tables(source: str, encoding: str | None) -> list[tuple[str, pd.DataFrame]]:
    """``source`` is one of the CSVs or the folder holding them; each table keeps its file's name."""
    uris = [source] if source.lower().endswith(".csv") else [storage.join(source, f) for f in FILES]
    found = [(uri, read_csv(uri, encoding, dtype=str, keep_default_na=False))
             for uri in uris if storage.exists(uri)]  # fmt: skip
    if not found:
        raise ValueError(f"{source}: no CheXpert train.csv or valid.csv found")
    return found


def _policies(labels: list[str], default: str, per_label: dict[str, str]) -> dict[str, float]:
    unknown = sorted(set(per_label) - set(labels))
    if unknown:
        raise ValueError(f"uncertainty policy given for label(s) {unknown} that are not ingested; labels: {labels}")
    chosen = {label: per_label.get(label, default) for label in labels}
    bad = {label: p for label, p in chosen.items() if p not in POLICIES}
    if bad:
        raise ValueError(f"unknown uncertainty policy {bad}; known: {', '.join(POLICIES)}")
    return {label: POLICIES[p] for label, p in chosen.items()}


def _keep_view(row: pd.Series, views: list[str] | None) -> bool:
    if not views:
        return True
    wanted = {v.strip().lower() for v in views}
    return bool({row.get("Frontal/Lateral", "").strip().lower(), row.get("AP/PA", "").strip().lower()} & wanted)


def ingest_chexpert(
    source: str,
    out: str,
    labels: list[str] | None = None,
    options: Options | None = None,
    uncertainty: str = "ignore",
    uncertainty_per_label: dict[str, str] | None = None,
    views: list[str] | None = None,
) -> IngestResult:
    """``views``: keep only rows whose ``Frontal/Lateral`` or ``AP/PA`` is one of these (e.g. ``["frontal"]``)."""
    options = options or Options()
    labels = list(labels or CHEXPERT_LABELS)
    unknown = [label for label in labels if label not in CHEXPERT_LABELS]
    if unknown:
        raise ValueError(f"labels {unknown} are not CheXpert labels; known: {list(CHEXPERT_LABELS)}")
    policy = _policies(labels, uncertainty, uncertainty_per_label or {})
    tables = _tables(source, options.encoding)
    root = storage.parent(tables[0][0])
    index = FileIndex(root)

    rows, rejects, rows_in = [], Rejects(), 0
    for uri, table in tables:
        missing = [c for c in ("Path", *labels) if c not in table]
        if missing:
            raise ValueError(f"{uri}: missing CheXpert column(s) {missing}")
        rows_in += len(table)
        source_split = storage.basename(uri).removesuffix(".csv")
        for _, entry in table.iterrows():
            image, found = index.resolve(entry["Path"])
            if not found:
                rejects.add(image, "image file not found")
                continue
            if not _keep_view(entry, views):
                rejects.add(image, f"excluded by the views filter {views}")
                continue
            cells = {label: entry[label].strip() for label in labels}
            bad = {label: value for label, value in cells.items() if value not in VALUES}
            if bad:
                rejects.add(image, f"unknown label value(s) in column(s) {sorted(bad)} (expected 1, 0, -1 or blank)")
                continue
            match = PATIENT.search(str(entry["Path"]))
            row = {
                "image": image,
                "patient_id": match.group(1) if match else "",
                "study_id": f"{match.group(1)}/{match.group(2)}" if match else "",
                "source_split": source_split,
                "view": entry.get("Frontal/Lateral", ""),
                "projection": entry.get("AP/PA", ""),
                "sex": entry.get("Sex", ""),
                "age": entry.get("Age", ""),
            }
            for label, value in cells.items():
                number = VALUES[value]
                row[label] = policy[label] if number == -1.0 else number
            rows.append(row)
    return finish(pd.DataFrame(rows), rejects, labels, "multi-label", out, rows_in, options, source)
