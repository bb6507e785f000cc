"""Any CSV or Parquet label table + a column mapping from the config → canonical manifest.

The mapping (``ingest.columns``) names the image column (with ``image_pattern`` to turn an ID into
a path, e.g. ``"images/{}.jpg"``, or a list tried in order, ``["images/{}.jpg", "images/{}.png"]``,
for a release that mixes formats), the patient and study columns, the label columns and metadata
columns to carry over. An absolute path or ``s3://`` URI is used as it is; a relative path starts at
``ingest.images`` (default: the table's folder). Labels are either several 0/1 columns (``multi-label``) or one column of
class names or grades (``multi-class`` / ``ordinal``, written as one-hot columns in ``classes``
order, as medray.training.losses expects).

Grouping rules, for public datasets whose "patient" is not a column:

- ``ham10000``: HAM10000 has several images of one lesion and no patient ID; ``lesion_id`` is the
  group, so that images of one lesion never straddle splits.
- ``eyes``: EyePACS / APTOS-style image IDs ``10_left`` / ``10_right``: both eyes of a patient form
  one group (the patient is the ID without its ``_left`` / ``_right`` suffix).
"""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd

from medray.data.datasets.encoding import read_csv
from medray.data.datasets.ingest import (
    FileIndex,
    IngestResult,
    Options,
    Rejects,
    finish,
    parse_binary,
)
from medray.io import storage

GROUPINGS = ("none", "ham10000", "eyes")
EYE = re.compile(r"^(.*?)[_-](left|right)$", re.IGNORECASE)


def read_table(uri: str, encoding: str | None = None) -> pd.DataFrame:
    if uri.lower().endswith((".parquet", ".pq")):
        return pd.read_parquet(io.BytesIO(storage.read_bytes(uri))).astype(object)
    return read_csv(uri, encoding, dtype=str, keep_default_na=False, skipinitialspace=True)


def eye_patient(image_id: str) -> str:
    """``10_left`` → ``10``; an ID without a side is its own patient."""
    match = EYE.match(str(image_id).strip())
    return match.group(1) if match else str(image_id).strip()


def _patients(table: pd.DataFrame, columns, grouping: str, uri: str) -> pd.Series:
    if grouping == "ham10000":
        if "lesion_id" not in table:
            raise ValueError(f"{uri}: grouping ham10000 needs a 'lesion_id' column")
        return table["lesion_id"].astype(str)
    if grouping == "eyes":
        return table[columns.image].map(eye_patient)
    if columns.patient is None:
        raise ValueError(f"{uri}: set ingest.columns.patient (or a grouping rule); every image needs a patient")
    return table[columns.patient].astype(str).where(table[columns.patient].notna(), "")


def _find(index: FileIndex, patterns: list[str], value: str) -> tuple[str, bool]:
    """The first of ``patterns`` (``images/{}.jpg``, ``images/{}.png``) whose file exists; else the first's URI."""
    tried = [index.resolve(pattern.format(value)) for pattern in patterns]
    return next((found for found in tried if found[1]), tried[0])


def _label_cells(table: pd.DataFrame, columns, task: str) -> tuple[list[str], list[dict | str]]:
    """Label names and, per row, the targets or the reason the row is refused."""
    if task == "multi-label":
        names = list(columns.labels)
        out = []
        for values in table[names].itertuples(index=False):
            parsed = {name: parse_binary(v) for name, v in zip(names, values)}
            bad = sorted(name for name, v in parsed.items() if v is None)
            out.append(f"unknown label value in column(s) {bad} (expected 0, 1 or blank)" if bad else parsed)
        return names, out
    if not columns.label:
        raise ValueError(f"a {task} table needs ingest.columns.label (one column of classes or grades)")
    values = table[columns.label].astype(str).str.strip()
    classes = [str(c) for c in (columns.classes or sorted(values[values != ""].unique()))]
    out = []
    for value in values:
        if value in classes:
            out.append({c: float(c == value) for c in classes})
        elif value == "":
            out.append({c: np.nan for c in classes})
        else:
            out.append(f"unknown label value in column {columns.label!r} (expected one of {classes})")
    return classes, out


def ingest_table(
    table_uri: str,
    out: str,
    columns,
    task: str = "multi-label",
    grouping: str = "none",
    images_root: str | None = None,
    options: Options | None = None,
) -> IngestResult:
    """``columns``: an ``ingest.columns`` config section; ``images_root``: where relative image paths
    start (default: the table's folder)."""
    options = options or Options()
    if grouping not in GROUPINGS:
        raise ValueError(f"unknown grouping {grouping!r}; known: {', '.join(GROUPINGS)}")
    table = read_table(table_uri, options.encoding)
    needed = [columns.image, *([columns.patient] if columns.patient and grouping == "none" else []),
              *(columns.labels if task == "multi-label" else [columns.label] if columns.label else []),
              *([columns.study] if columns.study else []), *columns.metadata]  # fmt: skip
    missing = [c for c in needed if c not in table]
    if missing:
        raise ValueError(f"{table_uri}: missing column(s) {missing}; found {list(table.columns)}")
    index = FileIndex(images_root or storage.parent(table_uri))
    patterns = [columns.image_pattern] if isinstance(columns.image_pattern, str) else list(columns.image_pattern)
    patients = _patients(table, columns, grouping, table_uri)
    names, cells = _label_cells(table, columns, task)

    rows, rejects = [], Rejects()
    for i, entry in enumerate(table.itertuples(index=False)):
        record = dict(zip(table.columns, entry))
        image, found = _find(index, patterns, str(record[columns.image]).strip())
        if not found:
            rejects.add(image, index.reason(image))
        elif isinstance(cells[i], str):
            rejects.add(image, cells[i])
        else:
            row = {"image": image, "patient_id": patients.iloc[i], **cells[i]}
            if columns.study:
                row["study_id"] = str(record[columns.study])
            if grouping == "ham10000":
                row["lesion_id"] = str(record["lesion_id"])
            row.update({target: record[source] for source, target in columns.metadata.items()})
            rows.append(row)
    return finish(pd.DataFrame(rows), rejects, names, task, out, len(table), options, table_uri)
