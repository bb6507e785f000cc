"""Checkpoints: what a training epoch leaves behind and what evaluation and scoring load.

A checkpoint is a directory (local or ``s3://``) with ``model.pt`` — model, optimizer and
scheduler state, loaded with ``weights_only=True`` — and ``meta.json``, which says how to rebuild
the model (backbone, labels, input size) without the training config. The run directory's
``best_checkpoint.json`` names the checkpoint with the best validation mean AUROC.

``manifest.json`` is written last and holds the sha256 of every other file. A checkpoint is
complete only when its manifest is there and every file matches it, so a checkpoint cut short —
a worker killed while saving, an upload interrupted, files copied in any order — is refused, never
loaded. An optional ``calibration.json`` (a map per model output, written by evaluation: see
medray.evaluation.calibration) makes scoring calibrate the logits before the sigmoid or softmax.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import torch

from medray.errors import MedrayError
from medray.io import storage
from medray.training.losses import head_size
from medray.training.models import Classifier, build_model

MODEL_FILE, META_FILE, BEST_FILE = "model.pt", "meta.json", "best_checkpoint.json"
MANIFEST_FILE = "manifest.json"


class CheckpointError(MedrayError, ValueError):
    pass


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save(directory: str, state: dict, meta: dict) -> None:
    """Write into a local directory that Ray Train then uploads as one checkpoint; the manifest last."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    files = {MODEL_FILE: buffer.getvalue(), META_FILE: json.dumps(meta, indent=2).encode()}
    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    manifest = {"files": {name: _sha256(data) for name, data in files.items()}}
    with open(os.path.join(directory, MANIFEST_FILE), "w") as f:
        json.dump(manifest, f, indent=2)


def _verified(uri: str) -> dict[str, bytes]:
    """Every file the manifest lists, checked against it; CheckpointError if any is missing or differs."""
    try:
        manifest = json.loads(storage.read_text(storage.join(uri, MANIFEST_FILE)))
    except FileNotFoundError:
        raise CheckpointError(f"{uri} is not a complete medray checkpoint: no {MANIFEST_FILE} (cut short while saving?)") from None
    except ValueError:
        raise CheckpointError(f"{uri}: {MANIFEST_FILE} is not valid JSON") from None
    files = {}
    for name, expected in manifest.get("files", {}).items():
        try:
            files[name] = storage.read_bytes(storage.join(uri, name))
        except FileNotFoundError:
            raise CheckpointError(f"{uri} is incomplete: {name} is missing") from None
        if _sha256(files[name]) != expected:
            raise CheckpointError(f"{uri} is incomplete or damaged: {name} does not match its sha256 in {MANIFEST_FILE}")
    if MODEL_FILE not in files or META_FILE not in files:
        raise CheckpointError(f"{uri}: {MANIFEST_FILE} does not list {MODEL_FILE} and {META_FILE}")
    return files


def is_complete(uri: str) -> bool:
    try:
        _verified(uri)
    except CheckpointError:
        return False
    return True


def load_state(directory: str) -> dict:
    data = _verified(directory)[MODEL_FILE]
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def identity(uri: str) -> str:
    """The sha256 of the checkpoint's weights: the model identity recorded next to every score."""
    return _sha256(_verified(uri)[MODEL_FILE])


def check_image_model(uri: str, meta: dict) -> None:
    """Refuse a checkpoint of a head on embeddings (``meta["head"]``, see medray.embeddings) where an image model is needed."""
    if meta.get("head", "backbone") != "backbone":
        raise CheckpointError(f"{uri} holds a {meta['head']} head on embeddings, not an image model: this needs an image model "
                              f"(heads are trained, evaluated and scored with model.head: {meta['head']})")  # fmt: skip


def load_model(uri: str) -> tuple[Classifier, dict]:
    """The model of checkpoint ``uri`` in eval mode, and its metadata plus the weights' sha256."""
    files = _verified(uri)
    meta, data = json.loads(files[META_FILE]), files[MODEL_FILE]
    check_image_model(uri, meta)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    meta.setdefault("task", "multi-label")
    model = build_model(meta["backbone"], head_size(meta["task"], len(meta["labels"])), meta["in_channels"])
    model.load_state_dict(state["model"])
    meta["sha256"] = _sha256(data)
    return model.eval(), meta


def read_meta(uri: str) -> dict:
    """What the checkpoint says about its model (backbone, labels, input size), without loading weights."""
    try:
        meta = json.loads(storage.read_text(storage.join(uri, META_FILE)))
    except FileNotFoundError:
        raise CheckpointError(f"{uri} is not a medray checkpoint: no {META_FILE}") from None
    meta.setdefault("task", "multi-label")
    return meta


def _names(labels: list[str]) -> str:
    return "[" + ", ".join(labels[:8]) + (f", … {len(labels) - 8} more" if len(labels) > 8 else "") + "]"


def check_fits(uri: str, labels: list[str], task: str, manifest_uri: str) -> None:
    """Refuse, in one line saying what differs, a manifest of another task than the checkpoint's model.
    Multi-label outputs are matched by name, so their order may differ; a class's index is its meaning."""
    meta = read_meta(uri)
    trained, kind = list(meta["labels"]), meta["task"]
    if task != kind:
        raise CheckpointError(
            f"{manifest_uri} is a {task} manifest but the checkpoint {uri} was trained for {kind}: use the manifest it was trained on"
        )
    if (set(labels) != set(trained)) if task == "multi-label" else (list(labels) != trained):
        raise CheckpointError(
            f"{manifest_uri} has labels {_names(list(labels))} but the checkpoint {uri} was trained on {_names(trained)}: "
            "use the manifest it was trained on, or a checkpoint trained on this one"
        )


def write_best(run_dir: str, checkpoint_uri: str, metrics: dict) -> str:
    uri = storage.join(run_dir, BEST_FILE)
    storage.write_text(uri, json.dumps({"checkpoint": checkpoint_uri, "metrics": metrics}, indent=2, default=float))
    return uri


def resolve(explicit: str | None, run_dir: str) -> str:
    """The checkpoint to use: the one given, else the best of the run."""
    if explicit:
        return explicit
    pointer = storage.join(run_dir, BEST_FILE)
    if not storage.exists(pointer):
        raise CheckpointError(f"no checkpoint given and {pointer} does not exist: train this run first")
    return json.loads(storage.read_text(pointer))["checkpoint"]


def locate(reference: str) -> str:
    """A checkpoint directory as given, or the best checkpoint of a run directory."""
    if storage.exists(storage.join(reference, META_FILE)):
        return reference
    return resolve(None, reference)
