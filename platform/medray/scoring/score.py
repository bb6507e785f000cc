"""Batch scoring of an archive: every input → exactly one Parquet row, resumable after a crash.

Inputs are a folder, an ``s3://`` prefix (recursive, filtered by extension) or a manifest
(``.parquet`` / ``.csv`` with an ``image`` column). The listing streams: one Ray Data read task
walks it page by page and emits rows as it goes, so a prefix with millions of keys starts scoring
at once and is never held in memory whole. An actor pool (model loaded once per actor; GPU + bf16
when the cluster has GPUs) turns rows into probabilities, and the driver writes them as they come.

Exactly once, by medray.io.parts (shared with ``medray embed``): the listing is cut, in its stable
order, into numbered parts of ``part_size`` inputs, each written atomically and then committed with
the sha256 of its inputs and of the model. A rerun skips committed parts and refuses a changed
listing or model; ``_summary.json`` states inputs, scored and errors. Unreadable files are rows with
an ``error``, never gaps.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import islice

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from medray.config import JobConfig
from medray.evaluation.calibration import CALIBRATION_FILE
from medray.evaluation.predict import predict
from medray.io import parts, storage
from medray.io.dicomweb import DicomWebError
from medray.io.listing import Entry, manifest_uri, walk
from medray.scoring import statistics
from medray.scoring.thresholds import frozen_thresholds
from medray.training import checkpoint

log = logging.getLogger(__name__)
COMMITTED, LISTING, SUMMARY = parts.COMMITTED, parts.LISTING, parts.SUMMARY  # where every scoring output keeps them
GRADCAM = "_gradcam"
MANIFEST_SUFFIXES = (".parquet", ".csv")


class ScoreError(parts.PartsError):
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


def _listing(source: str, extensions: tuple[str, ...], rows: int = 1000) -> Iterator[pa.Table]:
    """The inputs as tables for medray.io.parts: ``image``, and ``_skipped`` (why the listing did not read it)."""
    entries = iter_inputs(source, extensions)
    while chunk := list(islice(entries, rows)):
        yield pa.table({"image": [e.uri for e in chunk], "_skipped": [e.skipped for e in chunk]})


def _scores_part(frame: pd.DataFrame) -> tuple[pd.DataFrame, bytes]:
    frame = _with_errors(frame)
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return frame, buffer.getvalue()


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


def score(config: JobConfig, predictor: Callable = predict) -> ScoreSummary:
    """Score ``score.input`` with ``score.checkpoint`` (default the run's best) into ``score.output``; resumable.
    ``predictor``: how rows become probabilities, ``predict``'s signature (a head on embeddings brings its own:
    ``medray.jobs.score`` chooses)."""
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

    out = parts.Output(output, model_sha256, error=ScoreError)
    committed = parts.resume(out)
    listing = partial(_listing, s.input, tuple(s.extensions))
    rows = parts.read_listing(out, s.input, listing, s.part_size, min(s.batch_size, s.part_size), committed)
    scored = predictor(rows, checkpoint_uri, s.batch_size, s.actors, calibrated=True, cpus=s.cpus_per_actor, facts=True)
    writer = parts.PartWriter(out, _scores_part)
    try:
        for batch in scored.iter_batches(batch_size=None, batch_format="pandas"):
            writer.add(batch.assign(calibrated=calibrated))
    except (ScoreError, DicomWebError) as err:  # from the listing task: Ray adds the task's traceback; our message is its first line
        cause = getattr(err, "cause", None) or err
        raise type(cause)(str(cause).splitlines()[0]) from None
    writer.check_complete()

    counts = parts.verify(out)
    summary = ScoreSummary(output, counts.inputs, counts.inputs - counts.errors, counts.errors, counts.parts, len(committed),
                           model_sha256, calibrated)  # fmt: skip
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
