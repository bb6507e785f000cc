"""The canonical manifest: one row per image, Parquet, labels and task kind in the schema metadata.

See DESIGN.md §2. Any later step can read the label order from the file itself, so there is no
side file to lose.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from medray.errors import MedrayError
from medray.io import storage

LABELS_KEY = b"medray.labels"
TASK_KEY = b"medray.task"
REQUIRED = ("image", "patient_id")
SPLITS = ("train", "val", "test")


class ManifestError(MedrayError, ValueError):
    pass


@dataclass
class Manifest:
    frame: pd.DataFrame
    labels: list[str]
    task: str = "multi-label"

    def split(self, name: str) -> pd.DataFrame:
        if "split" not in self.frame:
            raise ManifestError("the manifest has no 'split' column: run `medray split` first")
        return self.frame[self.frame["split"] == name].reset_index(drop=True)

    def positives(self, frame: pd.DataFrame | None = None) -> dict[str, int]:
        frame = self.frame if frame is None else frame
        return {label: int((frame[label] == 1).sum()) for label in self.labels}


def validate(manifest: Manifest, where: str = "manifest") -> None:
    missing = [c for c in (*REQUIRED, *manifest.labels) if c not in manifest.frame]
    if missing:
        raise ManifestError(f"{where}: missing column(s) {missing}")
    if manifest.frame["patient_id"].isna().any():
        raise ManifestError(f"{where}: {int(manifest.frame['patient_id'].isna().sum())} rows have no patient_id")
    for label in manifest.labels:
        values = manifest.frame[label].dropna().unique()
        if not set(values) <= {0.0, 1.0}:
            raise ManifestError(f"{where}: label column {label!r} holds values other than 0, 1 and NaN")


def write_manifest(manifest: Manifest, uri: str) -> str:
    validate(manifest, uri)
    frame = manifest.frame.copy()
    for label in manifest.labels:
        frame[label] = frame[label].astype(np.float32)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[LABELS_KEY] = json.dumps(manifest.labels).encode()
    meta[TASK_KEY] = manifest.task.encode()
    buffer = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buffer)
    storage.write_bytes(uri, buffer.getvalue())
    return uri


def read_manifest(uri: str) -> Manifest:
    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    except FileNotFoundError:
        raise ManifestError(f"manifest {uri} does not exist") from None
    meta = table.schema.metadata or {}
    if LABELS_KEY not in meta:
        raise ManifestError(f"{uri}: no label names in the schema metadata; was it written by medray ingest?")
    manifest = Manifest(table.to_pandas(), json.loads(meta[LABELS_KEY]), meta.get(TASK_KEY, b"multi-label").decode())
    validate(manifest, uri)
    return manifest


def write_quarantine(rows: list[dict], uri: str) -> str:
    """Inputs that could not be used, each with its reason: recorded, never silently dropped."""
    frame = pd.DataFrame(rows, columns=["image", "reason"])
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer)
    storage.write_bytes(uri, buffer.getvalue())
    return uri
