"""Figures for the report, as PNG bytes (matplotlib, headless)."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def roc_curves(targets: np.ndarray, probs: np.ndarray, table: pd.DataFrame) -> bytes:
    """One ROC panel per label, with the operating point at the threshold chosen on val."""
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
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{label}  AUROC {table.loc[label, 'auroc']:.3f}", fontsize=10)
        ax.set_xlabel("1 − specificity")
        ax.set_ylabel("sensitivity")
        ax.set_aspect("equal")
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    fig.suptitle(f"ROC curves on the test split (n = {len(targets)})")
    return _png(fig)


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
    return _png(fig)
