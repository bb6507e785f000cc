"""Batch scoring of an archive: every input → exactly one Parquet row, resumable after a crash.

Inputs are a folder, an ``s3://`` prefix (recursive, filtered by extension) or a manifest
(``.parquet`` / ``.csv`` with an ``image`` column). The listing streams: one Ray Data read task
walks it page by page and emits rows as it goes, so a prefix with millions of keys starts scoring
at once and is never held in memory whole. An actor pool (model loaded once per actor; GPU + bf16
when the cluster has GPUs) turns rows into probabilities, and the driver writes them as they come.

Exactly once. The listing is cut, in its stable order, into numbered parts of ``part_size``
inputs. Part *i* is written whole to ``part-0000i.parquet`` (atomically: a temporary file renamed
into place, or one S3 PUT), then committed by ``_committed/part-0000i.json``, which records the
sha256 of its inputs and of the model. A rerun skips committed parts and rewrites any part that was
written but not committed — under the same name, so it replaces rather than duplicates. A rerun
whose listing or model differs from what a committed part records is refused. At the end every
part must be committed and their inputs must add up to the listing: ``_summary.json`` states
inputs, scored and errors. Unreadable files are rows with an ``error``, never gaps.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from medray.config import JobConfig
from medray.errors import MedrayError
from medray.evaluation.calibration import CALIBRATION_FILE
from medray.evaluation.predict import predict
from medray.io import storage
from medray.io.dicomweb import DicomWebError
from medray.io.listing import Entry, walk
from medray.scoring import statistics
from medray.scoring.thresholds import frozen_thresholds
from medray.training import checkpoint

log = logging.getLogger(__name__)
COMMITTED, LISTING, SUMMARY, GRADCAM = "_committed", "_listing.json", "_summary.json", "_gradcam"
MANIFEST_SUFFIXES = (".parquet", ".csv")


class ScoreError(MedrayError, RuntimeError):
    """An output that cannot be completed as asked (another model's scores, a changed listing): one line."""


@dataclass
class ScoreSummary:
    output: str
    inputs: int
    scored: int
    errors: int
    parts: int = 0
    parts_skipped: int = 0
    model_sha256: str = ""
    calibrated: bool = False
    gradcam: int = 0  # overlays written (score.gradcam_threshold)
    dicom_sr: int = 0  # structured reports written or stored (score.dicom_sr)
    dicom_sr_counts: dict | None = None  # what got none, and why (scoring.structured_report.ReportCounts)
    seconds: float = 0.0
    statistics: dict = field(default_factory=dict)  # inputs and scores, for `medray drift` (medray.scoring.statistics)


def iter_inputs(source: str, extensions: tuple[str, ...]) -> Iterator[Entry]:
    """Inputs to score, streamed: a manifest's ``image`` column in its order, or the folder's listing
    (medray.io.listing), whose entries that are not regular files come with the reason they are not read."""
    if not source.lower().endswith(MANIFEST_SUFFIXES):
        yield from walk(source, extensions)
        return
    fs, path = storage.filesystem(source)
    if source.lower().endswith(".parquet"):
        batches = pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=10_000, columns=["image"])
    else:
        batches = _csv_batches(source, fs.open_input_stream(path))
    folder = storage.parent(source)
    for batch in batches:
        yield from (Entry(manifest_uri(folder, uri)) for uri in batch.column("image").to_pylist())


def manifest_uri(folder: str, uri) -> str:
    """A manifest's relative path starts at the manifest's folder (local or S3), wherever the worker runs."""
    uri = str(uri).strip()
    if storage.is_remote(uri) or os.path.isabs(uri) or not uri:
        return uri
    if storage.is_s3(folder):
        return storage.S3 + posixpath.normpath(posixpath.join(folder[len(storage.S3) :], uri))
    return os.path.normpath(os.path.join(folder, uri))


def _csv_batches(source: str, stream):
    """A CSV manifest's ``image`` column; a row with more or fewer fields than the header is an error
    naming the file and row, as its ``image`` cell could be any of its fields."""
    import pyarrow.csv as pacsv

    ragged = []

    def refuse(row) -> str:
        ragged.append(row)
        return "error"

    parse = pacsv.ParseOptions(invalid_row_handler=refuse, newlines_in_values=True)
    try:  # one thread, so that pyarrow knows each bad row's number
        yield from pacsv.open_csv(stream, parse_options=parse, read_options=pacsv.ReadOptions(use_threads=False),
                                  convert_options=pacsv.ConvertOptions(include_columns=["image"]))  # fmt: skip
    except pa.ArrowInvalid as err:
        if not ragged:
            raise ScoreError(f"{source}: not a readable CSV manifest ({str(err).splitlines()[0]})") from None
        row = ragged[0]
        raise ScoreError(f"{source}: row {row.number} has {row.actual_columns} fields where the header has "
                         f"{row.expected_columns}: fix or remove it") from None  # fmt: skip


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def _digest(uris: list[str]) -> str:
    return hashlib.sha256("\n".join(uris).encode()).hexdigest()


class _ListingDatasource(Datasource):
    """One read task that lists the input and yields blocks of rows tagged with their part as it goes."""

    def __init__(self, source, extensions, part_size, block_rows, committed: dict[int, str], output: str):
        self.args = (source, tuple(extensions), part_size, block_rows, committed, output)

    def estimate_inmemory_data_size(self):
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(lambda args=self.args: _list_parts(*args), metadata)]


def _list_parts(source, extensions, part_size, block_rows, committed, output):
    inputs, parts = 0, 0
    entries = iter_inputs(source, extensions)
    while chunk := list(islice(entries, part_size)):
        index, parts, inputs = parts, parts + 1, inputs + len(chunk)
        if index in committed:
            if committed[index] != _digest([e.uri for e in chunk]):
                raise ScoreError(
                    f"{output}: {part_name(index)} was scored from a different listing of {source}; "
                    "the input changed since — score it into a new output"
                )
            continue
        for start in range(0, len(chunk), block_rows):
            rows = chunk[start : start + block_rows]
            yield pa.table({"image": [e.uri for e in rows], "_skipped": [e.skipped for e in rows], "_part": [index] * len(rows),
                            "_part_inputs": [len(chunk)] * len(rows), "_position": range(start, start + len(rows))})  # fmt: skip
    storage.write_atomic(storage.join(output, LISTING), json.dumps({"inputs": inputs, "parts": parts}).encode())


def _read_committed(output: str) -> dict[int, dict]:
    folder = storage.join(output, COMMITTED)
    if not storage.exists(folder):
        return {}
    uris = storage.list_files(folder, (".json",))
    with ThreadPoolExecutor(16) as pool:  # one small GET per part: in parallel on S3
        markers = list(pool.map(lambda uri: json.loads(storage.read_text(uri)), uris))
    return {marker["part"]: marker for marker in markers}


class _PartWriter:
    """Collects scored rows by part; writes and commits each part as soon as all its rows are in."""

    def __init__(self, output: str, model_sha256: str):
        self.output, self.model_sha256 = output, model_sha256
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
        frame = _with_errors(frame).drop(columns=["_part", "_part_inputs", "_position"]).reset_index(drop=True)
        uris = frame["image"].astype(str).tolist()
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        storage.write_atomic(storage.join(self.output, part_name(index) + ".parquet"), buffer.getvalue())
        errors = int((frame["error"] != "").sum())
        marker = {"part": index, "inputs": len(frame), "errors": errors, "model_sha256": self.model_sha256,
                  "inputs_sha256": _digest(uris)}  # fmt: skip
        storage.write_atomic(storage.join(self.output, COMMITTED, part_name(index) + ".json"), json.dumps(marker).encode())
        self.rows, self.errors, self.parts = self.rows + len(frame), self.errors + errors, self.parts + 1
        now = time.monotonic()
        if now - self.reported > 10:
            self.reported = now
            rate = self.rows / (now - self.started)
            log.info("scored %d parts this run: %d inputs (%d errors), %.1f images/s", self.parts, self.rows, self.errors, rate)


def _with_errors(frame: pd.DataFrame) -> pd.DataFrame:
    """The listing's reason for an entry it did not read replaces the reader's, and a failed row's
    probabilities are null, so ``dropna()`` on the output drops exactly the failed rows. (Ray hands
    back Arrow-backed columns, in which NaN is a value, not a missing one: written as they are, they
    read back as ``float[pyarrow]`` NaNs that ``isna()`` does not see.)"""
    frame = frame.reset_index(drop=True)
    if "_skipped" in frame:
        skipped = frame.pop("_skipped").fillna("").astype(str)
        listed = skipped != ""
        frame.loc[listed, "error"] = frame["image"].astype(str)[listed] + ": " + skipped[listed]
    failed = (frame["error"] != "").to_numpy()
    for column in (c for c in frame.columns if c.startswith("prob_")):
        frame[column] = frame[column].astype("float32").mask(failed)
    return frame


def score(config: JobConfig) -> ScoreSummary:
    s = config.score
    if not s.input:
        raise ValueError("score.input is required: a folder, an s3:// prefix or a manifest of images")
    started = time.monotonic()
    checkpoint_uri = checkpoint.resolve(s.checkpoint, config.run_dir)
    model_sha256 = checkpoint.identity(checkpoint_uri)
    calibrated = storage.exists(storage.join(checkpoint_uri, CALIBRATION_FILE))  # the actors load and check it
    # By default one folder per model, so that scoring again after retraining starts afresh while a
    # rerun with the same model resumes.
    output = s.output or storage.join(config.run_dir, "scores", model_sha256[:12])

    stale = storage.remove_temporaries(output) + storage.remove_temporaries(storage.join(output, COMMITTED))
    if stale:
        log.info("removed %d temporary files left by an earlier run that was killed", stale)
    committed = _read_committed(output)
    for marker in committed.values():
        if marker["model_sha256"] != model_sha256:
            raise ScoreError(f"{output} holds scores of another model ({marker['model_sha256'][:12]}…); use a new output")
    if committed:
        log.info("resuming: %d parts of %s already committed", len(committed), output)

    source = _ListingDatasource(s.input, s.extensions, s.part_size, min(s.batch_size, s.part_size),
                                {i: m["inputs_sha256"] for i, m in committed.items()}, output)  # fmt: skip
    # Listing waits on S3, not on a CPU; asking for none keeps it from starving when the actors take all CPUs.
    rows = ray.data.read_datasource(source, override_num_blocks=1, num_cpus=0)
    scored = predict(rows, checkpoint_uri, s.batch_size, s.actors, calibrated=True, cpus=s.cpus_per_actor, facts=True)
    writer = _PartWriter(output, model_sha256)
    try:
        for batch in scored.iter_batches(batch_size=None, batch_format="pandas"):
            writer.add(batch.assign(calibrated=calibrated))
    except (ScoreError, DicomWebError) as err:  # from the listing task: Ray adds the task's traceback; our message is its first line
        cause = getattr(err, "cause", None) or err
        raise type(cause)(str(cause).splitlines()[0]) from None
    if writer.pending:
        raise ScoreError(f"{output}: parts {sorted(writer.pending)} came back incomplete")

    summary = _verify(output, ScoreSummary(output, 0, 0, 0, 0, len(committed), model_sha256, calibrated))
    if s.gradcam_threshold is not None:
        summary.gradcam = len(_gradcam(output, checkpoint_uri, s.gradcam_threshold, s.gradcam_max))
    summary.statistics = _statistics(config, output, checkpoint_uri, model_sha256, calibrated)
    if s.dicom_sr:
        from medray.scoring.structured_report import report_scores

        summary.dicom_sr, summary.dicom_sr_counts = report_scores(config, output, checkpoint_uri, model_sha256, calibrated)
    summary.seconds = round(time.monotonic() - started, 2)
    storage.write_atomic(storage.join(output, SUMMARY), json.dumps(asdict(summary), indent=2).encode())
    log.info("scoring summary: %d inputs, %d scored, %d errors, %d parts (%d from earlier runs) → %s",
             summary.inputs, summary.scored, summary.errors, summary.parts, summary.parts_skipped, output)  # fmt: skip
    return summary


def _statistics(config: JobConfig, output: str, checkpoint_uri: str, model_sha256: str, calibrated: bool) -> dict:
    """What ``medray drift`` compares, with each label's share at or above the model's operating threshold (the
    one its SRs use) unless ``drift.thresholds`` names another."""
    meta = checkpoint.read_meta(checkpoint_uri)
    labels, task = list(meta["labels"]), meta.get("task", "multi-label")
    frozen, rule = frozen_thresholds(config.run_dir, checkpoint_uri, model_sha256, labels, task, calibrated)
    rule = "drift.thresholds" if set(config.drift.thresholds) >= set(labels) else rule
    return {**statistics.summarise(output, {**frozen, **config.drift.thresholds}, config.drift.threshold), "threshold_rule": rule}


def _gradcam(output: str, checkpoint_uri: str, threshold: float, most: int) -> list[str]:
    """Grad-CAM overlays for the inputs a reader will look at first: those scored at or above ``threshold``."""
    from medray.evaluation.explain import write_overlays

    fs, path = storage.filesystem(output)
    scores = pq.read_table(path, filesystem=fs).to_pandas()
    scores = scores[scores["error"] == ""]
    written = []
    for column in (c for c in scores.columns if c.startswith("prob_")):
        flagged = scores[scores[column] >= threshold].nlargest(most, column)
        if len(flagged):
            label = column.removeprefix("prob_")
            written += write_overlays(checkpoint_uri, flagged["image"].tolist(), storage.join(output, GRADCAM), [label])
    log.info("Grad-CAM: %d overlays for inputs scored at or above %.2f → %s", len(written), threshold, storage.join(output, GRADCAM))
    return written


def _verify(output: str, summary: ScoreSummary) -> ScoreSummary:
    """Every listed part committed, and their inputs add up to the listing: nothing missing, nothing twice."""
    listing = json.loads(storage.read_text(storage.join(output, LISTING)))
    if listing["inputs"] == 0:
        raise ScoreError(f"{output}: the input held no files to score")
    markers = _read_committed(output)
    missing = sorted(set(range(listing["parts"])) - set(markers))
    extra = sorted(set(markers) - set(range(listing["parts"])))
    if missing or extra:
        raise ScoreError(f"{output}: parts missing {missing[:5]} or not in the listing {extra[:5]}")
    summary.inputs = sum(m["inputs"] for m in markers.values())
    if summary.inputs != listing["inputs"]:
        raise ScoreError(f"{output}: parts hold {summary.inputs} rows for {listing['inputs']} inputs")
    summary.errors = sum(m["errors"] for m in markers.values())
    summary.scored, summary.parts = summary.inputs - summary.errors, listing["parts"]
    return summary
