"""The training cache (``medray prepare``): every image decoded and resized once, stored as uint8.

Decoding is what limits training on CPU (a 1024² PNG costs ~6 ms a core, every epoch); reading a
prepared 224² uint8 array costs almost nothing. ``prepare`` runs the same decode as training, with
Ray Data, into Parquet shards that hold the pixels (column ``pixels``: the raw bytes of an
``(H, W)`` or ``(H, W, C)`` uint8 array, shape in the metadata) next to every manifest column,
the row's position in the manifest (``manifest_row``) and the reason an image could not be decoded
(``error``, empty when it could). A metadata file, written last so that its presence marks a complete
cache, records the source manifest, its modification time, the size, the channels and the time.

Training reads the cache when it is there, was prepared at the size and channels asked for, and its
manifest has not been modified since (otherwise rows, labels or splits could differ); else it decodes
from the source images and logs why. Either way an unreadable image comes out the same: a blank
image with NaN labels, counted by the worker.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from medray.data import decoded, rows
from medray.data.manifest import Manifest, read_manifest
from medray.data.sampling import COLUMN
from medray.io import images, storage

log = logging.getLogger(__name__)
META = "medray_cache.json"
SHARDS = "shards"
ROW = "manifest_row"


@dataclass
class PrepareResult:
    uri: str
    images: int
    unreadable: int
    seconds: float


def default_uri(manifest_uri: str, size: int, channels: int) -> str:
    return f"{manifest_uri.removesuffix('.parquet')}.cache-{size}px-{channels}ch"


def _mtime(uri: str) -> float:
    fs, path = storage.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(uri)
    return info.mtime.timestamp()


def _decode_rows(batch: dict, size: int, channels: int) -> dict:
    n = len(batch["image"])
    pixels = np.zeros((n, size, size) if channels == 1 else (n, size, size, channels), dtype=np.uint8)
    errors = np.full(n, "", dtype=object)
    for i, uri in enumerate(batch["image"]):
        try:
            pixels[i] = images.load(str(uri), size, channels)
        except Exception as err:  # noqa: BLE001 — whatever reading one input raises is its error (images.failure)
            errors[i] = images.failure(str(uri), err)
    # Raw bytes, one value per row: Parquet decodes a binary column at memory speed, whereas a list
    # column carries a repetition level per pixel and reads several times slower.
    raw = np.empty(n, dtype=object)
    raw[:] = [p.tobytes() for p in pixels]
    return {**batch, "pixels": raw, "error": errors}


def _clear(uri: str) -> None:
    fs, path = storage.filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir_contents(path, missing_dir_ok=True)


def prepare(manifest_uri: str, out: str | None = None, size: int = 128, channels: int = 1) -> PrepareResult:
    """Decode and resize every image of the manifest once, into Parquet shards under ``out``."""
    started = time.monotonic()
    source_mtime = _mtime(manifest_uri)
    manifest = read_manifest(manifest_uri)
    out = out or default_uri(manifest_uri, size, channels)
    _clear(out)  # no shard of an older cache may survive next to the new ones
    frame = manifest.frame.assign(**{ROW: np.arange(len(manifest.frame))})
    fs, path = storage.filesystem(storage.join(out, SHARDS))
    ds = rows(frame).map_batches(_decode_rows, fn_kwargs={"size": size, "channels": channels}, batch_size=64)
    ds.write_parquet(path, filesystem=fs, min_rows_per_file=256)
    errors = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["error"]).column("error").to_pylist()
    unreadable = sum(1 for e in errors if e)
    meta = {
        "source": manifest_uri,
        "source_mtime": source_mtime,
        "image_size": size,
        "channels": channels,
        "labels": manifest.labels,
        "images": len(errors),
        "unreadable": unreadable,
        "created": time.time(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    storage.write_text(storage.join(out, META), json.dumps(meta, indent=2))
    seconds = time.monotonic() - started
    log.info("prepared %d images (%d unreadable) at %d px in %.0f s → %s", len(errors), unreadable, size, seconds, out)
    return PrepareResult(out, len(errors), unreadable, seconds)


def freshness(cache_uri: str, manifest_uri: str, size: int, channels: int) -> str | None:
    """Why the cache at ``cache_uri`` cannot stand in for decoding ``manifest_uri``; None when it can."""
    try:
        meta = json.loads(storage.read_text(storage.join(cache_uri, META)))
    except FileNotFoundError:
        return f"no prepared cache at {cache_uri}"
    if (meta["image_size"], meta["channels"]) != (size, channels):
        return f"the cache at {cache_uri} holds {meta['image_size']} px × {meta['channels']} channels, not {size} px × {channels}"
    if meta["source"] != manifest_uri:
        return f"the cache at {cache_uri} was prepared from {meta['source']}, not {manifest_uri}"
    if _mtime(manifest_uri) > meta["source_mtime"]:
        return f"the manifest was modified after the cache at {cache_uri} was prepared: run medray prepare again"
    return None


def _shards(cache_uri: str) -> list[str]:
    return storage.list_files(storage.join(cache_uri, SHARDS), (".parquet",))


def _pixels(column: pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    """The binary ``pixels`` column as one ``(N, *shape)`` uint8 array, straight from Arrow's buffers."""
    array = column.combine_chunks()
    if len(array) == 0:
        return np.zeros((0, *shape), dtype=np.uint8)
    kind = np.int64 if pa.types.is_large_binary(array.type) else np.int32
    offsets = np.frombuffer(array.buffers()[1], dtype=kind)[array.offset : array.offset + len(array) + 1]
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.reshape(len(array), *shape)


def _read_shards(batch: dict, labels: list[str], shape: tuple, member: np.ndarray, weights: np.ndarray | None) -> dict:
    """Ray Data UDF: whole cache shards (one URI per row) → training rows of one split."""
    parts = []
    for uri in batch["shard"]:
        fs, path = storage.filesystem(str(uri))
        table = pq.read_table(path, filesystem=fs, columns=["pixels", "error", ROW, *labels])
        keep = member[table.column(ROW).to_numpy()]
        rows_ = table.column(ROW).to_numpy()[keep]
        targets = np.stack([table.column(label).to_numpy(zero_copy_only=False).astype(np.float32)[keep] for label in labels], axis=1)
        bad = np.asarray(table.column("error").to_pylist(), dtype=object)[keep] != ""
        targets[bad] = np.nan  # as when decoding fails mid-training: masked out of the loss and the metrics
        part = {"image": _pixels(table.column("pixels"), shape)[keep], "labels": targets, "unreadable": bad}
        if weights is not None:
            part[COLUMN] = weights[rows_]
        parts.append(part)
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def training_data(
    manifest: Manifest,
    split: str,
    manifest_uri: str,
    size: int,
    channels: int = 1,
    cache_uri: str | None = None,
    use_cache: bool = True,
    multiplicity: np.ndarray | None = None,
) -> ray.data.Dataset:
    """One split's training input — decoded images, label vectors (and sampling multiplicity) — from
    the prepared cache when it is usable, else decoded from the source images. ``multiplicity`` is
    aligned with ``manifest.split(split)``."""
    cache_uri = cache_uri or default_uri(manifest_uri, size, channels)
    why = freshness(cache_uri, manifest_uri, size, channels) if use_cache else "data.use_cache is off"
    if why:
        log.info("%s split: decoding from the source images (%s)", split, why)
        frame = manifest.split(split)
        if multiplicity is not None:
            frame = frame.assign(**{COLUMN: multiplicity})
        return decoded(frame, manifest.labels, size, channels)
    log.info("%s split: reading the prepared cache %s", split, cache_uri)
    member = (manifest.frame["split"] == split).to_numpy()
    weights = None
    if multiplicity is not None:
        weights = np.zeros(len(member))
        weights[np.flatnonzero(member)] = multiplicity
    # One task per shard reading it with pyarrow: Ray's Parquet datasource plans, samples and fetches
    # metadata on every pass, which cost more than the read itself on each epoch (measured here).
    shards = _shards(cache_uri)
    shape = (size, size) if channels == 1 else (size, size, channels)
    kwargs = {"labels": manifest.labels, "shape": shape, "member": member, "weights": weights}
    items = ray.data.from_items([{"shard": uri} for uri in shards], override_num_blocks=max(len(shards), 1))
    return items.map_batches(_read_shards, fn_kwargs=kwargs, batch_size=1)


def read_cache(cache_uri: str) -> pd.DataFrame:
    """The cache's rows without their pixels: what a user checks with pandas."""
    fs, path = storage.filesystem(storage.join(cache_uri, SHARDS))
    table = pads.dataset(path, filesystem=fs, format="parquet")
    return table.to_table(columns=[c for c in table.schema.names if c != "pixels"]).to_pandas()
