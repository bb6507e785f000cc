"""Heads on embeddings: small classifiers trained on an embedding store's vectors in seconds.

- ``linear`` — logistic regression (scikit-learn) on standardised vectors: one per label for a
  multi-label task, one per "grade > k" for an ordinal one (as medray's image models decompose grades),
  multinomial for a multi-class task. Samples are weighted as ``loss.weighting`` weights medray's loss
  (``medray.training.losses``), normalised to a mean weight of 1 so that C means the same with or without
  weighting. The L2 strength ``head.C`` is chosen on the val split per output (AUROC) from ``C_GRID`` unless set.
- ``knn`` — k nearest train vectors by cosine (L2-normalised vectors, scikit-learn ``NearestNeighbors``);
  a label's probability is the share of the neighbours' votes that are positive, each vote weighted
  equally or by 1/distance (``head.weights``; an exact match takes all the weight, as scikit-learn does).
  Neighbours whose label is unknown (NaN) do not vote on it.
- ``mlp`` — one hidden layer, trained with Ray Train (``medray.embeddings.mlp``).

A head is saved as a medray checkpoint (``medray.training.checkpoint``: ``model.pt`` loaded with
``weights_only=True``, ``meta.json``, ``manifest.json`` of sha256s), so nothing is unpickled: the linear
and MLP heads are one ``VectorHead`` state dict (the standardisation, then the layers; a linear head's
weights are the fitted scikit-learn coefficients), the k-NN head its normalised train vectors and their
labels, from which the neighbour index is rebuilt. ``meta.json`` records the head kind, labels, task and
the store's ``StoreInfo`` (backbone, weights sha256, image size): which encoder must embed what it scores.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import NearestNeighbors
from torch import nn

from medray.embeddings.store import Embeddings, StoreInfo
from medray.errors import MedrayError
from medray.io import storage
from medray.training import checkpoint
from medray.training.losses import class_weights, head_size, ordinal_targets, per_class_weights, probabilities
from medray.training.validation import auroc

HEADS = ("linear", "knn", "mlp")
C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
DEFAULT_C = 1.0  # where val cannot choose (one class only in an output's val labels)


class HeadError(MedrayError, ValueError):
    """A store a head cannot be trained on or applied to: one line naming the store and what to do."""


class VectorHead(nn.Module):
    """Vectors → logits: standardised with the train split's mean and spread, then one linear layer
    (``hidden`` 0: the linear head) or one hidden layer (the MLP head)."""

    def __init__(self, dim: int, outputs: int, hidden: int = 0, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        if hidden:
            self.layers = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, outputs))
        else:
            self.layers = nn.Linear(dim, outputs)

    def standardise_with(self, vectors: np.ndarray) -> VectorHead:
        mean, scale = standardiser(vectors)
        self.mean.copy_(torch.from_numpy(mean))
        self.scale.copy_(torch.from_numpy(scale))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x - self.mean) / self.scale)


def standardiser(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation (1 where a dimension is constant)."""
    mean, scale = vectors.mean(axis=0, dtype=np.float64), vectors.std(axis=0, dtype=np.float64)
    return mean.astype(np.float32), np.where(scale > 1e-12, scale, 1.0).astype(np.float32)


def normalised(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


class KnnHead:
    """The normalised train vectors (float16, as the store keeps them) and their label columns (NaN unknown)."""

    def __init__(self, vectors: np.ndarray, targets: np.ndarray, k: int, weights: str):
        self.vectors, self.targets = np.array(vectors, np.float16), np.array(targets, np.float32)  # own, writable copies
        self.k, self.weights = min(k, len(self.vectors)), weights
        self.index = NearestNeighbors(n_neighbors=self.k, algorithm="brute").fit(self.vectors.astype(np.float32))
        self.prior = np.nan_to_num(np.nanmean(self.targets, axis=0), nan=0.5) if len(self.targets) else None

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        distance, neighbours = self.index.kneighbors(normalised(vectors))
        if self.weights == "uniform":
            w = np.ones_like(distance)
        else:
            exact = distance <= 1e-12
            w = np.where(exact.any(axis=1, keepdims=True), exact.astype(float), 1 / np.maximum(distance, 1e-12))
        votes = self.targets[neighbours]  # (n, k, columns)
        known = ~np.isnan(votes)
        weight = w[:, :, None] * known
        total = weight.sum(axis=1)
        share = (weight * np.nan_to_num(votes)).sum(axis=1) / np.maximum(total, 1e-300)
        return np.where(total > 0, share, self.prior).astype(np.float32)

    def state(self) -> dict:
        return {"vectors": torch.from_numpy(self.vectors), "targets": torch.from_numpy(self.targets)}


@dataclass
class Head:
    """A trained head: ``probabilities(vectors)`` gives one column per label, as an image model's scores."""

    kind: str
    task: str
    labels: list[str]
    model: VectorHead | KnnHead

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, np.float32)
        if isinstance(self.model, KnnHead):
            return self.model.probabilities(vectors)
        self.model.eval()
        with torch.inference_mode():
            return probabilities(self.task, self.model(torch.from_numpy(vectors)).float()).numpy()

    def state(self) -> dict:
        return self.model.state() if isinstance(self.model, KnnHead) else {"model": self.model.state_dict()}


# --- fitting ----------------------------------------------------------------------------------------


def targets(frame, labels: list[str]) -> np.ndarray:
    return frame[labels].to_numpy(np.float32)


def _unlearnable(store_uri: str, what: str) -> HeadError:
    return HeadError(f"{store_uri}: {what} in the train split, so a head cannot learn it: split the manifest so that "
                     "train holds every class (medray split), then embed it again")  # fmt: skip


def _fit(C: float, x: np.ndarray, y: np.ndarray, weights: np.ndarray) -> LogisticRegression:
    with warnings.catch_warnings():
        # The best C on val is often a weak one whose fit has not converged to the last digit: it is still the best on val.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=C, max_iter=500).fit(x, y, sample_weight=weights)


def _choose(fits, val_score) -> tuple[LogisticRegression, float]:
    """The fit with the best val score (ties: the smaller C, the stronger regularisation)."""
    best, best_c, best_score = None, None, -np.inf
    for C, fit in fits:
        score = val_score(fit)
        if best is None or (not np.isnan(score) and score > best_score):
            best, best_c, best_score = fit, C, (score if not np.isnan(score) else -np.inf)
    return best, best_c


def _grid(C: float | None, val_known: bool) -> tuple[float, ...]:
    return (C,) if C is not None else (C_GRID if val_known else (DEFAULT_C,))


def fit_linear(store: Embeddings, store_uri: str, weighting: str, beta: float, C: float | None = None) -> tuple[Head, dict]:
    """The linear head on the store's train split, C chosen on its val split; also what was chosen."""
    (train, x), (val, vx) = store.split("train"), store.split("val")
    head = VectorHead(store.info.dim, head_size(store.task, len(store.labels))).standardise_with(x)
    z, vz = ((v - head.mean.numpy()) / head.scale.numpy() for v in (x, vx))
    y, vy = targets(train, store.labels), targets(val, store.labels)
    if store.task == "multi-class":
        coef, intercept, chosen = _multinomial(z, y, vz, vy, weighting, beta, C, store_uri, store.labels)
    else:
        outputs = store.labels if store.task == "multi-label" else [f"grade > {k}" for k in range(len(store.labels) - 1)]
        if store.task == "ordinal":
            y, vy = (ordinal_targets(torch.tensor(t)).numpy() for t in (y, vy))
        coef, intercept, chosen = _binary_outputs(z, y, vz, vy, weighting, beta, C, store_uri, outputs)
    with torch.no_grad():
        head.layers.weight.copy_(torch.from_numpy(coef.astype(np.float32)))
        head.layers.bias.copy_(torch.from_numpy(intercept.astype(np.float32)))
    return Head("linear", store.task, store.labels, head), {"C": chosen}


def _binary_outputs(z, y, vz, vy, weighting, beta, C, store_uri, outputs):
    """One logistic regression per column of ``y`` (a label, or "grade > k"), fitted on the rows where it is known."""
    for k, name in enumerate(outputs):
        if len(np.unique(y[~np.isnan(y[:, k]), k])) < 2:
            raise _unlearnable(store_uri, f"{name!r} has a single class")
    pos, neg = class_weights(y, weighting, beta)
    coef, intercept, chosen = np.zeros((y.shape[1], z.shape[1])), np.zeros(y.shape[1]), []
    for k in range(len(outputs)):
        known = ~np.isnan(y[:, k])
        yk = y[known, k].astype(int)
        w = np.where(yk == 1, pos[k], neg[k])
        w = w / w.mean()
        val_known = len(np.unique(vy[~np.isnan(vy[:, k]), k])) == 2
        fits = [(c, _fit(c, z[known], yk, w)) for c in _grid(C, val_known)]
        fit, c = _choose(fits, lambda f, k=k: auroc(vy[:, k], f.decision_function(vz)))
        coef[k], intercept[k] = fit.coef_[0], fit.intercept_[0]
        chosen.append(c)
    return coef, intercept, chosen


def _multinomial(z, y, vz, vy, weighting, beta, C, store_uri, labels):
    """One multinomial logistic regression over the classes, C chosen on the val macro AUROC."""
    known = ~np.isnan(y).any(axis=1)
    classes = y[known].argmax(axis=1)
    absent = [labels[c] for c in range(len(labels)) if not (classes == c).any()]
    if absent:
        raise _unlearnable(store_uri, f"class(es) {absent} have no example")
    w = per_class_weights(y[known], weighting, beta)[classes]
    w = w / w.mean()
    vknown = ~np.isnan(vy).any(axis=1)

    def macro(fit) -> float:
        p = fit.predict_proba(vz[vknown])
        scores = [auroc(vy[vknown, c], p[:, c]) for c in range(len(labels))]
        return float(np.nanmean(scores)) if not np.isnan(scores).all() else float("nan")

    val_classes = len(np.unique(vy[vknown].argmax(axis=1))) if vknown.any() else 0
    fits = [(c, _fit(c, z[known], classes, w)) for c in _grid(C, val_classes >= 2)]
    fit, c = _choose(fits, macro)
    coef, intercept = fit.coef_, fit.intercept_
    if len(labels) == 2:  # scikit-learn fits two classes as one logit for class 1: softmax([0, z]) is the same
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    return coef, intercept, [c]


def fit_knn(store: Embeddings, k: int, weights: str) -> Head:
    train, x = store.split("train")
    return Head("knn", store.task, store.labels, KnnHead(normalised(x), targets(train, store.labels), k, weights))


# --- saving and loading -----------------------------------------------------------------------------


def head_meta(kind: str, labels: list[str], task: str, info: StoreInfo, store_uri: str, **extra) -> dict:
    """What ``meta.json`` says about a head: enough to rebuild it and to know which encoder feeds it."""
    return {"head": kind, "labels": labels, "task": task, "embedding": asdict(info), "store": store_uri, **extra}


def save_head(parent: str, head: Head, meta: dict) -> str:
    """The head as a checkpoint folder ``<parent>/<kind>-<sha256 of its weights, 12 hex digits>`` (local or
    s3://), written as medray writes every checkpoint, the manifest last. Named by content, a retrained head
    never lands beside the calibration.json that evaluation fitted for another."""
    with tempfile.TemporaryDirectory() as directory:
        checkpoint.save(directory, head.state(), meta)
        files = {name: open(os.path.join(directory, name), "rb").read()
                 for name in (checkpoint.MODEL_FILE, checkpoint.META_FILE, checkpoint.MANIFEST_FILE)}  # fmt: skip
    uri = storage.join(parent, f"{head.kind}-{hashlib.sha256(files[checkpoint.MODEL_FILE]).hexdigest()[:12]}")
    for name, data in files.items():  # the manifest last: a folder cut short is refused, never loaded
        storage.write_bytes(storage.join(uri, name), data)
    return uri


def is_head(uri: str) -> bool:
    return checkpoint.read_meta(uri).get("head", "backbone") in HEADS


def load_head(uri: str) -> tuple[Head, dict]:
    """The head of checkpoint ``uri`` (``weights_only=True``) and its metadata plus the weights' sha256."""
    meta = checkpoint.read_meta(uri)
    kind = meta.get("head")
    if kind not in HEADS:
        raise checkpoint.CheckpointError(f"{uri} is not a head on embeddings (its model.head is {kind or 'backbone'})")
    state = checkpoint.load_state(uri)
    meta["sha256"] = checkpoint.identity(uri)
    labels, task, dim = meta["labels"], meta["task"], meta["embedding"]["dim"]
    if kind == "knn":
        model = KnnHead(state["vectors"].cpu().numpy(), state["targets"].cpu().numpy(), meta["k"], meta["weights"])
    else:
        model = VectorHead(dim, head_size(task, len(labels)), meta.get("hidden", 0), meta.get("dropout", 0.0))
        model.load_state_dict(state["model"])
    return Head(kind, task, labels, model.eval() if isinstance(model, nn.Module) else model), meta


def check_store_fits(meta: dict, uri: str, store: Embeddings, store_uri: str) -> None:
    """Refuse, in one line, a store the head cannot read: other labels or task, or another encoder's vectors."""
    trained, kind = list(meta["labels"]), meta["task"]
    if store.task != kind or list(store.labels) != trained:
        raise HeadError(f"{store_uri} holds a {store.task} store of labels {store.labels[:8]} but the head {uri} was trained "
                        f"for {kind} on {trained[:8]}: evaluate it on the store it was trained on, or train a head on this one")  # fmt: skip
    mine, theirs = StoreInfo(**meta["embedding"]), store.info
    if (mine.backbone, mine.weights_sha256, mine.dim) != (theirs.backbone, theirs.weights_sha256, theirs.dim):
        raise HeadError(f"{store_uri} was embedded by {theirs.backbone} (weights {theirs.weights_sha256[:12]}, dim {theirs.dim}) "
                        f"but the head {uri} by {mine.backbone} (weights {mine.weights_sha256[:12]}, dim {mine.dim}): "
                        "embed with the head's encoder, or train a head on this store")  # fmt: skip


def describe(meta: dict) -> str:
    """The head in a few words, for logs and the model card."""
    e = meta["embedding"]
    settings = {"linear": f"C {', '.join(f'{c:g}' for c in meta.get('C', []))}",
                "knn": f"k {meta.get('k')}, {meta.get('weights')} votes",
                "mlp": f"{meta.get('hidden')} hidden units, dropout {meta.get('dropout')}"}[meta["head"]]  # fmt: skip
    return (f"{meta['head']} head ({settings}) on frozen {e['backbone']} embeddings (dim {e['dim']}, weights sha256 "
            f"{e['weights_sha256'][:12]}…, images at {e['image_size']} px)")  # fmt: skip
