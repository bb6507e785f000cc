"""Whole-slide patches as training rows, from the Parquet shards that ``medray extract-patches`` wrote.

The batches are the ones ``medray.data.decoded`` makes from image URIs (``image`` uint8, ``labels``
float32, ``unreadable`` bool), decoded from the shards' PNG patches instead, so the trainer, its loss,
validation and checkpoints are the same for images and patches. The split was made per patient before
extraction, so every patch of a slide is on one side. Only slides with a done marker are read: a slide
a killed extraction left half-written never reaches training.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pyarrow.dataset as pads
import ray

from medray.io import images, storage

log = logging.getLogger(__name__)
BATCH = 64


def patch_labels(patches: str) -> list[str]:
    return json.loads(storage.read_text(storage.join(patches, "extract.json")))["labels"]


def shard_uris(patches: str) -> list[str]:
    """The Parquet shards of every slide whose extraction finished."""
    done = {os.path.basename(u)[: -len(".json")] for u in storage.list_files(storage.join(patches, "done"), (".json",))}
    shards = storage.list_files(storage.join(patches, "patches"), (".parquet",))
    return [u for u in shards if u.rstrip("/").split("/")[-2] in done]


def _table(patches: str, columns: list[str]):
    shards = shard_uris(patches)
    if not shards:
        raise FileNotFoundError(f"{patches}: no finished patch shards; run `medray extract-patches` first")
    fs, _ = storage.filesystem(patches)
    paths = [storage.filesystem(u)[1] for u in shards]
    return pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=columns)


def patch_frame(patches: str, columns: list[str]):
    """Chosen columns of every finished patch, as pandas (no pixels unless asked for)."""
    return _table(patches, columns).to_pandas()


def decode_patches(encoded, size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """PNG patches → ``(n, size, size[, 3])`` uint8 and a mask of those that could not be decoded."""
    n = len(encoded)
    pixels = np.zeros((n, size, size) if channels == 1 else (n, size, size, channels), dtype=np.uint8)
    bad = np.zeros(n, dtype=bool)
    for i, data in enumerate(encoded):
        try:
            pixels[i] = images.decode(data, "patch", size, channels)
        except Exception as err:  # noqa: BLE001 — whatever reading one input raises is its error (images.failure)
            log.warning("skipping unreadable patch: %s", images.failure("patch", err))
            bad[i] = True
    return pixels, bad


def _split_batch(batch: dict, split: str, labels: list[str], size: int, channels: int) -> dict:
    keep = batch["split"] == split
    pixels, bad = decode_patches(batch["patch"][keep], size, channels)
    targets = np.stack([batch[label][keep].astype(np.float32) for label in labels], axis=1).reshape(len(pixels), len(labels))
    targets[bad] = np.nan  # masked out of the loss and the metrics, like any unknown label
    return {"image": pixels, "labels": targets, "unreadable": bad}


def patch_dataset(patches: str, split: str, labels: list[str], size: int, channels: int = 3) -> ray.data.Dataset:
    """One split's patches as training batches (the dict ``medray.data.decoded`` makes)."""
    fs, _ = storage.filesystem(patches)
    paths = [storage.filesystem(u)[1] for u in shard_uris(patches)]
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=["patch", "split", *labels])
    kwargs = {"split": split, "labels": labels, "size": size, "channels": channels}
    return ds.map_batches(_split_batch, fn_kwargs=kwargs, batch_size=BATCH)
