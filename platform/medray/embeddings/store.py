"""The embedding store: one row per image (or WSI patch) and its frozen-backbone feature vector.

A store is a folder of Parquet parts (``part-00000.parquet``…, committed exactly once as scoring's
outputs are) that pandas, pyarrow and Ray Data read as one dataset. Each row keeps what the
canonical manifest said about its input (DESIGN.md §2) next to its vector:

| column | type | meaning |
|---|---|---|
| ``image`` | string | the image's URI; for a WSI patch, its slide's URI |
| ``patient_id``, ``split`` | string | as in the manifest (``split`` "" when unsplit) |
| ``slide_id`` | string | WSI patches only: the slide the patch belongs to |
| ``x``, ``y``, ``level``, ``size`` | int64 | WSI patches only: the patch's place in level-0 pixels |
| ``tumour_fraction`` | float32 | WSI patches only: share of the patch an annotation marks (NaN without one) |
| one column per label | float32 | 1, 0 or NaN, in the order of the schema's ``medray.labels`` |
| ``embedding`` | fixed_size_list<float16>[dim] | the vector; null when the input could not be embedded |
| ``error`` | string | "" when embedded, else why not (one row per input, errors included) |

The schema metadata carries the labels and task (as a manifest's does) and ``medray.embedding``:
``{"backbone", "dim", "weights_sha256", "image_size", "kind": "images" | "patches"}``, so a head
trained on a store knows which backbone must embed the images it will later score.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from medray.data.manifest import LABELS_KEY, TASK_KEY
from medray.errors import MedrayError
from medray.io import storage

EMBEDDING_KEY = b"medray.embedding"
VECTOR, ERROR = "embedding", "error"
PATCH_COLUMNS = ("slide_id", "x", "y", "level", "size", "tumour_fraction")


class StoreError(MedrayError, ValueError):
    """A folder that is not a complete embedding store, or one made for another purpose: one line."""


@dataclass(frozen=True)
class StoreInfo:
    backbone: str
    dim: int
    weights_sha256: str
    image_size: int
    kind: str = "images"  # or "patches"


@dataclass
class Embeddings:
    """A store read whole: the rows that were embedded, their vectors (float32, one row each) and the rest."""

    frame: pd.DataFrame  # every column but the vector, rows in store order, errors excluded
    vectors: np.ndarray  # (len(frame), dim) float32
    labels: list[str]
    task: str
    info: StoreInfo
    errors: pd.DataFrame  # the rows that could not be embedded, with their ``error``

    def split(self, name: str) -> tuple[pd.DataFrame, np.ndarray]:
        keep = (self.frame["split"] == name).to_numpy()
        return self.frame[keep].reset_index(drop=True), self.vectors[keep]


def to_table(frame: pd.DataFrame, vectors: np.ndarray | None, labels: list[str], task: str, info: StoreInfo) -> pa.Table:
    """One part: ``frame`` (manifest columns and ``error``) with ``vectors`` (one per row; rows whose
    ``error`` is set get a null vector, whatever ``vectors`` holds there)."""
    n = len(frame)
    flat = np.zeros((n, info.dim), np.float16) if vectors is None else np.asarray(vectors, dtype=np.float16).reshape(n, info.dim)
    failed = (frame[ERROR] != "").to_numpy() if ERROR in frame else np.zeros(n, bool)
    column = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.float16()), info.dim, mask=pa.array(failed))
    table = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
    if ERROR not in table.column_names:
        table = table.append_column(ERROR, pa.array([""] * n, pa.string()))
    table = table.append_column(VECTOR, column)
    return table.replace_schema_metadata(
        {LABELS_KEY: json.dumps(labels).encode(), TASK_KEY: task.encode(), EMBEDDING_KEY: json.dumps(asdict(info)).encode()}
    )


def part_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def read_info(uri: str) -> tuple[list[str], str, StoreInfo]:
    """Labels, task and backbone of the store at ``uri``, from its first part's schema."""
    parts = part_uris(uri)
    fs, path = storage.filesystem(parts[0])
    meta = pq.read_schema(fs.open_input_file(path)).metadata or {}
    if EMBEDDING_KEY not in meta:
        raise StoreError(f"{parts[0]}: not an embedding store part (no {EMBEDDING_KEY.decode()} in its schema); run `medray embed`")
    return json.loads(meta[LABELS_KEY]), meta.get(TASK_KEY, b"multi-label").decode(), StoreInfo(**json.loads(meta[EMBEDDING_KEY]))


def part_uris(uri: str) -> list[str]:
    try:
        files = storage.list_files(uri)
    except FileNotFoundError:
        files = []
    parts = sorted(u for u in files if storage.basename(u).startswith("part-") and u.endswith(".parquet"))
    if not parts:
        raise StoreError(f"{uri}: no embedding store here (no part-*.parquet); run `medray embed` first")
    return parts


def read_store(uri: str) -> Embeddings:
    """The whole store in memory (a head's training set: ~1 KB per row at dim 512)."""
    labels, task, info = read_info(uri)
    tables = []
    for part in part_uris(uri):
        fs, path = storage.filesystem(part)
        tables.append(pq.read_table(fs.open_input_file(path)))
    table = pa.concat_tables(tables, promote_options="default")
    failed = np.asarray(table.column(ERROR).to_pylist(), dtype=object) != ""
    frame = table.drop_columns([VECTOR]).to_pandas()
    # ``.values``, not ``.flatten()``: a null vector still holds its ``dim`` slots, so rows stay aligned.
    vectors = np.asarray(table.column(VECTOR).combine_chunks().values.to_numpy(zero_copy_only=False), dtype=np.float32)
    vectors = vectors.reshape(len(frame), info.dim)[~failed]
    return Embeddings(frame[~failed].reset_index(drop=True), vectors, labels, task, info, frame[failed].reset_index(drop=True))
