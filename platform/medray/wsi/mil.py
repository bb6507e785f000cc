"""Attention-based multiple-instance learning (ABMIL) over the patch embeddings of whole slides.

A slide is a bag of patches whose labels nobody drew; only the slide (or the patient) has a label.
Gated-attention MIL (Ilse, Tomczak & Welling, ICML 2018) learns which patches to look at: each
patch embedding is projected (Linear → ReLU), scored by a gated attention branch
(``w · (tanh(V h) ⊙ sigmoid(U h))``), the scores are turned into weights by a softmax over the bag,
and the weighted mean of the patches is classified. The weights are the model's answer to "where
did you look", and on annotated slides they can be checked against the tumour (medray.wsi.mil_eval).

Multi-label: each label has its own attention row and its own classifier, so that two findings on
one slide may rest on different patches (CLAM's multi-branch variant; one label is exactly Ilse's model).

MONAI's ``MILModel`` is not used: it embeds its own image backbone (a ResNet over the patch pixels)
and expects every bag as a tensor of images, while medray trains on an embedding store that a frozen
backbone already wrote once (``medray embed``); over vectors the model is the few layers below.

A bag is one slide's patches (``mil.level: slide``) or all of a patient's (``patient``). Its label is
the maximum of its patches' labels: with ``wsi.labels_from: slide`` every patch carries the slide's
label; with ``annotation`` a slide is positive when any of its patches is, the MIL assumption itself.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from medray.data.splits import assert_patient_disjoint
from medray.embeddings.store import Embeddings, StoreError, StoreInfo, read_store
from medray.errors import MedrayError
from medray.training import checkpoint

HEAD = "abmil"
PREDICT_PATCHES = 1 << 15  # patch slots per forward pass when scoring whole bags


class MilError(MedrayError, ValueError):
    """A store or checkpoint that attention-MIL cannot use as given: one line naming it and what to do."""


class GatedAttentionMIL(nn.Module):
    """``forward(x (B, N, D), mask (B, N) bool)`` → logits ``(B, L)`` and attention weights ``(B, N, L)``
    (each label's weights sum to 1 over the unmasked patches of its bag)."""

    def __init__(self, dim: int, outputs: int, hidden: int = 128, attention: int = 64, dropout: float = 0.25):
        super().__init__()
        self.project = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.value = nn.Linear(hidden, attention)  # tanh branch
        self.gate = nn.Linear(hidden, attention)  # sigmoid gate
        self.score = nn.Linear(attention, outputs)  # one attention row per label
        self.weight = nn.Parameter(torch.empty(outputs, hidden))  # one classifier per label
        self.bias = nn.Parameter(torch.zeros(outputs))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # as nn.Linear initialises its weight

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.project(x)
        scores = self.score(torch.tanh(self.value(h)) * torch.sigmoid(self.gate(h)))
        if mask is not None:
            scores = scores.masked_fill(~mask[..., None], float("-inf"))
        weights = torch.softmax(scores, dim=1)
        pooled = torch.einsum("bnl,bnh->blh", weights, h)
        return (pooled * self.weight).sum(-1) + self.bias, weights


@dataclass
class Bags:
    """Patches grouped into bags: ``frame`` and ``vectors`` are sorted by bag, bag ``i`` is rows
    ``starts[i] : starts[i] + lengths[i]``; ``table`` has one row per bag (key, patient_id, split, labels)."""

    frame: pd.DataFrame
    vectors: np.ndarray  # float16: the store's precision, half the memory of float32
    starts: np.ndarray
    lengths: np.ndarray
    table: pd.DataFrame
    labels: list[str]
    info: StoreInfo
    level: str

    @property
    def targets(self) -> np.ndarray:
        return self.table[self.labels].to_numpy(np.float32)

    def where(self, split: str) -> np.ndarray:
        return np.flatnonzero((self.table["split"] == split).to_numpy())

    def arrays(self) -> dict:
        """What the training workers need, as plain arrays (one ``ray.put``, read zero-copy by each)."""
        return {"vectors": self.vectors, "starts": self.starts, "lengths": self.lengths, "targets": self.targets,
                "train": self.where("train"), "val": self.where("val")}  # fmt: skip


def read_patch_store(uri: str) -> Embeddings:
    store = read_store(uri)
    if store.info.kind != "patches":
        raise StoreError(f"{uri}: an embedding store of {store.info.kind}, not of slide patches; run `medray embed` on wsi.patches")
    if store.task != "multi-label":
        raise MilError(f"{uri}: a {store.task} store; model.head abmil learns multi-label outputs (one sigmoid per label)")
    return store


def make_bags(store: Embeddings, level: str = "slide", uri: str = "the embedding store") -> Bags:
    """The store's patches as bags of one slide (keyed by its URI) or of one patient."""
    frame = store.frame
    key = frame["image"] if level == "slide" else frame["patient_id"]
    if (frame["split"].fillna("") == "").any():
        raise MilError(
            f"{uri}: patches without a split; extract them from a split slide manifest (medray extract-patches splits per patient)"
        )
    codes, keys = pd.factorize(key, sort=True)
    order = np.argsort(codes, kind="stable")
    frame = frame.iloc[order].reset_index(drop=True)
    frame["bag"] = codes[order]
    grouped = frame.groupby("bag", sort=True)
    table = grouped[store.labels].max()  # NaN only where every patch's label is unknown
    table.insert(0, "key", np.asarray(keys))
    table.insert(1, "patient_id", grouped["patient_id"].first())
    splits = grouped["split"].agg(["first", "nunique"])
    if (splits["nunique"] > 1).any():
        raise MilError(
            f"{uri}: {int((splits['nunique'] > 1).sum())} bags have patches in more than one split; split by patient before extracting"
        )
    table.insert(2, "split", splits["first"])
    assert_patient_disjoint(table)
    lengths = grouped.size().to_numpy()
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    vectors = np.ascontiguousarray(store.vectors[order], dtype=np.float16)
    return Bags(frame, vectors, starts, lengths, table.reset_index(drop=True), list(store.labels), store.info, level)


def sample(length: int, cap: int, seed: int, epoch: int, bag: int) -> np.ndarray:
    """The rows of bag ``bag`` (of ``length`` patches) that epoch ``epoch`` trains on: all of them up to
    ``cap``, else ``cap`` of them drawn afresh each epoch — the same draws for the same seed."""
    if length <= cap:
        return np.arange(length)
    return np.sort(np.random.default_rng([seed, epoch, bag]).choice(length, cap, replace=False))


def batch(vectors: np.ndarray, starts, rows: list[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags (each ``rows`` within its slice) → a zero-padded ``(B, N, D)`` float32 tensor and its mask."""
    longest = max(len(r) for r in rows)
    x = np.zeros((len(rows), longest, vectors.shape[1]), np.float32)
    mask = np.zeros((len(rows), longest), bool)
    for i, (start, r) in enumerate(zip(starts, rows)):
        x[i, : len(r)] = vectors[start + r]
        mask[i, : len(r)] = True
    return torch.from_numpy(x).to(device), torch.from_numpy(mask).to(device)


def predict(
    model: GatedAttentionMIL, vectors, starts, lengths, bags, device, patches: int = PREDICT_PATCHES
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sigmoid outputs ``(len(bags), L)`` of whole bags (every patch), and each bag's attention ``(n, L)``.

    Bags of similar size go through together, padded to at most ``patches`` patch slots per forward pass
    (one bag alone when it is larger): few passes for many small bags, bounded memory for large ones."""
    model.eval()
    n_labels = model.bias.shape[0]
    probs, attention = np.empty((len(bags), n_labels), np.float32), [None] * len(bags)
    order = np.argsort(lengths[bags], kind="stable")
    with torch.inference_mode():
        i = 0
        while i < len(order):
            j = i + 1  # sorted by size: the last bag of a group is its longest
            while j < len(order) and (j + 1 - i) * lengths[bags[order[j]]] <= patches:
                j += 1
            group = order[i:j]
            chosen = bags[group]
            x, mask = batch(vectors, starts[chosen], [np.arange(lengths[b]) for b in chosen], device)
            logits, weights = model(x, mask)
            probs[group] = torch.sigmoid(logits.float()).cpu().numpy()
            weights = weights.float().cpu().numpy()
            for k, (at, b) in enumerate(zip(group, chosen)):
                attention[at] = weights[k, : lengths[b]]
            i = j
    return probs, attention


def build(meta: dict) -> GatedAttentionMIL:
    return GatedAttentionMIL(meta["dim"], len(meta["labels"]), meta["hidden"], meta["attention"], meta["dropout"])


def checkpoint_meta(config, bags: Bags) -> dict:
    """What a checkpoint says about its MIL model: enough to rebuild it, and the store it expects."""
    m = config.mil
    return {"head": HEAD, "labels": bags.labels, "task": "multi-label", "level": bags.level, "dim": bags.info.dim,
            "hidden": m.hidden, "attention": m.attention, "dropout": m.dropout, "bag_size": m.bag_size,
            "embedding": asdict(bags.info)}  # fmt: skip


def load(uri: str) -> tuple[GatedAttentionMIL, dict]:
    """The MIL model of checkpoint ``uri`` (verified, ``weights_only``) in eval mode, and its metadata."""
    meta = checkpoint.read_meta(uri)
    if meta.get("head") != HEAD:
        raise MilError(f"{uri} is not an attention-MIL checkpoint (head {meta.get('head', 'backbone')}); use the run's abmil checkpoint")
    model = build(meta)
    model.load_state_dict(checkpoint.load_state(uri)["model"])
    meta["sha256"] = checkpoint.identity(uri)
    return model.eval(), meta


def check_store(meta: dict, info: StoreInfo, uri: str, checkpoint_uri: str) -> None:
    """Refuse a store embedded by another backbone than the one the checkpoint was trained on."""
    trained = StoreInfo(**meta["embedding"])
    if (trained.backbone, trained.weights_sha256, trained.dim) != (info.backbone, info.weights_sha256, info.dim):
        raise MilError(
            f"{uri} was embedded by {info.backbone} (dim {info.dim}) but {checkpoint_uri} was trained on {trained.backbone} "
            f"(dim {trained.dim}) embeddings: embed with the same backbone and weights"
        )
