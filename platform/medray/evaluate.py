"""Evaluation on the held-out test split, with thresholds chosen on the validation split."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import pandas as pd

from medray import checkpoint, splits, storage
from medray.config import JobConfig
from medray.data import rows
from medray.manifest import read_manifest
from medray.metrics import label_table
from medray.predict import predict, prob_columns
from medray.report import plots, write_report

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    table: pd.DataFrame
    paths: dict[str, str]

    @property
    def mean_auroc(self) -> float:
        return float(self.table["auroc"].mean())


def evaluate(config: JobConfig) -> Evaluation:
    checkpoint_uri = checkpoint.resolve(config.evaluate.checkpoint, config.run_dir)
    manifest = read_manifest(config.manifest)
    if config.data.fold is not None:  # thresholds on the fold the model was validated on
        manifest.frame = splits.fold_view(manifest.frame, config.data.fold)
    labels = manifest.labels
    held_out = manifest.frame[manifest.frame["split"].isin(["val", "test"])][["image", "split", *labels]]
    scored = predict(rows(held_out), checkpoint_uri, config.evaluate.batch_size).to_pandas()

    failed = scored[scored["error"] != ""]
    scored = scored[scored["error"] == ""]
    val, test = scored[scored["split"] == "val"], scored[scored["split"] == "test"]
    probs = prob_columns(labels)
    val_y, val_p, test_y, test_p = (f[c].to_numpy(dtype=float) for f in (val, test) for c in (labels, probs))
    table = label_table(labels, val_y, val_p, test_y, test_p)

    out_dir = storage.join(config.run_dir, "evaluation")
    buffer = io.BytesIO()
    scored.to_parquet(buffer, index=False)
    storage.write_bytes(storage.join(out_dir, "predictions.parquet"), buffer.getvalue())
    notes = [f"Checkpoint: {checkpoint_uri}"]
    if len(failed):
        notes.append(f"{len(failed)} held-out images could not be decoded and are not in these metrics.")
    roc = plots.roc_curves(test_y, test_p, table)
    paths = write_report(out_dir, f"medray evaluation — {config.name}", table, splits.summary(manifest.frame, labels), notes, roc)
    paths["predictions"] = storage.join(out_dir, "predictions.parquet")
    return Evaluation(table, paths)
