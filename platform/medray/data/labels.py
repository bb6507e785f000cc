"""Consensus ground truth from rater votes, and how far the raters agreed.

Votes come as one row per (image, rater) with a 0/1 column per label (NaN: the rater gave no
opinion), e.g. the demo's ``rater_votes.csv``. Per image and label:

- the **consensus** is the majority of the votes cast, or (``method="dawid-skene"``) the label whose
  posterior is highest when each rater's vote is weighed by their estimated sensitivity and specificity;
- the **tie rule**: with an even number of votes split evenly there is no majority, and the label
  becomes unknown (NaN: masked out of the loss and the metrics) unless ``tie`` says to count ties as
  positive (a screening reading: a finding half the raters saw is followed up) or negative;
- the **agreement** is ``unanimous`` (all votes equal), ``majority`` or ``tie``;
- the counts of positive votes and of votes cast are kept (``votes_<label>``, ``raters_<label>``),
  so that Fleiss' kappa can be recomputed on any subset of images (e.g. the test split) later.

Agreement beyond chance: Fleiss' kappa per label for any number of raters (Fleiss 1971), and
Cohen's kappa (scikit-learn) for each pair of raters.
"""

from __future__ import annotations

import itertools
import posixpath

import numpy as np
import pandas as pd
from sklearn.metrics import cohen_kappa_score

from medray.data.manifest import Manifest

TIE_RULES = ("unknown", "positive", "negative")
CONSENSUS_METHODS = ("majority", "dawid-skene")


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa from an ``(items, categories)`` table of how many raters chose each category.

    Items with fewer than two ratings carry no information on agreement and are left out; the
    remaining items may have different numbers of raters (each item's agreement is taken over its
    own rater pairs). NaN where chance agreement is already perfect (one category only)."""
    counts = np.asarray(counts, float)
    n = counts.sum(axis=1)
    counts, n = counts[n >= 2], n[n >= 2]
    if len(counts) == 0:
        return float("nan")
    agreement = ((counts * (counts - 1)).sum(axis=1) / (n * (n - 1))).mean()
    shares = counts.sum(axis=0) / counts.sum()
    chance = float((shares**2).sum())
    return float((agreement - chance) / (1 - chance)) if chance < 1 else float("nan")


def fleiss_from_votes(positive_votes, raters) -> float:
    """Fleiss' kappa of a binary label from per-image positive-vote and vote counts."""
    positive, total = np.asarray(positive_votes, float), np.asarray(raters, float)
    keep = ~np.isnan(positive) & ~np.isnan(total)
    return fleiss_kappa(np.stack([positive[keep], total[keep] - positive[keep]], axis=1))


def consensus(votes: pd.DataFrame, labels: list[str], image: str = "Image Index", rater: str = "Rater", tie: str = "unknown",
              method: str = "majority") -> pd.DataFrame:
    """One row per image (indexed by the ``image`` key): consensus label, agreement and vote counts.

    ``method``: ``majority`` (with the ``tie`` rule) or ``dawid-skene``, the label a posterior of 0.5 or
    more under ``dawid_skene``, which also adds the posterior itself (``posterior_<label>``, a soft label)."""
    if tie not in TIE_RULES:
        raise ValueError(f"unknown tie rule {tie!r}; known: {', '.join(TIE_RULES)}")
    if method not in CONSENSUS_METHODS:
        raise ValueError(f"unknown consensus method {method!r}; known: {', '.join(CONSENSUS_METHODS)}")
    missing = [c for c in (image, rater, *labels) if c not in votes]
    if missing:
        raise ValueError(f"rater votes: missing column(s) {missing}; found {list(votes.columns)}")
    for label in labels:
        bad = set(votes[label].dropna().unique()) - {0, 1}
        if bad:
            raise ValueError(f"rater votes: column {label!r} holds values other than 0, 1 and blank")
    grouped = votes.groupby(image)
    out = {}
    for label in labels:
        positive, cast = grouped[label].sum(min_count=1).fillna(0), grouped[label].count()
        negative = cast - positive
        value = np.where(positive > negative, 1.0, np.where(positive < negative, 0.0, np.nan))
        tied = (positive == negative) & (cast > 0)
        value[tied.to_numpy()] = {"unknown": np.nan, "positive": 1.0, "negative": 0.0}[tie]
        value[(cast == 0).to_numpy()] = np.nan
        agreement = np.where(tied, "tie", np.where((positive == 0) | (negative == 0), "unanimous", "majority"))
        agreement[(cast == 0).to_numpy()] = "none"
        if method == "dawid-skene":
            posterior = dawid_skene(votes, label, image, rater)[0].reindex(positive.index)
            value = np.where(posterior.isna(), np.nan, (posterior >= 0.5).astype(float))
            out[f"posterior_{label}"] = posterior.to_numpy()
        out[label] = value
        out[f"agreement_{label}"] = agreement
        out[f"votes_{label}"] = positive.to_numpy()
        out[f"raters_{label}"] = cast.to_numpy()
    return pd.DataFrame(out, index=grouped.size().index)


def dawid_skene(votes: pd.DataFrame, label: str, image: str = "Image Index", rater: str = "Rater",
                iterations: int = 200, tolerance: float = 1e-8) -> tuple[pd.Series, pd.DataFrame]:
    """Each rater's sensitivity and specificity for ``label`` and each image's posterior probability of a
    positive, estimated together by EM (Dawid & Skene 1979, binary case) from the votes alone.

    A majority vote counts every rater alike; here a rater who rarely misses a finding, or rarely calls one
    that is not there, weighs more: an image's log-odds are the prevalence's plus, per vote, log(se/(1−sp))
    for a positive and log((1−se)/sp) for a negative. Starts from the share of positive votes.
    Returns the posterior per image (indexed by ``image``) and a table per rater: sensitivity,
    specificity, images rated."""
    cast = votes[[image, rater, label]].dropna(subset=[label])
    wide = cast.pivot_table(index=image, columns=rater, values=label, aggfunc="first")
    v = wide.to_numpy(float)  # images × raters, NaN where a rater gave no vote
    rated = ~np.isnan(v)
    v0 = np.nan_to_num(v)
    posterior = np.nanmean(v, axis=1)
    clip = (1e-3, 1 - 1e-3)
    for _ in range(iterations):
        t = posterior[:, None]
        prevalence = float(np.clip(posterior.mean(), *clip))
        sensitivity = np.clip((t * v0 * rated).sum(0) / np.maximum((t * rated).sum(0), 1e-12), *clip)
        specificity = np.clip(((1 - t) * (1 - v0) * rated).sum(0) / np.maximum(((1 - t) * rated).sum(0), 1e-12), *clip)
        positive = np.log(sensitivity / (1 - specificity))
        negative = np.log((1 - sensitivity) / specificity)
        log_odds = np.log(prevalence / (1 - prevalence)) + (rated * (v0 * positive + (1 - v0) * negative)).sum(axis=1)
        updated = 1 / (1 + np.exp(-log_odds))
        done = np.abs(updated - posterior).max() < tolerance
        posterior = updated
        if done:
            break
    raters = pd.DataFrame({"sensitivity": sensitivity, "specificity": specificity, "images": rated.sum(0)}, index=wide.columns)
    return pd.Series(posterior, index=wide.index, name=f"posterior_{label}"), raters


def cohen_pairs(votes: pd.DataFrame, labels: list[str], image: str = "Image Index", rater: str = "Rater") -> pd.DataFrame:
    """Cohen's kappa of every pair of raters per label, on the images both rated."""
    rows = []
    for label in labels:
        wide = votes.pivot_table(index=image, columns=rater, values=label, aggfunc="first")
        for a, b in itertools.combinations(wide.columns, 2):
            both = wide[[a, b]].dropna()
            kappa = cohen_kappa_score(both[a], both[b]) if len(both) and both.nunique().max() > 1 else float("nan")
            rows.append({"label": label, "rater_a": a, "rater_b": b, "images": len(both), "cohen_kappa": float(kappa)})
    return pd.DataFrame(rows)


def agreement_summary(frame: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """Per label: images with votes, the shares unanimous / majority / tie, and Fleiss' kappa."""
    rows = []
    for label in labels:
        if f"agreement_{label}" not in frame:
            continue
        agreement = frame[f"agreement_{label}"]
        rated = agreement[agreement.isin(["unanimous", "majority", "tie"])]
        row = {"label": label, "images rated": len(rated)}
        for kind in ("unanimous", "majority", "tie"):
            row[kind] = float((rated == kind).mean()) if len(rated) else float("nan")
        row["fleiss_kappa"] = fleiss_from_votes(frame[f"votes_{label}"], frame[f"raters_{label}"])
        rows.append(row)
    return pd.DataFrame(rows).set_index("label") if rows else pd.DataFrame()


def attach(manifest: Manifest, votes: pd.DataFrame, image: str = "Image Index", rater: str = "Rater", tie: str = "unknown",
           replace_labels: bool = True, method: str = "majority") -> Manifest:
    """The manifest with consensus, agreement and vote counts joined on the image's file name.

    With ``replace_labels`` the consensus becomes the label (images without votes keep theirs);
    otherwise the labels stay and only the agreement columns are added."""
    labels = [label for label in manifest.labels if label in votes]
    if not labels:
        raise ValueError(f"rater votes hold none of the manifest's labels {manifest.labels}")
    table = consensus(votes, labels, image, rater, tie, method)
    table.index = [posixpath.basename(str(key)) for key in table.index]
    keys = manifest.frame["image"].map(lambda uri: posixpath.basename(str(uri)))
    joined = table.reindex(keys.to_numpy())
    frame = manifest.frame.copy()
    for label in labels:
        for column in (f"agreement_{label}", f"votes_{label}", f"raters_{label}", f"posterior_{label}"):
            if column in joined:
                frame[column] = joined[column].to_numpy()
        frame[f"agreement_{label}"] = frame[f"agreement_{label}"].fillna("none")
        if replace_labels:
            has_votes = joined[f"raters_{label}"].fillna(0).to_numpy() > 0
            frame.loc[has_votes, label] = joined[label].to_numpy()[has_votes]
    return Manifest(frame, manifest.labels, manifest.task)
