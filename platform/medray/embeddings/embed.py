"""``medray embed``: a manifest's images or a patch store's WSI patches → the embedding store, on Ray Data.

The input is ``embed.input``, else ``wsi.patches`` when set, else the run's manifest. One Ray Data read
task streams it (a manifest's rows, or each finished slide's patch shards: coordinates and labels, not
pixels); CPU tasks decode and resize the images with medray's readers (pixel limits, DICOM, grayscale
expanded to the encoder's channels; a patch's PNG is read from its shard there, so no single task
carries the store's pixels); an actor pool holds the frozen encoder (medray.embeddings.backbones),
loaded once per actor, one GPU each with bf16/fp16 autocast when the cluster has GPUs. Vectors are
stored as float16 (medray.embeddings.store), one row per input: an input that cannot be read keeps its
row with the reason in ``error`` and a null vector.

Exactly once, as scoring is (medray.io.parts): numbered parts written atomically and committed with
the sha256 of their inputs and of the encoder (backbone, weights, input size); a rerun skips committed
parts and refuses a changed input or encoder. ``_summary.json`` states the counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from medray.config import JobConfig
from medray.data.manifest import LABELS_KEY, TASK_KEY
from medray.data.patches import patch_labels, shard_uris
from medray.embeddings import store
from medray.embeddings.backbones import Encoder, load_encoder
from medray.evaluation.predict import DECODE_BATCH, decode_batch
from medray.io import images, parts, storage
from medray.io.listing import manifest_uri
from medray.training.models import to_input

log = logging.getLogger(__name__)
IMAGES, PATCHES = "images", "patches"
CARRIED = ("patient_id", "study_id", "split", "sex", "age", "view", "site")  # a manifest's columns a store keeps
STRINGS = ("image", "patient_id", "study_id", "split", "slide_id", "sex", "view", "site")
LISTING_ROWS, SHARD_WINDOW = 10_000, 64


class EmbedError(parts.PartsError):
    """An embedding job that cannot run as asked (input of another kind, another encoder's store): one line."""


@dataclass
class EmbedSummary:
    output: str
    inputs: int
    embedded: int
    errors: int
    parts: int
    parts_skipped: int
    backbone: str
    dim: int
    weights_sha256: str
    kind: str
    seconds: float = 0.0


@dataclass(frozen=True)
class Source:
    """What is embedded: its URI, kind, labels and task, and its listing as Arrow tables (``key`` names each input)."""

    uri: str
    kind: str
    labels: list[str]
    task: str
    tables: partial
    key: str


# --- the inputs --------------------------------------------------------------------------------------


def source_of(config: JobConfig) -> Source:
    uri = config.embed.input or config.wsi.patches or config.manifest
    if storage.exists(storage.join(uri, "extract.json")):
        return _patch_source(uri)
    if uri.lower().endswith(".parquet"):
        return _manifest_source(uri)
    raise EmbedError(
        f"embed.input {uri}: neither a manifest (.parquet) nor a patch store (no extract.json); run `medray ingest` or `medray extract-patches`"
    )


def _manifest_source(uri: str) -> Source:
    fs, path = storage.filesystem(uri)
    try:
        schema = pq.read_schema(fs.open_input_file(path))
    except FileNotFoundError:
        raise EmbedError(f"manifest {uri} does not exist: run `medray ingest` (and `medray split`) first, or set embed.input") from None
    meta = schema.metadata or {}
    if LABELS_KEY not in meta or "image" not in schema.names or "patient_id" not in schema.names:
        raise EmbedError(f"{uri}: not a medray manifest (image, patient_id and the labels in its schema); write it with `medray ingest`")
    labels = json.loads(meta[LABELS_KEY])
    columns = ["image", *(c for c in CARRIED if c in schema.names), *labels]
    return Source(uri, IMAGES, labels, meta.get(TASK_KEY, b"multi-label").decode(), partial(_manifest_tables, uri, columns), "image")


def _manifest_tables(uri: str, columns: list[str]) -> Iterator[pa.Table]:
    fs, path = storage.filesystem(uri)
    folder = storage.parent(uri)
    for batch in pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=LISTING_ROWS, columns=columns):
        table = pa.Table.from_batches([batch]).replace_schema_metadata(None)
        table = table.set_column(0, "image", pa.array([manifest_uri(folder, u) for u in table.column("image").to_pylist()], pa.string()))
        if "split" not in table.column_names:
            table = table.append_column("split", pa.array([""] * table.num_rows, pa.string()))
        yield table


def _patch_source(uri: str) -> Source:
    try:
        shards = sorted(shard_uris(uri))
    except FileNotFoundError:
        shards = []
    if not shards:
        raise EmbedError(f"{uri}: no finished patch shards; run `medray extract-patches` first")
    labels = patch_labels(uri)
    columns = ["image", "slide_id", "patient_id", "split", "x", "y", "level", "size", "tumour_fraction", *labels]
    return Source(uri, PATCHES, labels, "multi-label", partial(_patch_tables, shards, columns), "_key")


def _patch_tables(shards: list[str], columns: list[str]) -> Iterator[pa.Table]:
    """Each shard's patches without their pixels, plus where to find them (``_shard``, ``_row``) and a key
    naming each patch by its slide and place, read a window of shards at a time (in parallel on S3)."""

    def read(uri: str) -> pa.Table:
        fs, path = storage.filesystem(uri)
        table = pq.read_table(fs.open_input_file(path), columns=columns).replace_schema_metadata(None)
        where = zip(*(table.column(c).to_pylist() for c in ("image", "level", "x", "y", "size")))
        keys = [f"{image}@{level}/{x},{y}/{size}" for image, level, x, y, size in where]
        extra = {"_shard": pa.array([uri] * table.num_rows, pa.string()), "_row": pa.array(range(table.num_rows), pa.int64()),
                 "_key": pa.array(keys, pa.string())}  # fmt: skip
        for name, values in extra.items():
            table = table.append_column(name, values)
        return table

    with ThreadPoolExecutor(8) as pool:
        for start in range(0, len(shards), SHARD_WINDOW):
            yield from pool.map(read, shards[start : start + SHARD_WINDOW])


def read_patches(batch: dict, size: int, channels: int) -> dict:
    """Ray Data UDF (CPU tasks): each patch's PNG from its shard, decoded as ``decode_batch`` decodes images;
    a patch that cannot be read or decoded keeps its row, with its slide and place in the ``error``."""
    n = len(batch["_shard"])
    encoded, failed = np.full(n, b"", dtype=object), np.full(n, "", dtype=object)
    for shard in dict.fromkeys(batch["_shard"]):
        rows = np.flatnonzero(batch["_shard"] == shard)
        try:
            fs, path = storage.filesystem(str(shard))
            column = pq.read_table(fs.open_input_file(path), columns=["patch"]).column("patch")
            encoded[rows] = [column[int(r)].as_py() for r in batch["_row"][rows]]
        except Exception as err:  # noqa: BLE001 — a shard that cannot be read is its patches' error, not the job's
            failed[rows] = images.failure(str(shard), err)
    out = decode_batch({**batch, "patch": encoded}, size, channels, encoded="patch")
    errors = np.where(failed != "", failed, out["error"])
    where = [f"{i} patch at ({x}, {y}): " for i, x, y in zip(batch["image"], batch["x"], batch["y"])]
    out["error"] = np.array([w + e.removeprefix("encoded image: ") if e else "" for w, e in zip(where, errors)], dtype=object)
    return out


# --- the encoder on Ray Data -------------------------------------------------------------------------


class Embedder:
    """The frozen encoder, loaded once per actor (on its GPU when it has one), turning decoded pixels into vectors."""

    def __init__(self, backbone: str, weights: str | None, in_channels: int, image_size: int, model_args: dict, sha256: str):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        encoder = load_encoder(backbone, weights, in_channels, image_size, model_args)
        if encoder.sha256 != sha256:
            raise EmbedError(f"{backbone}: the weights changed while embedding (sha256 {encoder.sha256[:12]}…, not {sha256[:12]}…)")
        cuda = self.device.type == "cuda"
        self.encoder = encoder.to(self.device, memory_format=torch.channels_last if cuda else torch.preserve_format)
        self.dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
        self.dim = encoder.dim

    def __call__(self, batch: dict) -> dict:
        pixels, errors = batch.pop("pixels"), batch["error"].astype(object)
        vectors = np.zeros((len(errors), self.dim), np.float16)
        ok = errors == ""
        if ok.any():
            x = to_input(torch.from_numpy(np.ascontiguousarray(pixels[ok])), self.device)
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype, enabled=self.device.type == "cuda"):
                vectors[ok] = self.encoder(x).float().cpu().numpy()  # float16 as stored: beyond ±65504 is inf
            finite = np.isfinite(vectors).all(axis=1)
            errors[ok & ~finite] = "the embedding is not finite (values beyond float16's range)"
        batch.update({"embedding": vectors, "error": errors})
        return batch


def embed_rows(ds: ray.data.Dataset, encoder: Encoder, weights: str | None, kind: str, batch_size: int = 64, actors: int = 1,
               cpus: float = 1.0, model_args: dict | None = None) -> ray.data.Dataset:  # fmt: skip
    """``ds`` (an ``image`` column of URIs; for ``kind`` patches, ``_shard``/``_row`` of a patch store) with
    ``embedding`` (float16, ``encoder.dim`` wide) and ``error`` added; the other columns pass through.
    ``encoder`` is the one the driver loaded: each actor loads the same and checks its sha256."""
    use_gpu = bool(ray.cluster_resources().get("GPU", 0))
    total = ray.cluster_resources().get("CPU", 0)
    if not use_gpu and actors * cpus >= total:
        raise EmbedError(
            f"{actors} embedding actors × {cpus} CPUs take every CPU of the cluster ({total:g}), leaving none to "
            "decode images: lower embed.actors or embed.cpus_per_actor"
        )
    size, channels = encoder.image_size, encoder.in_channels
    decoded = (
        ds.map_batches(read_patches, fn_kwargs={"size": size, "channels": channels}, batch_size=DECODE_BATCH)
        if kind == PATCHES
        else ds.map_batches(decode_batch, fn_kwargs={"size": size, "channels": channels}, batch_size=DECODE_BATCH)
    )
    args = {"backbone": encoder.backbone, "weights": weights, "in_channels": channels, "image_size": size,
            "model_args": model_args or {}, "sha256": encoder.sha256}  # fmt: skip
    return decoded.map_batches(
        Embedder, fn_constructor_kwargs=args, batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0, num_cpus=1 if use_gpu else cpus,
    )  # fmt: skip


# --- the job -----------------------------------------------------------------------------------------


def _store_part(frame: pd.DataFrame, labels: list[str], task: str, info: store.StoreInfo) -> tuple[pd.DataFrame, bytes]:
    """A committed part of the store: the carried columns in the store's types, the vectors, nothing private."""
    vectors = np.stack(frame.pop(store.VECTOR).to_numpy()) if len(frame) else np.zeros((0, info.dim), np.float16)
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith("_")])
    for column in frame.columns:
        if column in STRINGS:
            frame[column] = frame[column].fillna("").astype(str)
        elif column in labels or column == "tumour_fraction":
            frame[column] = frame[column].astype(np.float32)
        elif column in ("x", "y", "level", "size"):
            frame[column] = frame[column].astype(np.int64)
    frame["error"] = frame["error"].fillna("").astype(str)
    return frame, store.part_bytes(store.to_table(frame, vectors, labels, task, info))


def embed(config: JobConfig) -> EmbedSummary:
    """Embed ``embed.input`` (or ``wsi.patches``, or the run's manifest) into ``config.embeddings``; resumable."""
    e = config.embed
    started = time.monotonic()
    source = source_of(config)
    encoder = load_encoder(e.backbone, e.weights, None, e.image_size, e.model_args)
    info = store.StoreInfo(encoder.backbone, encoder.dim, encoder.sha256, encoder.image_size, source.kind)
    log.info("embedding the %s of %s with %s (%d-dim, %d px)", source.kind, source.uri, info.backbone, info.dim, info.image_size)
    identity = hashlib.sha256(json.dumps(asdict(info), sort_keys=True).encode()).hexdigest()  # weights, size and kind
    out = parts.Output(config.embeddings, identity, verb="embed", done="embedded", holds="embeddings", error=EmbedError)
    committed = parts.resume(out)
    rows = parts.read_listing(out, source.uri, source.tables, e.part_size, min(e.batch_size, e.part_size), committed, source.key)
    embedded = embed_rows(rows, encoder, e.weights, source.kind, e.batch_size, e.actors, e.cpus_per_actor, e.model_args)
    del encoder  # the actors hold their own
    writer = parts.PartWriter(out, partial(_store_part, labels=source.labels, task=source.task, info=info), key=source.key)
    try:
        for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
            frame = pd.DataFrame({k: v for k, v in batch.items() if k != store.VECTOR})
            writer.add(frame.assign(**{store.VECTOR: list(batch[store.VECTOR])}))
    except EmbedError as err:  # from the listing task: Ray adds the task's traceback; our message is its first line
        cause = getattr(err, "cause", None) or err
        raise type(cause)(str(cause).splitlines()[0]) from None
    writer.check_complete()

    counts = parts.verify(out)
    summary = EmbedSummary(out.uri, counts.inputs, counts.inputs - counts.errors, counts.errors, counts.parts, len(committed),
                           info.backbone, info.dim, info.weights_sha256, info.kind, round(time.monotonic() - started, 2))  # fmt: skip
    storage.write_atomic(storage.join(out.uri, parts.SUMMARY), json.dumps(asdict(summary), indent=2).encode())
    log.info("embedding summary: %d inputs, %d embedded, %d errors, %d parts (%d from earlier runs) → %s",
             summary.inputs, summary.embedded, summary.errors, summary.parts, summary.parts_skipped, out.uri)  # fmt: skip
    return summary
