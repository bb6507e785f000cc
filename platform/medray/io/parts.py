"""Outputs written exactly once, in numbered parts: the machinery `medray score` and `medray embed` share.

A job streams its inputs (one Ray Data read task walks the listing and emits rows as it goes) and cuts
them, in their stable order, into numbered parts of ``part_size`` inputs. Part *i* is written whole to
``part-0000i.parquet`` (atomically: a temporary file renamed into place, or one S3 PUT), then committed
by ``_committed/part-0000i.json``, which records the sha256 of its inputs and of the model. A rerun
skips committed parts and rewrites any part that was written but not committed — under the same name,
so it replaces rather than duplicates. A rerun whose listing or model differs from what a committed
part records is refused. At the end every part must be committed and their inputs must add up to the
listing (``verify``); the job then states its counts in ``_summary.json``.

What a job brings: its listing, as a function yielding Arrow tables whose ``key`` column names each
input (a URI), and how a finished part becomes its final rows and Parquet bytes (``PartWriter.encode``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from medray.errors import MedrayError
from medray.io import storage

log = logging.getLogger(__name__)
COMMITTED, LISTING, SUMMARY = "_committed", "_listing.json", "_summary.json"
BOOKKEEPING = ("_part", "_part_inputs", "_position")  # the columns the listing adds to every row


class PartsError(MedrayError, RuntimeError):
    """An output that cannot be completed as asked (another model's rows, a changed listing): one line."""


@dataclass(frozen=True)
class Output:
    """Where a job writes its parts, the model it writes them with, and the words its messages use."""

    uri: str
    model_sha256: str
    verb: str = "score"  # "… score it into a new output"
    done: str = "scored"  # "part-00003 was scored from a different listing"
    holds: str = "scores"  # "… holds scores of another model"
    error: type[PartsError] = PartsError


@dataclass(frozen=True)
class Counts:
    inputs: int
    errors: int
    parts: int


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def digest(keys: list[str]) -> str:
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def read_committed(uri: str) -> dict[int, dict]:
    folder = storage.join(uri, COMMITTED)
    if not storage.exists(folder):
        return {}
    uris = storage.list_files(folder, (".json",))
    with ThreadPoolExecutor(16) as pool:  # one small GET per part: in parallel on S3
        markers = list(pool.map(lambda marker: json.loads(storage.read_text(marker)), uris))
    return {marker["part"]: marker for marker in markers}


def resume(out: Output) -> dict[int, dict]:
    """The parts an earlier run committed (part → marker), after clearing what a killed writer left;
    refused when they were written with another model."""
    stale = storage.remove_temporaries(out.uri) + storage.remove_temporaries(storage.join(out.uri, COMMITTED))
    if stale:
        log.info("removed %d temporary files left by an earlier run that was killed", stale)
    committed = read_committed(out.uri)
    for marker in committed.values():
        if marker["model_sha256"] != out.model_sha256:
            raise out.error(f"{out.uri} holds {out.holds} of another model ({marker['model_sha256'][:12]}…); use a new output")
    if committed:
        log.info("resuming: %d parts of %s already committed", len(committed), out.uri)
    return committed


def read_listing(
    out: Output, source: str, tables: Callable[[], Iterator[pa.Table]], part_size: int, block_rows: int,
    committed: dict[int, dict], key: str = "image",
) -> ray.data.Dataset:  # fmt: skip
    """The inputs ``tables()`` yields (``source`` names them in messages), cut into parts, each row tagged
    with its part, the part's size and its position in it; the rows of committed parts are left out."""
    digests = {index: marker["inputs_sha256"] for index, marker in committed.items()}
    datasource = _ListingDatasource((out, source, tables, part_size, block_rows, digests, key))
    # Listing waits on storage, not on a CPU; asking for none keeps it from starving when the actors take all CPUs.
    return ray.data.read_datasource(datasource, override_num_blocks=1, num_cpus=0)


class _ListingDatasource(Datasource):
    """One read task that lists the input and yields blocks of rows tagged with their part as it goes."""

    def __init__(self, args: tuple):
        self.args = args

    def estimate_inmemory_data_size(self):
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(lambda args=self.args: _list_parts(*args), metadata)]


def _chunks(tables: Iterator[pa.Table], size: int) -> Iterator[pa.Table]:
    """The rows of ``tables`` again, as tables of ``size`` rows (the last one shorter)."""
    pending, rows = [], 0
    for table in tables:
        pending.append(table)
        rows += table.num_rows
        while rows >= size:
            whole = pa.concat_tables(pending)
            yield whole.slice(0, size)
            pending, rows = [whole.slice(size)], rows - size
    if rows:
        yield pa.concat_tables(pending)


def _list_parts(out: Output, source: str, tables, part_size: int, block_rows: int, committed: dict[int, str], key: str):
    inputs = parts = 0
    for chunk in _chunks(tables(), part_size):
        index, parts, inputs, n = parts, parts + 1, inputs + chunk.num_rows, chunk.num_rows
        if index in committed:
            if committed[index] != digest([str(k) for k in chunk.column(key).to_pylist()]):
                raise out.error(
                    f"{out.uri}: {part_name(index)} was {out.done} from a different listing of {source}; "
                    f"the input changed since — {out.verb} it into a new output"
                )
            continue
        for start in range(0, n, block_rows):
            rows = chunk.slice(start, block_rows)
            tags = {"_part": [index] * rows.num_rows, "_part_inputs": [n] * rows.num_rows, "_position": range(start, start + rows.num_rows)}
            for name, values in tags.items():
                rows = rows.append_column(name, pa.array(values, pa.int64()))
            yield rows
    storage.write_atomic(storage.join(out.uri, LISTING), json.dumps({"inputs": inputs, "parts": parts}).encode())


def _as_parquet(frame: pd.DataFrame) -> tuple[pd.DataFrame, bytes]:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return frame, buffer.getvalue()


class PartWriter:
    """Collects finished rows by part; writes and commits each part as soon as all its rows are in.

    ``encode(rows)`` turns a part's rows (in listing order, bookkeeping columns removed) into its final
    rows, whose ``error`` column counts its errors, and the bytes of its Parquet file."""

    def __init__(self, out: Output, encode: Callable[[pd.DataFrame], tuple[pd.DataFrame, bytes]] = _as_parquet, key: str = "image"):
        self.out, self.encode, self.key = out, encode, key
        self.pending: dict[int, list[pd.DataFrame]] = {}
        self.done: set[int] = set()
        self.rows = self.errors = self.parts = 0
        self.started = self.reported = time.monotonic()

    def add(self, batch: pd.DataFrame) -> None:
        for index, rows in batch.groupby("_part", sort=False):
            index = int(index)
            if index in self.done:
                continue  # a retried task's repeat of rows already written
            frames = self.pending.setdefault(index, [])
            frames.append(rows)
            # Count distinct positions, not rows: a retried read or actor task may deliver rows twice.
            if pd.concat([f["_position"] for f in frames]).nunique() == int(rows["_part_inputs"].iloc[0]):
                self._commit(index, pd.concat(self.pending.pop(index), ignore_index=True))
                self.done.add(index)

    def _commit(self, index: int, frame: pd.DataFrame) -> None:
        # Back in the listing's order (actors finish out of order), so the digest matches the listing's.
        frame = frame.drop_duplicates("_position").sort_values("_position")
        keys = frame[self.key].astype(str).tolist()
        frame, data = self.encode(frame.drop(columns=list(BOOKKEEPING)).reset_index(drop=True))
        storage.write_atomic(storage.join(self.out.uri, part_name(index) + ".parquet"), data)
        errors = int((frame["error"] != "").sum())
        marker = {"part": index, "inputs": len(frame), "errors": errors, "model_sha256": self.out.model_sha256,
                  "inputs_sha256": digest(keys)}  # fmt: skip
        storage.write_atomic(storage.join(self.out.uri, COMMITTED, part_name(index) + ".json"), json.dumps(marker).encode())
        self.rows, self.errors, self.parts = self.rows + len(frame), self.errors + errors, self.parts + 1
        now = time.monotonic()
        if now - self.reported > 10:
            self.reported = now
            rate = self.rows / (now - self.started)
            log.info("%s %d parts this run: %d inputs (%d errors), %.1f inputs/s", self.out.done, self.parts, self.rows, self.errors, rate)

    def check_complete(self) -> None:
        if self.pending:
            raise self.out.error(f"{self.out.uri}: parts {sorted(self.pending)} came back incomplete")


def verify(out: Output) -> Counts:
    """Every listed part committed, and their inputs add up to the listing: nothing missing, nothing twice."""
    listing = json.loads(storage.read_text(storage.join(out.uri, LISTING)))
    if listing["inputs"] == 0:
        raise out.error(f"{out.uri}: the input held no files to {out.verb}")
    markers = read_committed(out.uri)
    missing = sorted(set(range(listing["parts"])) - set(markers))
    extra = sorted(set(markers) - set(range(listing["parts"])))
    if missing or extra:
        raise out.error(f"{out.uri}: parts missing {missing[:5]} or not in the listing {extra[:5]}")
    inputs = sum(m["inputs"] for m in markers.values())
    if inputs != listing["inputs"]:
        raise out.error(f"{out.uri}: parts hold {inputs} rows for {listing['inputs']} inputs")
    return Counts(inputs, sum(m["errors"] for m in markers.values()), listing["parts"])
