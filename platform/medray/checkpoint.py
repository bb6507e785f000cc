"""Checkpoints: what a training epoch leaves behind and what evaluation and scoring load.

A checkpoint is a directory (local or ``s3://``) with ``model.pt`` — model, optimizer and
scheduler state, loaded with ``weights_only=True`` — and ``meta.json``, which says how to rebuild
the model (backbone, labels, input size) without the training config. The run directory's
``best_checkpoint.json`` names the checkpoint with the best validation mean AUROC.
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import torch

from medray import storage
from medray.losses import head_size
from medray.models import Classifier, build_model

MODEL_FILE, META_FILE, BEST_FILE = "model.pt", "meta.json", "best_checkpoint.json"


class CheckpointError(ValueError):
    pass


def save(directory: str, state: dict, meta: dict) -> None:
    """Write into a local directory that Ray Train then uploads as one checkpoint."""
    torch.save(state, os.path.join(directory, MODEL_FILE))
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def load_state(directory: str) -> dict:
    return torch.load(os.path.join(directory, MODEL_FILE), map_location="cpu", weights_only=True)


def load_model(uri: str) -> tuple[Classifier, dict]:
    """The model of checkpoint ``uri`` in eval mode, and its metadata plus the weights' sha256."""
    try:
        meta = json.loads(storage.read_text(storage.join(uri, META_FILE)))
        data = storage.read_bytes(storage.join(uri, MODEL_FILE))
    except FileNotFoundError:
        raise CheckpointError(f"{uri} is not a medray checkpoint (no {META_FILE} / {MODEL_FILE})") from None
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    meta.setdefault("task", "multi-label")
    model = build_model(meta["backbone"], head_size(meta["task"], len(meta["labels"])), meta["in_channels"])
    model.load_state_dict(state["model"])
    meta["sha256"] = hashlib.sha256(data).hexdigest()
    return model.eval(), meta


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
