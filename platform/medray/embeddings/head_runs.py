"""``medray train`` and ``medray evaluate`` for a head on embeddings (``model.head: linear | knn | mlp``).

Training reads the run's embedding store (``embed.output``, default ``<run>/embeddings``), fits the head on
its train split (choosing what it chooses on val), saves it as a medray checkpoint under ``<run>/heads/``
(the MLP: under ``<run>/head_mlp/``, one per epoch, as Ray Train keeps them) and records it as the run's
best checkpoint (``best_checkpoint.json``), as image training does.

Evaluation scores the store's val and test rows with the head and hands them to evaluation's core
(``medray.evaluation.evaluate.evaluate_scored``): the same thresholds on val, patient-bootstrap intervals,
deployment prevalence, calibration (written to the head's checkpoint, applied when scoring), subgroups,
report and model card as for an image model; only the Grad-CAM gallery does not apply, and the report says so.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from medray.config import JobConfig
from medray.data.manifest import Manifest
from medray.embeddings import heads
from medray.embeddings.store import Embeddings, read_store
from medray.evaluation.evaluate import METADATA, VOTE_PREFIXES, Evaluation, Scored, evaluate_scored
from medray.evaluation.predict import prob_columns
from medray.io import storage
from medray.training import checkpoint
from medray.training.losses import make_loss, prior_shift
from medray.training.trainer import SCORE, TrainResult
from medray.training.validation import auroc_per_label

log = logging.getLogger(__name__)


def _store(config: JobConfig) -> tuple[Embeddings, str]:
    uri = config.embeddings
    store = read_store(uri)
    if store.info.kind != "images":
        raise heads.HeadError(f"{uri} is a store of WSI patches: heads train on image stores (for slides: model.head: abmil)")
    return store, uri


def _metrics(head: heads.Head, store: Embeddings) -> dict:
    """Val AUROC per label and their mean: the figures an image model's epochs report."""
    val, vectors = store.split("val")
    per_label = auroc_per_label(heads.targets(val, store.labels), head.probabilities(vectors), store.labels)
    known = [v for v in per_label.values() if not np.isnan(v)]
    return {SCORE: float(np.mean(known)) if known else float("nan"), "val_images": len(val),
            **{f"val_auroc/{label}": value for label, value in per_label.items()}}  # fmt: skip


def train_head(config: JobConfig) -> TrainResult:
    """Fit ``config.model.head`` on the store's train split and record it as the run's best checkpoint."""
    store, uri = _store(config)
    kind, h, c = config.model.head, config.head, config.loss
    (train, x), (val, vx) = store.split("train"), store.split("val")
    if not len(train) or not len(val):
        raise heads.HeadError(f"{uri}: {len(train)} train and {len(val)} val rows; a head needs both (embed a split manifest)")
    log.info("training a %s head on %d train vectors (%d-dim), validating on %d", kind, len(train), store.info.dim, len(val))
    y = heads.targets(train, store.labels)
    loss = make_loss(store.task, y, c.weighting, c.beta, c.focal_gamma, c.label_smoothing)
    # Which weights file (and timm arguments) embedded the store: scoring's default encoder, checked by its sha256 there.
    recorded = {"encoder": {"weights": config.embed.weights, "model_args": config.embed.model_args}}
    if kind == "mlp":
        from medray.embeddings.mlp import train_mlp  # Ray Train: only when it trains

        settings = {"hidden": h.hidden, "dropout": h.dropout, "prior_shift": prior_shift(loss), **recorded}
        meta = heads.head_meta(kind, store.labels, store.task, store.info, uri, **settings)
        best, metrics = train_mlp(config, (x, y, vx, heads.targets(val, store.labels)), loss, meta)
    else:
        if kind == "linear":
            head, chosen = heads.fit_linear(store, uri, c.weighting, c.beta, h.C)
            settings = {**chosen, "prior_shift": prior_shift(loss), "weighting": c.weighting}
        else:
            head, settings = heads.fit_knn(store, h.k, h.weights), {"k": h.k, "weights": h.weights}
        metrics = _metrics(head, store)
        meta = heads.head_meta(kind, store.labels, store.task, store.info, uri, metrics=metrics, **settings, **recorded)
        best = heads.save_head(storage.join(config.run_dir, "heads"), head, meta)
    checkpoint.write_best(config.run_dir, best, metrics)
    return TrainResult(best, metrics)


def score_rows(head: heads.Head, frame: pd.DataFrame, vectors: np.ndarray) -> pd.DataFrame:
    """``frame`` with one ``prob_<label>`` column per label of ``head``."""
    probs = head.probabilities(vectors) if len(frame) else np.zeros((0, len(head.labels)), np.float32)
    return frame.assign(**{column: probs[:, i] for i, column in enumerate(prob_columns(head.labels))})


def evaluate_head(config: JobConfig) -> Evaluation:
    """The run's head (``evaluate.checkpoint``, default its best) on the store's val and test rows, evaluated
    as an image model is (``evaluate_scored``)."""
    uri = checkpoint.resolve(config.evaluate.checkpoint, config.run_dir)
    head, meta = heads.load_head(uri)
    store, store_uri = _store(config)
    heads.check_store_fits(meta, uri, store, store_uri)
    frame = store.frame
    held = frame["split"].isin(["val", "test"]).to_numpy()
    columns = ["image", "split", *store.labels, *(c for c in frame if c in METADATA or c.startswith(VOTE_PREFIXES))]
    scored = score_rows(head, frame.loc[held, columns], store.vectors[held]).assign(error="", model_sha256=meta["sha256"])
    failed = int(store.errors["split"].isin(["val", "test"]).sum()) if len(store.errors) else 0
    everything = Manifest(pd.concat([frame, store.errors], ignore_index=True), store.labels, store.task)
    return evaluate_scored(config, Scored(scored, everything, store_uri, uri, failed, gradcam=False))
