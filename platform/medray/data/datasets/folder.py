"""Class-per-folder trees (``root/<class>/<any depth>/<image>``) → a multi-class manifest.

The patient is read from the DICOM header (``PatientID``) for DICOM files, pseudonymised in the
worker that reads it when pseudonymisation is on; for other files it is the file's name without
extension, unless the tree nests a folder per patient (``root/<class>/<patient>/<image>``), which
is then used. Files that are not images by extension are ignored, not ingested. The folder is
listed by medray.io.listing, as scoring lists it: what is named like an image but is not a regular
file (a FIFO, a dangling link, a link to a device) and every link to a folder is quarantined with
the reason, not followed.
"""

from __future__ import annotations

import posixpath

import numpy as np
import pandas as pd

from medray.data.datasets.ingest import IngestResult, Options, Rejects, finish
from medray.io import storage
from medray.io.listing import IMAGE_EXTENSIONS, walk


def ingest_folder(root: str, out: str, labels: list[str] | None = None, options: Options | None = None) -> IngestResult:
    """``labels``: the classes (folder names) in the order of the one-hot columns; default: sorted."""
    options = options or Options(ids_from_dicom=True)
    root = root.rstrip("/") if storage.is_s3(root) else storage.absolute(root)
    entries = list(walk(root, IMAGE_EXTENSIONS))
    files = [e.uri for e in entries if not e.skipped]
    relative = [posixpath.relpath(uri, root) if storage.is_s3(uri) else uri[len(root) + 1 :].replace("\\", "/")
                for uri in files]  # fmt: skip
    nested = [r for r in relative if "/" in r]
    classes = list(labels or sorted({r.split("/", 1)[0] for r in nested}))
    if not classes:
        raise ValueError(f"{root}: no class folders with images found")

    rows, rejects = [], Rejects()
    for entry in entries:
        if entry.skipped:
            rejects.add(entry.uri, entry.skipped)
    for uri, rel in zip(files, relative):
        parts = rel.split("/")
        if len(parts) < 2 or parts[0] not in classes:
            rejects.add(uri, f"not inside a class folder (classes: {classes})")
            continue
        stem = posixpath.splitext(parts[-1])[0]
        patient = parts[1] if len(parts) >= 3 else stem
        rows.append({"image": uri, "patient_id": patient, **{c: float(c == parts[0]) for c in classes}})
    frame = pd.DataFrame(rows, columns=["image", "patient_id", *classes])
    if frame.empty:
        frame = frame.astype({c: np.float32 for c in classes})
    return finish(frame, rejects, classes, "multi-class", out, len(entries), options, root)
