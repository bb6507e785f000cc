"""Figures for the report, as PNG bytes (matplotlib, headless)."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve, roc_curve

from medray.io.figures import plt, png


def roc_curves(targets: np.ndarray, probs: np.ndarray, table: pd.DataFrame, raters: pd.DataFrame | None = None) -> bytes:
    """One ROC panel per label, with the operating point at the threshold chosen on val and, where given,
    each rater's operating point (``experts.rater_table``)."""
    labels = list(table.index)
    cols = min(len(labels), 4)
    rows = math.ceil(len(labels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.4 * rows), squeeze=False)
    for ax, (i, label) in zip(axes.flat, enumerate(labels)):
        keep = ~np.isnan(targets[:, i]) & ~np.isnan(probs[:, i])
        y, p = targets[keep, i], probs[keep, i]
        ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
        if len(np.unique(y)) == 2:
            fpr, tpr, _ = roc_curve(y, p)
            ax.plot(fpr, tpr, lw=2)
            row = table.loc[label]
            ax.plot(1 - row["specificity"], row["sensitivity"], "o", c="crimson", label="val threshold")
            readers = raters[raters["label"] == label] if raters is not None and len(raters) else []
            for k, reader in enumerate(readers.itertuples() if len(readers) else []):
                ax.plot(1 - reader.specificity, reader.sensitivity, "^", c="darkorange", ms=7, label="raters" if k == 0 else None)
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{label}  AUROC {table.loc[label, 'auroc']:.3f}", fontsize=10)
        ax.set_xlabel("1 − specificity")
        ax.set_ylabel("sensitivity")
        ax.set_aspect("equal")
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.suptitle(f"ROC curves on the test split (n = {len(targets)})")
    return png(fig)


def metric_by_dimension(table: pd.DataFrame, dimensions: list[str], metric: str) -> bytes:
    """One panel per searched dimension: every trial's metric against the value it drew."""
    fig, axes = plt.subplots(1, len(dimensions), figsize=(3.6 * len(dimensions), 3.2), squeeze=False)
    for ax, dimension in zip(axes.flat, dimensions):
        values = table[dimension]
        if pd.api.types.is_numeric_dtype(values):
            ax.scatter(values, table[metric])
            if dimension.endswith("lr"):
                ax.set_xscale("log")
        else:
            categories = sorted(values.astype(str).unique())
            ax.scatter([categories.index(v) for v in values.astype(str)], table[metric])
            ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
        ax.set_xlabel(dimension)
        ax.set_ylabel(metric)
    fig.suptitle(f"{metric} by searched dimension ({len(table)} trials)")
    return png(fig)


def _panels(n: int, size: float = 3.4):
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return fig, list(axes.flat)[:n]


def pr_curves(targets: np.ndarray, probs: np.ndarray, table: pd.DataFrame) -> bytes:
    """One precision-recall panel per label; the dotted line is the test prevalence (a random model)."""
    labels = list(table.index)
    fig, axes = _panels(len(labels))
    for ax, (i, label) in zip(axes, enumerate(labels)):
        keep = ~np.isnan(targets[:, i]) & ~np.isnan(probs[:, i])
        y, p = targets[keep, i], probs[keep, i]
        if len(np.unique(y)) == 2:
            precision, recall, _ = precision_recall_curve(y, p)
            ax.plot(recall, precision, lw=2)
            ax.axhline(y.mean(), ls=":", c="grey", lw=1)
            row = table.loc[label]
            ax.plot(row["sensitivity"], row["ppv"], "o", c="crimson", label="val threshold")
            ax.legend(loc="lower left", fontsize=8)
        ax.set_title(f"{label}  AUPRC {table.loc[label, 'auprc']:.3f}", fontsize=10)
        ax.set_xlabel("recall (sensitivity)")
        ax.set_ylabel("precision (PPV)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
    fig.suptitle(f"Precision-recall curves on the test split (n = {len(targets)})")
    return png(fig)


def reliability_diagrams(curves: dict[str, list[tuple[str, pd.DataFrame, float]]], title: str = "Reliability on the test split") -> bytes:
    """Per label, observed positive rate against mean predicted probability per bin, for each
    variant (before/after calibration); marker area follows the bin's image count."""
    fig, axes = _panels(len(curves))
    for ax, (label, variants) in zip(axes, curves.items()):
        ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
        for name, table, ece in variants:
            shown = table[table["count"] > 0]
            ax.plot(shown["predicted"], shown["observed"], marker="o", lw=1.5, label=f"{name} (ECE {ece:.3f})")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("observed positive rate")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.legend(loc="upper left", fontsize=7)
    fig.suptitle(title)
    return png(fig)


def subgroup_forest(table: pd.DataFrame, overall: pd.DataFrame) -> bytes:
    """AUROC with its interval per subgroup, one panel per label; the band is the overall interval.
    Flagged groups are red, small groups hollow."""
    labels = list(overall.index)
    groups = table.drop_duplicates(["dimension", "group"])[["dimension", "group"]]
    fig, axes = plt.subplots(1, len(labels), figsize=(3.2 * len(labels), 0.35 * len(groups) + 1.4), squeeze=False, sharey=True)
    names = [f"{d}: {g}" for d, g in groups.itertuples(index=False)]
    for ax, label in zip(axes.flat, labels):
        rows = table[table["label"] == label].set_index(["dimension", "group"]).reindex(list(groups.itertuples(index=False)))
        ax.axvspan(overall.loc[label, "auroc_lo"], overall.loc[label, "auroc_hi"], color="lightblue", alpha=0.5)
        for k, row in enumerate(rows.itertuples()):
            colour = "crimson" if row.below_overall else "black"
            ax.plot([row.auroc_lo, row.auroc_hi], [k, k], c=colour, lw=1.5)
            ax.plot(row.auroc, k, "o", c=colour, mfc="white" if row.small else colour)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("AUROC (95 % CI)")
    fig.suptitle("Subgroup AUROC (band: overall 95 % CI; hollow: small group; red: wholly below overall)")
    return png(fig)


def gallery(tiles: list[tuple[str, bytes]], columns: int = 6) -> bytes:
    """A grid of PNG tiles (e.g. Grad-CAM overlays), each with its caption."""
    from PIL import Image

    rows = max(1, math.ceil(len(tiles) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (caption, tile) in zip(axes.flat, tiles):
        ax.imshow(np.asarray(Image.open(io.BytesIO(tile))))
        ax.set_title(caption, fontsize=7)
    return png(fig)
