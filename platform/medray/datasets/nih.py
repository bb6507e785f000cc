"""NIH ChestX-ray14: ``Data_Entry_2017.csv`` (local or S3) → canonical manifest.

The published CSV has bracketed two-field headers (``OriginalImage[Width,Height]``) and a trailing
comma; only the named columns are used, so both quirks are harmless. Images are found anywhere
under the CSV's folder (the release spreads them over ``images_001/images/`` … ``images_012/``).
Rows whose image is missing or unreadable, or whose findings are not NIH labels, are quarantined.
"""

from __future__ import annotations

import io
import logging
import posixpath
from dataclasses import dataclass

import numpy as np
import pandas as pd

from medray import storage
from medray.data import check_images
from medray.images import IMAGE_EXTENSIONS
from medray.manifest import Manifest, write_manifest, write_quarantine

log = logging.getLogger(__name__)

NIH_LABELS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip
NO_FINDING = "No Finding"
COLUMNS = {"Image Index": "name", "Finding Labels": "findings", "Patient ID": "patient_id", "Follow-up #": "follow_up"}
OPTIONAL = {"Patient Age": "age", "Patient Gender": "sex", "Patient Sex": "sex", "View Position": "view"}


@dataclass
class IngestResult:
    manifest: str
    quarantine: str
    images: int
    quarantined: int


def _age(value) -> float:
    """Ages are integers in the 2017 release and '058Y' strings in the first one."""
    text = str(value).strip().upper().rstrip("Y")
    return float(text) if text.isdigit() else np.nan


def read_entries(csv_uri: str) -> pd.DataFrame:
    raw = pd.read_csv(io.BytesIO(storage.read_bytes(csv_uri)), dtype=str, skipinitialspace=True)
    raw.columns = [c.strip() for c in raw.columns]
    missing = [c for c in COLUMNS if c not in raw]
    if missing:
        raise ValueError(f"{csv_uri}: missing NIH column(s) {missing}; found {list(raw.columns)}")
    frame = raw[[*COLUMNS, *(c for c in OPTIONAL if c in raw)]].rename(columns={**COLUMNS, **OPTIONAL})
    return frame


def ingest_nih(
    csv_uri: str, out: str, labels: list[str] | None = None, check: bool = True
) -> IngestResult:
    """Write ``out`` (the manifest) and ``<out>.quarantine.parquet`` (rows that could not be used)."""
    labels = list(labels or NIH_LABELS)
    unknown = [label for label in labels if label not in NIH_LABELS]
    if unknown:
        raise ValueError(f"labels {unknown} are not NIH ChestX-ray14 labels; known: {list(NIH_LABELS)}")
    entries = read_entries(csv_uri)
    root = storage.parent(csv_uri)
    found = {posixpath.basename(uri): uri for uri in storage.list_files(root, IMAGE_EXTENSIONS)}

    rows, quarantine = [], []
    for entry in entries.itertuples(index=False):
        tokens = {t.strip() for t in str(entry.findings).split("|")} - {NO_FINDING, ""}
        uri = found.get(entry.name)
        if uri is None:
            quarantine.append({"image": storage.join(root, entry.name), "reason": "image file not found"})
        elif tokens - set(NIH_LABELS):
            quarantine.append({"image": uri, "reason": f"unknown finding label(s) {sorted(tokens - set(NIH_LABELS))}"})
        else:
            row = {
                "image": uri,
                "patient_id": str(entry.patient_id).strip(),
                "study_id": f"{entry.patient_id}_{entry.follow_up}",
                **{label: float(label in tokens) for label in labels},
            }
            for key in ("sex", "view"):
                if hasattr(entry, key):
                    row[key] = getattr(entry, key)
            if hasattr(entry, "age"):
                row["age"] = _age(entry.age)
            rows.append(row)

    frame = pd.DataFrame(rows)
    if check and len(frame):
        unreadable = check_images(frame["image"].tolist())
        quarantine += [{"image": uri, "reason": reason} for uri, reason in unreadable.items()]
        frame = frame[~frame["image"].isin(unreadable)].reset_index(drop=True)
    if frame.empty:
        raise ValueError(f"{csv_uri}: no usable rows ({len(quarantine)} quarantined)")

    quarantine_uri = out.removesuffix(".parquet") + ".quarantine.parquet"
    write_manifest(Manifest(frame, labels), out)
    write_quarantine(quarantine, quarantine_uri)
    never = [label for label in labels if not (frame[label] == 1).any()]
    if never:
        log.warning("labels with no positive image: %s", never)
    log.info("ingested %d images of %d patients; %d quarantined", len(frame), frame["patient_id"].nunique(), len(quarantine))
    return IngestResult(out, quarantine_uri, len(frame), len(quarantine))
