"""Slide-level evaluation: patch scores aggregated per slide, the metrics medray reports, and heatmaps.

A pathologist decides per slide, so that is where medray measures: each held-out slide's patch
probabilities are pooled (mean, max or the mean of the top k), and the slide-level scores go
through the same metrics as images do (``medray.evaluation.metrics.label_table``: thresholds chosen on the
validation slides, applied unchanged to the test slides). The report shows each test slide's
thumbnail with its patch scores laid over it.
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import pandas as pd
import ray

from medray.config import JobConfig
from medray.data import splits
from medray.data.patches import patch_labels, shard_uris
from medray.evaluation.metrics import auroc, check_prevalence, label_table
from medray.evaluation.predict import predict, prob_columns
from medray.evaluation.report import Figure, Section, plots, write_report
from medray.io import storage
from medray.io.figures import plt, png
from medray.training import checkpoint
from medray.wsi.extract import read_thumbnail

log = logging.getLogger(__name__)
HEATMAPS_SHOWN = 12


def aggregate(scores: pd.Series, how: str = "mean", k: int = 5) -> float:
    """One slide's patch scores → its slide score: ``mean``, ``max`` or ``topk`` (mean of the k highest)."""
    values = np.sort(scores.dropna().to_numpy(float))[::-1]
    if not len(values):
        return float("nan")
    if how == "mean":
        return float(values.mean())
    if how == "max":
        return float(values[0])
    if how == "topk":
        return float(values[:k].mean())
    raise ValueError(f"unknown aggregate {how!r}: use mean, max or topk")


def slide_scores(patch_scores: pd.DataFrame, prob_columns: list[str], how: str = "mean", k: int = 5) -> pd.DataFrame:
    """One row per slide (``image``) with each probability column aggregated over its patches."""
    return patch_scores.groupby("image")[prob_columns].agg(lambda s: aggregate(s, how, k))


def _held_out(batch: dict) -> dict:
    keep = np.isin(batch["split"], ["val", "test"])
    return {k: v[keep] for k, v in batch.items()}


def predict_patches(patches: str, checkpoint_uri: str, batch_size: int = 64) -> pd.DataFrame:
    """Raw probabilities for every val and test patch, with its slide and position."""
    fs, _ = storage.filesystem(patches)
    paths = [storage.filesystem(u)[1] for u in shard_uris(patches)]
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=["image", "split", "x", "y", "size", "patch"])
    return predict(ds.map_batches(_held_out), checkpoint_uri, batch_size, calibrated=False, encoded="patch").to_pandas()


def heatmap(thumbnail: np.ndarray, downsample: float, patches: pd.DataFrame, column: str, ax):
    """The slide's thumbnail with each patch's score drawn over it (0 blue … 1 red)."""
    scores = np.full(thumbnail.shape[:2], np.nan, np.float32)
    for x, y, size, p in patches[["x", "y", "size", column]].itertuples(index=False):
        x0, y0 = int(x / downsample), int(y / downsample)
        x1, y1 = max(x0 + 1, math.ceil((x + size) / downsample)), max(y0 + 1, math.ceil((y + size) / downsample))
        scores[y0:y1, x0:x1] = p
    ax.imshow(thumbnail)
    shown = ax.imshow(np.ma.masked_invalid(scores), cmap="coolwarm", vmin=0, vmax=1, alpha=0.55, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    return shown


def heatmaps_png(slides: pd.DataFrame, scored: pd.DataFrame, patches: str, column: str, label: str) -> bytes:
    """One panel per slide (at most ``HEATMAPS_SHOWN``), titled with its label and slide score."""
    shown = slides.head(HEATMAPS_SHOWN)
    cols = min(4, max(len(shown), 1))
    rows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.2 * rows), squeeze=False)
    image = None
    for ax, (uri, row) in zip(axes.flat, shown.iterrows()):
        thumb = read_thumbnail(patches, uri)
        if thumb is None:  # the extraction folder lost it: the panel says so, the report still comes
            ax.set_title(f"{row['slide_id']}: no thumbnail under {patches}", fontsize=8)
            ax.axis("off")
            continue
        image = heatmap(thumb, float(row["thumb_downsample"]), scored[scored["image"] == uri], column, ax)
        truth = "?" if pd.isna(row[label]) else int(row[label])
        ax.set_title(f"{row['slide_id']}  {label}={truth}  score {row[column]:.2f}", fontsize=9)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label=f"patch P({label})")
    fig.suptitle(f"Patch scores over the test slides ({len(shown)} of {len(slides)} shown)")
    return png(fig)


def _write_parquet(frame: pd.DataFrame, uri: str) -> None:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    storage.write_bytes(uri, buffer.getvalue())


def evaluate_slides(config: JobConfig):
    """Score the held-out patches, pool them per slide, and report slide-level metrics and heatmaps."""
    from medray.evaluation.evaluate import Evaluation, with_intervals

    patches, w = config.wsi.patches, config.wsi
    checkpoint_uri = checkpoint.resolve(config.evaluate.checkpoint, config.run_dir)
    labels = patch_labels(patches)
    probs = prob_columns(labels)
    slides = pd.read_parquet(io.BytesIO(storage.read_bytes(storage.join(patches, "slides.parquet"))))
    scored = predict_patches(patches, checkpoint_uri, config.evaluate.batch_size)
    per_slide = slide_scores(scored, probs, w.aggregate, w.top_k)
    held = slides[slides["split"].isin(["val", "test"])].set_index("image").join(per_slide)
    unscored = held[held[probs[0]].isna()]
    held = held[held[probs[0]].notna()]
    val, test = held[held["split"] == "val"], held[held["split"] == "test"]
    val_y, val_p, test_y, test_p = (f[c].to_numpy(dtype=float) for f in (val, test) for c in (labels, probs))
    e = config.evaluate
    check_prevalence(labels, e.deployment_prevalence)
    table = label_table(labels, val_y, val_p, test_y, test_p, e.threshold, e.threshold_target, e.deployment_prevalence)

    out_dir = storage.join(config.run_dir, "slide_evaluation")
    _write_parquet(
        held.reset_index()[["image", "slide_id", "patient_id", "split", *labels, *probs]],
        storage.join(out_dir, "slide_predictions.parquet"),
    )
    _write_parquet(scored, storage.join(out_dir, "patch_predictions.parquet"))
    aggregation = {"mean": "the mean", "max": "the maximum", "topk": f"the mean of the {w.top_k} highest"}[w.aggregate]
    notes = [
        f"Checkpoint: {checkpoint_uri}",
        (
            f"Rows are slides: each slide's score is {aggregation} of its patch probabilities "
            f"({len(scored)} held-out patches, {int((scored['split'] == 'test').sum())} on the test slides)."
        ),
    ]
    test_patches = scored[scored["split"] == "test"].merge(slides[["image", *labels]], on="image", suffixes=("", "_slide"))
    for label in labels:
        notes.append(
            f"Patch-level test AUROC for {label}, each patch given its slide's label: {auroc(test_patches[label], test_patches[f'prob_{label}']):.3f}."
        )
    notes.append(
        f"Thresholds chosen on the validation slides by {e.threshold}"
        + (f" (target {e.threshold_target})" if e.threshold != "youden" else "")
        + ". Calibration and subgroups are not computed per slide: the pooled slide scores are not probabilities."
    )
    if len(unscored):
        notes.append(f"{len(unscored)} held-out slides have no patches (no tissue found, or unreadable) and are not in these metrics.")
    table = with_intervals(table, test.reset_index(), labels, config.evaluate.bootstrap, config.evaluate.seed)
    summary = splits.summary(slides, labels).rename(columns={"images": "slides"})
    sections = [
        Section("Data and splits", "data", [summary]),
        Section(
            "Slide-level metrics",
            "metrics",
            [notes, table.round(3), Figure("roc.png", plots.roc_curves(test_y, test_p, table), "ROC curves on the test slides")],
        ),
        Section(
            "Patch-score heatmaps",
            "heatmaps",
            [
                Figure(
                    "heatmaps.png",
                    heatmaps_png(test, scored, patches, probs[0], labels[0]),
                    f"Patch P({labels[0]}) over each test slide's thumbnail",
                )
            ],
        ),
    ]
    metrics = {"labels": table.to_dict(orient="index"), "checkpoint": checkpoint_uri, "aggregate": w.aggregate}
    paths = write_report(out_dir, f"medray slide-level evaluation — {config.name}", sections, metrics)
    paths["predictions"] = storage.join(out_dir, "slide_predictions.parquet")
    empty = pd.DataFrame()
    return Evaluation(table, empty, empty, empty, empty, paths=paths)
