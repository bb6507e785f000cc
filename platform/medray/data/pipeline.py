"""Ray Data pipelines over manifest rows: check, decode + resize, resample.

Batches are numpy dicts (``image``: ``(B, H, W)`` uint8 for grayscale or ``(B, H, W, 3)`` for RGB,
``labels``: ``(B, L)`` float32). An image that fails to decode mid-training becomes a blank image
whose labels are all NaN — masked out of the loss and the metrics like any unknown label — and the
worker counts it; the job goes on.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import ray

from medray.data.sampling import COLUMN, resample_batch
from medray.io import images

log = logging.getLogger(__name__)
BATCH = 64


def rows(frame: pd.DataFrame) -> ray.data.Dataset:
    """Manifest rows as a dataset in blocks of one batch, so that decoding spreads over every CPU
    (a single pandas block would be decoded by a single task)."""
    frame = frame.reset_index(drop=True)
    return ray.data.from_pandas([frame.iloc[i : i + BATCH] for i in range(0, max(len(frame), 1), BATCH)])


def _decode_batch(batch: dict, labels: list[str], size: int, channels: int) -> dict:
    n = len(batch["image"])
    shape = (n, size, size) if channels == 1 else (n, size, size, channels)
    pixels = np.zeros(shape, dtype=np.uint8)
    targets = np.stack([batch[label].astype(np.float32) for label in labels], axis=1)
    bad = np.zeros(n, dtype=bool)
    for i, uri in enumerate(batch["image"]):
        try:
            pixels[i] = images.load(str(uri), size, channels)
        except Exception as err:  # noqa: BLE001 — whatever reading one input raises is its error (images.failure)
            log.warning("skipping unreadable image: %s", images.failure(str(uri), err))
            targets[i] = np.nan
            bad[i] = True
    out = {"image": pixels, "labels": targets, "unreadable": bad}
    if COLUMN in batch:
        out[COLUMN] = batch[COLUMN]
    return out


def decoded(frame: pd.DataFrame, labels: list[str], size: int, channels: int = 1) -> ray.data.Dataset:
    """Manifest rows → decoded, resized images with their label vectors (and sampling multiplicity)."""
    columns = ["image", *labels, *([COLUMN] if COLUMN in frame else [])]
    kwargs = {"labels": labels, "size": size, "channels": channels}
    return rows(frame[columns]).map_batches(_decode_batch, fn_kwargs=kwargs, batch_size=BATCH)


def resampled(ds: ray.data.Dataset) -> ray.data.Dataset:
    """A new sample on every pass, from the ``multiplicity`` column (see medray.data.sampling)."""
    return ds.map_batches(resample_batch, batch_size=BATCH)
