"""MedMNIST ``.npz`` (``{train,val,test}_{images,labels}``) → PNG files + canonical manifest.

The archive holds no file names or patient IDs, so each image is written out as a PNG next to the
manifest (``<manifest stem>_images/<split>/<index>.png``, local or S3) and is its own "patient";
the archive's own train/val/test split is kept in the ``split`` column. The task decides the label
columns, consistently with medray.training.losses:

- ``multi-label`` (e.g. ChestMNIST, labels ``(N, L)`` of 0/1): one column per label;
- ``binary`` (e.g. PneumoniaMNIST, labels ``(N, 1)`` of 0/1): one label column, a multi-label task of one;
- ``multi-class`` (e.g. PathMNIST) and ``ordinal`` (e.g. RetinaMNIST grades 0–4): one-hot columns.

``auto`` picks multi-label for several columns, binary for two values and multi-class otherwise;
ordinal must be asked for, since grades and classes look alike in the file.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from medray.data.datasets.ingest import IngestResult, Options, Rejects, finish
from medray.data.manifest import SPLITS
from medray.io import storage

TASKS = ("auto", "binary", "multi-label", "multi-class", "ordinal")


def _task(labels: np.ndarray, task: str) -> str:
    if task != "auto":
        return task
    if labels.shape[1] > 1:
        return "multi-label"
    return "binary" if set(np.unique(labels)) <= {0, 1} else "multi-class"


def _targets(labels: np.ndarray, task: str, names: list[str]) -> np.ndarray:
    """``(N, columns)`` float targets; NaN rows mark values outside the task's classes."""
    if task in ("multi-label", "binary"):
        out = labels.astype(np.float64)
        out[~np.isin(labels, (0, 1))] = np.nan
        return out
    classes = labels[:, 0].astype(np.int64)
    out = np.zeros((len(classes), len(names)))
    ok = (classes >= 0) & (classes < len(names))
    out[np.arange(len(classes))[ok], classes[ok]] = 1.0
    out[~ok] = np.nan
    return out


def _names(labels: np.ndarray, task: str, names: list[str] | None) -> list[str]:
    if task in ("multi-label", "binary"):
        count = labels.shape[1]
        default = ["positive"] if task == "binary" else [f"label_{i}" for i in range(count)]
    else:
        count = int(labels.max()) + 1
        default = [f"class_{i}" for i in range(count)]
    names = list(names or default)
    if len(names) != count and task in ("multi-label", "binary"):
        raise ValueError(f"{len(names)} label names given but the archive has {count} label column(s)")
    return names  # given class names fix the classes: a value beyond them is quarantined


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


def ingest_medmnist(
    npz_uri: str, out: str, labels: list[str] | None = None, options: Options | None = None, task: str = "auto"
) -> IngestResult:
    """``labels``: names of the label columns (multi-label) or of the classes in index order."""
    options = options or Options()
    if task not in TASKS:
        raise ValueError(f"unknown MedMNIST task {task!r}; known: {', '.join(TASKS)}")
    archive = np.load(io.BytesIO(storage.read_bytes(npz_uri)), allow_pickle=False)
    present = [s for s in SPLITS if f"{s}_images" in archive and f"{s}_labels" in archive]
    if not present:
        raise ValueError(f"{npz_uri}: no {{train,val,test}}_images / _labels arrays; found {sorted(archive.files)}")
    all_labels = np.concatenate([archive[f"{s}_labels"].reshape(len(archive[f"{s}_labels"]), -1) for s in present])
    task = _task(all_labels, task)
    names = _names(all_labels, task, labels)
    folder = out.removesuffix(".parquet") + "_images"

    frames, rejects, rows_in = [], Rejects(), 0
    for split in present:
        pixels = archive[f"{split}_images"]
        targets = _targets(archive[f"{split}_labels"].reshape(len(pixels), -1), task, names)
        rows_in += len(pixels)
        uris = [storage.join(folder, split, f"{i}.png") for i in range(len(pixels))]
        bad = np.isnan(targets).all(axis=1) if task not in ("multi-label", "binary") else np.isnan(targets).any(axis=1)
        for i in np.flatnonzero(bad):
            rejects.add(uris[i], f"unknown label value in {split}_labels (not a class of this {task} task)")
        for i in tqdm(np.flatnonzero(~bad), desc=f"writing {split} PNGs", unit="img", disable=None if len(pixels) >= 1000 else True):  # bars on a terminal only
            storage.write_bytes(uris[i], _png(pixels[i]))
        keep = ~bad
        frame = pd.DataFrame(targets[keep], columns=names)
        frame.insert(0, "image", np.asarray(uris, dtype=object)[keep])
        frame.insert(1, "patient_id", [f"{split}-{i}" for i in np.flatnonzero(keep)])
        frame["split"] = split
        frames.append(frame)
    manifest_task = "multi-label" if task == "binary" else task
    frame = pd.concat(frames, ignore_index=True)
    return finish(frame, rejects, names, manifest_task, out, rows_in, options, npz_uri)
