"""A PACS over DICOMweb (``dicomweb://host:port/root?StudyDate=...&ModalitiesInStudy=CR,DX``) → a manifest.

One row per instance the URI's QIDO-RS filters choose (medray.io.pacs); ``image`` is the instance's URI, which
later steps read with one WADO-RS request each. Patient and study come from each instance's DICOM header, read
in the Ray task that fetches and decodes it (never in the driver), and pseudonymised there by default, as for a
``folder`` of DICOM files.

Hospitals export labels keyed by accession number or Study Instance UID, not by file: ``dicomweb.labels`` is a
CSV or Parquet table with a ``dicomweb.label_key`` column (``AccessionNumber``, ``StudyInstanceUID`` or
``SOPInstanceUID``) and one 0/1 column per label (``ingest.labels`` picks some; default all the others), or, with
``ingest.task: multi-class``/``ordinal``, one column of classes (``ingest.columns.label``). A study-level key
labels every instance of the study. The key is matched against the listing (the accession number comes from the
QIDO-RS study result), so no header is read in the driver. An instance whose key has no row in the table is
quarantined with that reason; a key that appears twice in the table is refused, since it gives one instance two
sets of labels. A manifest without labels cannot be split or trained on, so the table is required; a PACS is
scored without one (``score.input: dicomweb://...``).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pandas as pd

from medray.data.datasets.ingest import IngestResult, Options, Rejects, finish
from medray.data.datasets.table import _label_cells, read_table
from medray.io import dicomweb
from medray.io.pacs import iter_instances

log = logging.getLogger("medray.ingest")
KEYS = ("AccessionNumber", "StudyInstanceUID", "SOPInstanceUID")


def ingest_dicomweb(
    source: str,
    out: str,
    labels_table: str | None,
    label_key: str = "AccessionNumber",
    labels: list[str] | None = None,
    options: Options | None = None,
    task: str = "multi-label",
    columns=None,
) -> IngestResult:
    """``columns``: an ``ingest.columns`` section, for the class column of a multi-class or ordinal table."""
    options = options or Options(ids_from_dicom=True)
    service = dicomweb.parse(source)  # refuses a malformed URI before anything is read
    if not labels_table:
        raise ValueError(
            f"{service}: ingesting a PACS needs a labels table: set dicomweb.labels to a CSV or Parquet file with the column "
            f"{label_key} and a 0/1 column per label (score.input: dicomweb://... scores a PACS without one)"
        )
    if label_key not in KEYS:
        raise ValueError(f"dicomweb.label_key must be one of {', '.join(KEYS)}, got {label_key!r}")
    table = read_table(labels_table, options.encoding)
    if label_key not in table:
        raise ValueError(f"{labels_table}: no {label_key} column (dicomweb.label_key); found {list(table.columns)}")
    keys = table[label_key].astype(str).str.strip()
    repeated = int(keys[keys != ""].duplicated().sum())
    if repeated:  # counted, never quoted: the keys are accession numbers and UIDs
        raise ValueError(f"{labels_table}: {repeated} {label_key} values appear more than once; give each one row")
    names, cells = _cells(table, label_key, labels, task, columns, labels_table)
    by_key = {key: cell for key, cell in zip(keys, cells) if key}

    rows, rejects, listed, matched = [], Rejects(), 0, set()
    for instance in iter_instances(source):
        listed += 1
        key = {"AccessionNumber": instance.accession, "StudyInstanceUID": instance.study, "SOPInstanceUID": instance.sop}[label_key]
        cell = by_key.get(key) if key else None
        if cell is None:
            rejects.add(instance.uri, f"no row in the labels table {labels_table} for its {label_key}")
        elif isinstance(cell, str):
            rejects.add(instance.uri, cell)
        else:
            matched.add(key)
            rows.append({"image": instance.uri, "patient_id": None, **cell})
    if unused := len(by_key) - len(matched):
        log.info("%d rows of the labels table match no listed instance", unused)
    frame = pd.DataFrame(rows, columns=["image", "patient_id", *names]).astype({name: "float32" for name in names})
    return finish(frame, rejects, names, task, out, listed, options, str(service))


def _cells(table: pd.DataFrame, key: str, labels: list[str] | None, task: str, columns, uri: str):
    """Label names and, per table row, its targets or the reason its instances are refused (table.py's rules)."""
    if task in ("multi-class", "ordinal"):
        return _label_cells(table, columns, task)
    names = list(labels or [c for c in table.columns if c not in KEYS])
    missing = [name for name in names if name not in table]
    if missing or not names:
        raise ValueError(f"{uri}: missing label column(s) {missing}; found {list(table.columns)}")
    return _label_cells(table, SimpleNamespace(labels=names), "multi-label")
