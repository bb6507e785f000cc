"""The slide manifest: one row per slide (``image``, ``patient_id``, labels, optional ``mask``).

Read from a CSV (paths relative to the CSV are resolved against its folder, so a dataset folder can
move, or live on S3) or from a Parquet manifest written by medray. The result is a canonical
``Manifest`` (medray.data.manifest), so that ``split_by_patient`` and everything else apply unchanged.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd

from medray.data.manifest import Manifest, ManifestError, read_manifest, validate
from medray.io import storage

KNOWN = ("image", "patient_id", "slide_id", "mask", "study_id", "split", "sex", "age", "view", "site")


def _resolve(uri: str, base: str) -> str:
    if not uri or storage.is_s3(uri) or os.path.isabs(uri):
        return uri
    return storage.join(base, uri) if storage.is_s3(base) else os.path.normpath(os.path.join(base, uri))


def read_slide_manifest(uri: str, labels: list[str] | None = None) -> Manifest:
    """A slide manifest as a canonical manifest; ``labels`` default to the CSV's numeric columns."""
    if uri.endswith(".parquet"):
        return read_manifest(uri)
    try:
        frame = pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype={"patient_id": str, "slide_id": str, "mask": str})
    except FileNotFoundError:
        raise ManifestError(f"slide manifest {uri} does not exist") from None
    missing = [c for c in ("image", "patient_id") if c not in frame]
    if missing:
        raise ManifestError(f"{uri}: missing column(s) {missing}")
    if labels is None:
        labels = [c for c in frame.columns if c not in KNOWN and pd.api.types.is_numeric_dtype(frame[c])]
    if not labels:
        raise ManifestError(f"{uri}: no label columns (numeric columns other than {', '.join(KNOWN)})")
    base = storage.parent(uri)
    frame["image"] = [_resolve(str(u), base) for u in frame["image"]]
    if "slide_id" not in frame:
        frame["slide_id"] = [os.path.splitext(os.path.basename(u))[0] for u in frame["image"]]
    frame["mask"] = [_resolve(str(m), base) if isinstance(m, str) and m else "" for m in frame.get("mask", [""] * len(frame))]
    for label in labels:
        frame[label] = frame[label].astype(np.float32)
    if frame["slide_id"].duplicated().any():
        raise ManifestError(f"{uri}: slide_id values repeat; each row must be one slide")
    manifest = Manifest(frame, labels)
    validate(manifest, uri)
    return manifest
