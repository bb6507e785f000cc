"""Evaluation on the held-out test split, with thresholds and calibration chosen on the validation split.

What it computes, each in its own module: per-label metrics with patient-bootstrap intervals
(``metrics``, ``intervals``), PPV/NPV at deployment prevalence, calibration before and after the
calibration fitted on val (``calibration``), subgroups (``subgroups``), rater agreement and the metrics on
unanimous cases (``labels``), and an error gallery with Grad-CAM (``explain``). ``report.sections``
turns the result into the report and model card.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from medray.config import ConfigError, JobConfig
from medray.data import rows, splits
from medray.data.labels import agreement_summary
from medray.data.manifest import Manifest, read_manifest
from medray.evaluation import calibration, explain, intervals
from medray.evaluation.experts import consensus_check, rater_table
from medray.evaluation.levels import LEVELS, aggregate
from medray.evaluation.metrics import at_threshold, auroc, check_prevalence, label_table, single_label_summary
from medray.evaluation.predict import predict, prob_columns
from medray.evaluation.subgroups import subgroup_table
from medray.io import storage
from medray.training import checkpoint

log = logging.getLogger(__name__)
METADATA = ("patient_id", "study_id", "sex", "age", "view", "site")
VOTE_PREFIXES = ("agreement_", "votes_", "raters_")


@dataclass
class Evaluation:
    table: pd.DataFrame  # per label: metrics at the val threshold, with <metric>_lo / _hi intervals
    calibration: pd.DataFrame
    subgroups: pd.DataFrame
    agreement: pd.DataFrame
    unanimous: pd.DataFrame
    summary: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)
    levels: dict = field(default_factory=dict)  # "study" / "patient": the label table at that level
    experts: pd.DataFrame = field(default_factory=pd.DataFrame)  # per label and rater: the rater against the model
    consensus: pd.DataFrame = field(default_factory=pd.DataFrame)  # per label: majority vs Dawid–Skene against the reference

    @property
    def mean_auroc(self) -> float:
        return float(self.table["auroc"].mean())


def with_intervals(table: pd.DataFrame, test: pd.DataFrame, labels: list[str], resamples: int, seed: int) -> pd.DataFrame:
    """The table with 95 % patient-bootstrap intervals, and how many positive patients each rests on."""
    table = table.copy()
    for label in labels:
        table.loc[label, "positive_patients"] = test.loc[test[label] == 1, "patient_id"].nunique()
        ci = intervals.bootstrap_intervals(
            test[label], test[f"prob_{label}"], test["patient_id"], table.loc[label, "threshold"], resamples, seed
        )
        for metric, (lo, hi) in ci.items():
            table.loc[label, f"{metric}_lo"], table.loc[label, f"{metric}_hi"] = lo, hi
    return table


def calibration_table(task: str, labels, val, test, fit: bool, prior_shift, bins: int) -> tuple[pd.DataFrame, np.ndarray, calibration.Calibration | None]:
    """ECE per label on test before (and after) the calibration fitted on val (``val``/``test``: (targets,
    probabilities, patients)); the method each label kept and its out-of-fold val ECE."""
    (val_y, val_p, val_groups), (test_y, test_p, _) = val, test
    fitted, scores = calibration.fit(task, val_p, val_y, val_groups, prior_shift, bins) if fit else (None, None)
    calibrated = fitted.apply(test_p) if fitted else test_p
    rows_ = []
    for i, label in enumerate(labels):
        row = {"label": label, "ece_before": calibration.expected_calibration_error(test_y[:, i], test_p[:, i], bins)}
        if fitted:
            row["ece_after"] = calibration.expected_calibration_error(test_y[:, i], calibrated[:, i], bins)
            if task != "ordinal":  # ordinal outputs are "grade > k", not one per label
                row["method"] = fitted.methods[i]
                row["val_ece_before"] = scores[i].get("none", {}).get("ece", float("nan"))
                row["val_ece_after"] = scores[i].get(fitted.methods[i], {}).get("ece", float("nan"))
        rows_.append(row)
    return pd.DataFrame(rows_).set_index("label"), calibrated, fitted


def level_tables(task: str, labels: list[str], probs: list[str], val: pd.DataFrame, test: pd.DataFrame, e) -> dict[str, pd.DataFrame]:
    """The label table per study and/or per patient (``evaluate.levels``), thresholds chosen on val at the
    same level; a level the manifest cannot give (no ``study_id``) or the task does not suit is left out."""
    tables = {}
    for level in e.levels:
        if level == "image" or task != "multi-label" or any(key not in test for key in LEVELS[level]):
            continue
        v, t = (aggregate(frame, labels, probs, level) for frame in (val, test))
        if len(t) == len(test):  # one image per study: the image table already says it all
            continue
        table = label_table(labels, v[labels].to_numpy(float), v[probs].to_numpy(float), t[labels].to_numpy(float),
                            t[probs].to_numpy(float), e.threshold, e.threshold_target, e.deployment_prevalence)  # fmt: skip
        tables[level] = with_intervals(table, t, labels, e.bootstrap, e.seed)
    return tables


UNANIMOUS_COLUMNS = ["positives", "auroc", "auroc_lo", "auroc_hi", "sensitivity", "specificity"]


def unanimous_table(test: pd.DataFrame, labels: list[str], table: pd.DataFrame, resamples: int, seed: int) -> pd.DataFrame:
    """AUROC, sensitivity and specificity on all test images beside those the raters agreed on unanimously."""
    out = []
    for label in labels:
        if f"agreement_{label}" not in test:
            continue
        row = table.loc[label]  # all cases: already measured, intervals included
        out.append({"label": label, "cases": "all", "images": int(row["n"]), **{c: row[c] for c in UNANIMOUS_COLUMNS}})
        part = test[test[f"agreement_{label}"] == "unanimous"]
        y, p = part[label].to_numpy(float), part[f"prob_{label}"].to_numpy(float)
        lo, hi = intervals.bootstrap_intervals(y, p, part["patient_id"], row["threshold"], resamples, seed)["auroc"]
        counts = at_threshold(y, p, row["threshold"])
        out.append({"label": label, "cases": "unanimous", "images": int((~np.isnan(y)).sum()), "positives": int(np.nansum(y)),
                    "auroc": auroc(y, p), "auroc_lo": lo, "auroc_hi": hi,
                    "sensitivity": counts["sensitivity"], "specificity": counts["specificity"]})  # fmt: skip
    return pd.DataFrame(out)


def error_cases(test: pd.DataFrame, labels: list[str], table: pd.DataFrame, k: int) -> list[dict]:
    """Per label, the ``k`` most confident false positives and the ``k`` most confident false negatives."""
    cases = []
    for label in labels:
        threshold, p = table.loc[label, "threshold"], test[f"prob_{label}"]
        fp = test[(test[label] == 0) & (p >= threshold)].nlargest(k, f"prob_{label}")
        fn = test[(test[label] == 1) & (p < threshold)].nsmallest(k, f"prob_{label}")
        for kind, part in (("false positive", fp), ("false negative", fn)):
            cases += [{"label": label, "kind": kind, "image": r.image, "prob": getattr(r, f"prob_{label}")} for r in part.itertuples()]
    return cases


def gradcam_tiles(checkpoint_uri: str, cases: list[dict]) -> list[tuple[str, bytes]]:
    if not cases:
        return []
    explainer = explain.Explainer(checkpoint_uri)
    tiles = []
    for label in dict.fromkeys(c["label"] for c in cases):
        mine = [c for c in cases if c["label"] == label]
        pngs = explain.overlays(checkpoint_uri, [c["image"] for c in mine], label, explainer)
        tiles += [(f"{c['label']} {c['kind']}\np = {c['prob']:.2f}", png) for c, png in zip(mine, pngs)]
    return tiles


def read_raters(e, test: pd.DataFrame, labels: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each rater of ``evaluate.rater_votes`` against the model on the test images they read (experts.rater_table,
    with the raters' Dawid–Skene estimates), and how each consensus rule agrees with the reference (consensus_check)."""
    if not e.rater_votes:
        return pd.DataFrame(), pd.DataFrame()
    votes = pd.read_csv(io.BytesIO(storage.read_bytes(e.rater_votes)))
    missing = [c for c in (e.rater_image_column, e.rater_column) if c not in votes]
    if missing or not set(labels) & set(votes):
        raise ConfigError(f"evaluate.rater_votes {e.rater_votes}: needs the columns {e.rater_image_column!r}, {e.rater_column!r} "
                          f"and at least one label of {labels}; it has {list(votes.columns)[:20]}")  # fmt: skip
    table = rater_table(test, votes, labels, e.rater_image_column, e.rater_column, e.bootstrap, e.seed)
    rules, estimates = consensus_check(test, votes, labels, e.rater_image_column, e.rater_column)
    if len(table) and len(estimates):
        table = table.merge(estimates, on=["label", "rater"], how="left")
    return table, rules


def read_audit(run_dir: str) -> dict | None:
    """The leakage audit's result (``<run>/audit/audit.json``, written by ``medray audit``), if it ran."""
    uri = storage.join(run_dir, "audit", "audit.json")
    if not storage.exists(uri):
        return None
    audit = json.loads(storage.read_text(uri))
    if audit.get("thumbnails"):
        thumbnails = storage.join(run_dir, "audit", audit["thumbnails"])
        audit["thumbnails_png"] = storage.read_bytes(thumbnails) if storage.exists(thumbnails) else None
    return audit


@dataclass
class Scored:
    """What a model said about the held-out rows: the input of evaluation's core, whatever the model.

    ``frame`` holds the val and test rows that were scored: ``split``, ``patient_id``, the label columns,
    one ``prob_<label>`` each (raw outputs: calibration is fitted on val here) and whatever metadata the
    rows carry (``METADATA``, rater votes, ``image``). ``manifest`` is every row the model was trained and
    evaluated on, all splits (the split summary, the model card); ``source`` its URI, named in the report.
    ``gradcam``: the error gallery draws Grad-CAM overlays (image models; a head on embeddings sees no pixels)."""

    frame: pd.DataFrame
    manifest: Manifest
    source: str
    checkpoint: str
    failed: int = 0  # held-out rows that could not be scored (unreadable images, inputs that were not embedded)
    gradcam: bool = True


def evaluate(config: JobConfig) -> Evaluation:
    """Evaluate the run's best checkpoint on the held-out images (slides and heads: ``medray.jobs.evaluate``)."""
    e = config.evaluate
    checkpoint_uri = checkpoint.resolve(e.checkpoint, config.run_dir)
    manifest = read_manifest(config.manifest)
    if config.data.fold is not None:  # thresholds on the fold the model was validated on
        manifest.frame = splits.fold_view(manifest.frame, config.data.fold)
    labels = manifest.labels
    checkpoint.check_fits(checkpoint_uri, labels, manifest.task, config.manifest)  # before the slow part
    check_prevalence(labels, e.deployment_prevalence)
    frame = manifest.frame
    columns = ["image", "split", *labels, *(c for c in frame if c in METADATA or c.startswith(VOTE_PREFIXES))]
    held_out = frame[frame["split"].isin(["val", "test"])][columns]
    # Raw outputs: calibration is fitted here, so an existing calibration.json must not be applied first.
    scored = predict(rows(held_out), checkpoint_uri, e.batch_size, calibrated=False).to_pandas()
    failed = int((scored["error"] != "").sum())
    return evaluate_scored(config, Scored(scored[scored["error"] == ""], manifest, config.manifest, checkpoint_uri, failed))


def evaluate_scored(config: JobConfig, scored: Scored) -> Evaluation:
    """Evaluation's core, from the held-out rows' scores on: metrics at thresholds chosen on val, patient-bootstrap
    intervals, levels, calibration fitted on val (written to the checkpoint), subgroups, raters, report and model card."""
    # The report imports matplotlib: only when writing one.
    from medray.evaluation.report.sections import build_report

    e, manifest, checkpoint_uri = config.evaluate, scored.manifest, scored.checkpoint
    labels, task = manifest.labels, manifest.task
    probs = prob_columns(labels)
    check_prevalence(labels, e.deployment_prevalence)
    frame = scored.frame.reset_index(drop=True)
    val, test = frame[frame["split"] == "val"], frame[frame["split"] == "test"].reset_index(drop=True)
    val_y, val_p, test_y, test_p = (f[c].to_numpy(dtype=float) for f in (val, test) for c in (labels, probs))
    log.info("evaluating %d test rows of %d patients (%d resamples)", len(test), test["patient_id"].nunique(), e.bootstrap)

    table = label_table(labels, val_y, val_p, test_y, test_p, e.threshold, e.threshold_target, e.deployment_prevalence)
    table = with_intervals(table, test, labels, e.bootstrap, e.seed)
    by_level = level_tables(task, labels, probs, val, test, e)
    summary = single_label_summary(task, test_y, test_p) if task != "multi-label" else {}
    shift = checkpoint.read_meta(checkpoint_uri).get("prior_shift")  # absent from checkpoints before it was recorded
    calib, calibrated, fitted = calibration_table(
        task, labels, (val_y, val_p, val["patient_id"].to_numpy()), (test_y, test_p, None), e.calibrate, shift, e.calibration_bins
    )
    if fitted is not None:
        calib.attrs["file"] = calibration.save(checkpoint_uri, fitted)
    subgroups = subgroup_table(test, labels, probs, table, e.bootstrap, e.seed, e.subgroup_min_cases)
    agreement = agreement_summary(test, labels)
    unanimous = unanimous_table(test, labels, table, e.bootstrap, e.seed)
    tiles = gradcam_tiles(checkpoint_uri, error_cases(test, labels, table, e.gallery)) if scored.gradcam else None
    experts, consensus_rules = read_raters(e, test, labels)

    out_dir = storage.join(config.run_dir, "evaluation")
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    storage.write_bytes(storage.join(out_dir, "predictions.parquet"), buffer.getvalue())
    result = Evaluation(table, calib, subgroups, agreement, unanimous, summary, levels=by_level, experts=experts, consensus=consensus_rules)
    paths = build_report(
        out_dir, config, manifest, result, checkpoint_uri, splits.summary(manifest.frame, labels), test_y, test_p,
        calibrated, tiles, read_audit(config.run_dir), scored.failed, source=scored.source,
    )  # fmt: skip
    paths["predictions"] = storage.join(out_dir, "predictions.parquet")
    result.paths = paths
    return result
