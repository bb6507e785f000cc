"""External validation: the frozen model on another site's images, beside the run's own test split.

Nothing is refitted on the new site. The thresholds are the ones chosen on the run's validation split
and the calibration is the checkpoint's ``calibration.json``, applied as evaluation applies it; what a
hospital needs to know is how the model it would receive behaves on its images, not how a model re-tuned
on them would.

- **Which rows.** A site manifest with a ``split`` column and ``test`` rows contributes its test rows only
  (the others may have been used to adapt something, and the run's own manifest then gives the control:
  its test split against itself); otherwise every row. ``external.json`` says which.
- **Internal figures.** Read from the run's evaluation (``evaluation/metrics.json`` and the raw
  ``predictions.parquet`` beside it) when it evaluated the same checkpoint; otherwise computed here on the
  run's manifest as ``medray evaluate`` does (val thresholds, raw outputs), without writing anything there.
- **Discrimination.** AUROC per site with a patient-bootstrap interval; the difference by DeLong's test for
  two independent AUROCs (``intervals.delong_unpaired``: images as the unit, as ``medray compare``) and by
  independent patient bootstraps of the two sites (patients as the unit, the stricter of the two when
  patients have many images).
- **Operating point.** Sensitivity, specificity, PPV and NPV at the frozen thresholds; PPV and NPV at each
  site's own prevalence, which is what its clinicians would see. Thresholds were chosen on the raw outputs,
  so these are measured on raw outputs, as in the evaluation report.
- **Calibration.** On the calibrated probabilities (what scoring reports): calibration-in-the-large (mean
  predicted − observed rate, with a patient-bootstrap interval, and the logistic intercept with slope fixed
  at 1), the calibration slope and ECE, per site.
- **Subgroups.** ``subgroups.subgroup_table`` on each site; a group present at both sites gets the unpaired
  DeLong test of its AUROCs.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from medray.config import ConfigError, JobConfig
from medray.data import rows, splits
from medray.data.manifest import read_manifest
from medray.evaluation import calibration, intervals
from medray.evaluation.evaluate import METADATA, with_intervals
from medray.evaluation.metrics import at_threshold, auprc, auroc, label_table
from medray.evaluation.predict import predict, prob_columns
from medray.evaluation.subgroups import dimensions, subgroup_table
from medray.io import storage
from medray.training import checkpoint
from medray.training.losses import head_size

log = logging.getLogger(__name__)
ALPHA = 0.05  # a label or subgroup "moved" when its difference is significant at this level
# Miscalibrated in the large: the interval of mean predicted − observed excludes 0 *and* the gap is at least this.
# A model whose outputs sit near 0 and 1 has a bootstrap interval like [0.00001, 0.00003]: beyond chance, of no
# clinical weight, and flagging it would make every confident model "move".
CITL_TOLERANCE = 0.01
SHOWN_METRICS = ("sensitivity", "specificity", "ppv", "npv")


@dataclass
class Site:
    """One site's scored images (raw ``prob_<label>`` columns), their calibrated probabilities, and its
    per-label table at the frozen thresholds (with ``<metric>_lo`` / ``_hi`` patient-bootstrap intervals)."""

    name: str
    frame: pd.DataFrame
    calibrated: np.ndarray
    table: pd.DataFrame
    source: str = ""  # where the figures came from


@dataclass
class ExternalValidation:
    table: pd.DataFrame  # per label: both sites side by side, the differences and what moved
    subgroups: pd.DataFrame  # per dimension, group and label: the external site beside the internal one
    summary: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)


def default_name(manifest_uri: str) -> str:
    """The manifest's file stem, made safe as a folder name."""
    stem = posixpath.basename(manifest_uri.rstrip("/")).split(".")[0]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip("._-") or "external"


def external_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The rows validated, and which: the test split of a split manifest, else every row."""
    if "split" in frame and (frame["split"] == "test").any():
        return frame[frame["split"] == "test"].reset_index(drop=True), "the test split of the site's manifest"
    return frame.reset_index(drop=True), "every row of the site's manifest"


def frozen_table(frame: pd.DataFrame, labels: list[str], thresholds: dict[str, float], resamples: int, seed: int) -> pd.DataFrame:
    """Per label at the given (frozen) threshold: prevalence, AUROC, AUPRC, the confusion metrics, and intervals."""
    out = []
    for label in labels:
        y, p = frame[label].to_numpy(float), frame[f"prob_{label}"].to_numpy(float)
        known = ~np.isnan(y)
        out.append({
            "label": label, "n": int(known.sum()), "positives": int(np.nansum(y)),
            "prevalence": float(np.nanmean(y)) if known.any() else float("nan"),
            "auroc": auroc(y, p), "auprc": auprc(y, p), "threshold": thresholds[label], **at_threshold(y, p, thresholds[label]),
        })  # fmt: skip
    return with_intervals(pd.DataFrame(out).set_index("label"), frame, labels, resamples, seed)


def _calibrated(checkpoint_uri: str, task: str, labels: list[str], frame: pd.DataFrame) -> tuple[np.ndarray, list[str] | None]:
    """The checkpoint's calibration applied to the raw outputs (as evaluation applies it), and its methods."""
    raw = frame[prob_columns(labels)].to_numpy(float)
    fitted = calibration.load(checkpoint_uri, task, head_size(task, len(labels)))
    return (fitted.apply(raw), fitted.methods) if fitted is not None and len(raw) else (raw, None)


def _scored(frame: pd.DataFrame, labels: list[str], checkpoint_uri: str, batch_size: int) -> tuple[pd.DataFrame, int]:
    """Raw probabilities for each row; the rows that could not be decoded are counted and left out."""
    columns = ["image", *(["split"] if "split" in frame else []), *labels, *(c for c in frame if c in METADATA)]
    scored = predict(rows(frame[columns]), checkpoint_uri, batch_size, calibrated=False).to_pandas()
    failed = int((scored["error"] != "").sum())
    return scored[scored["error"] == ""].reset_index(drop=True), failed


def internal_site(config: JobConfig, checkpoint_uri: str, labels: list[str], task: str) -> Site:
    """The run's test split at its val-chosen thresholds: from its evaluation of this checkpoint, else computed."""
    e, out_dir = config.evaluate, storage.join(config.run_dir, "evaluation")
    metrics_uri, predictions_uri = storage.join(out_dir, "metrics.json"), storage.join(out_dir, "predictions.parquet")
    metrics = json.loads(storage.read_text(metrics_uri)) if storage.exists(metrics_uri) else None
    if metrics and metrics.get("checkpoint") == checkpoint_uri and storage.exists(predictions_uri):
        scored = pd.read_parquet(io.BytesIO(storage.read_bytes(predictions_uri)))
        test = scored[(scored["split"] == "test") & (scored["error"] == "")].reset_index(drop=True)
        table = pd.DataFrame.from_dict(metrics["labels"], orient="index").rename_axis("label").loc[labels]
        table = table.apply(pd.to_numeric, errors="coerce")  # JSON's null is an undefined metric: NaN
        source = f"read from {metrics_uri}"
    else:
        manifest = read_manifest(config.manifest)
        checkpoint.check_fits(checkpoint_uri, manifest.labels, manifest.task, config.manifest)
        frame = splits.fold_view(manifest.frame, config.data.fold) if config.data.fold is not None else manifest.frame
        scored, _ = _scored(frame[frame["split"].isin(["val", "test"])], labels, checkpoint_uri, e.batch_size)
        val, test = scored[scored["split"] == "val"], scored[scored["split"] == "test"].reset_index(drop=True)
        probs = prob_columns(labels)
        table = label_table(labels, val[labels].to_numpy(float), val[probs].to_numpy(float), test[labels].to_numpy(float),
                            test[probs].to_numpy(float), e.threshold, e.threshold_target)  # fmt: skip
        table = with_intervals(table, test, labels, e.bootstrap, e.seed)
        source = f"computed on the test split of {config.manifest} (no evaluation of this checkpoint found)"
    calibrated, _ = _calibrated(checkpoint_uri, task, labels, test)
    return Site("internal", test, calibrated, table, source)


def _known(site: Site, i: int, label: str):
    y, p = site.frame[label].to_numpy(float), site.frame[f"prob_{label}"].to_numpy(float)
    keep = ~np.isnan(y) & ~np.isnan(p)
    return y[keep], p[keep], site.calibrated[keep, i], site.frame["patient_id"].to_numpy()[keep]


def _calibration_figures(y, calibrated, patients, resamples: int, seed: int, bins: int) -> dict[str, float]:
    """Calibration-in-the-large (with a patient-bootstrap interval of the mean difference), slope and ECE."""
    large = calibration.calibration_in_the_large(y, calibrated)
    lo = hi = float("nan")
    if len(y):
        w = intervals.patient_weights(patients, resamples, seed).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            lo, hi = intervals.percentile_interval((w @ (calibrated - y)) / w.sum(axis=1), 0.95)
    return {
        "citl": large["mean_difference"], "citl_lo": lo, "citl_hi": hi, "citl_intercept": large["intercept"],
        "calibration_slope": calibration.calibration_slope(y, calibrated),
        "ece": calibration.expected_calibration_error(y, calibrated, bins) if len(y) else float("nan"),
    }  # fmt: skip


def _bootstrap_difference(a, b, resamples: int, seed: int) -> tuple[float, float]:
    """Interval of AUROC(b) − AUROC(a) from independent patient resamples of each site."""
    (ya, pa, ida), (yb, pb, idb) = a, b
    if len(ya) == 0 or len(yb) == 0:
        return float("nan"), float("nan")
    wa, wb = intervals.patient_weights(ida, resamples, seed), intervals.patient_weights(idb, resamples, seed + 1)
    difference = intervals.weighted_auroc(yb.astype(int), pb, wb) - intervals.weighted_auroc(ya.astype(int), pa, wa)
    return intervals.percentile_interval(difference, 0.95)


def compare_sites(internal: Site, external: Site, labels: list[str], resamples: int, seed: int, bins: int) -> pd.DataFrame:
    """One row per label: each site's figures (``_internal`` / ``_external``), the differences, and what moved."""
    out = []
    for i, label in enumerate(labels):
        a, b = internal.table.loc[label], external.table.loc[label]
        (ya, pa, ca, ida), (yb, pb, cb, idb) = _known(internal, i, label), _known(external, i, label)
        test = intervals.delong_unpaired(yb, pb, ya, pa)
        diff_lo, diff_hi = _bootstrap_difference((ya, pa, ida), (yb, pb, idb), resamples, seed)
        row = {"label": label, "threshold": float(a["threshold"])}
        for site, r in (("internal", a), ("external", b)):
            row.update(
                {f"images_{site}": int(r["n"]), f"positives_{site}": int(r["positives"]), f"prevalence_{site}": float(r["prevalence"])}
            )
            for metric in ("auroc", *SHOWN_METRICS):
                row.update(
                    {f"{metric}_{site}": r[metric], f"{metric}_lo_{site}": r[f"{metric}_lo"], f"{metric}_hi_{site}": r[f"{metric}_hi"]}
                )
        for site, (y, c, ids) in (("internal", (ya, ca, ida)), ("external", (yb, cb, idb))):
            row.update({f"{k}_{site}": v for k, v in _calibration_figures(y, c, ids, resamples, seed, bins).items()})
        row.update({
            "auroc_difference": test["difference"], "auroc_difference_lo": diff_lo, "auroc_difference_hi": diff_hi,
            "delong_z": test["z"], "delong_p": test["p_value"],
            "auroc_moved": bool(test["p_value"] < ALPHA) or bool(diff_lo > 0 or diff_hi < 0),
        })  # fmt: skip
        for metric in ("sensitivity", "specificity"):  # the external value outside the internal 95 % interval
            value, lo, hi = row[f"{metric}_external"], row[f"{metric}_lo_internal"], row[f"{metric}_hi_internal"]
            row[f"{metric}_moved"] = bool(value < lo or value > hi)
        excludes_zero = row["citl_lo_external"] > 0 or row["citl_hi_external"] < 0
        row["miscalibrated_in_the_large"] = bool(excludes_zero and abs(row["citl_external"]) >= CITL_TOLERANCE)
        out.append(row)
    return pd.DataFrame(out).set_index("label")


SUBGROUP_KEY = ["dimension", "group", "label"]
SUBGROUP_SHOWN = ["patients", "images", "positives", "negatives", "auroc", "auroc_lo", "auroc_hi", "sensitivity", "specificity", "small"]


def subgroup_shift(internal: Site, external: Site, labels: list[str], e) -> pd.DataFrame:
    """The external site's subgroup table beside the internal one (``_internal`` columns, where the group exists
    there too); ``delong_p`` compares a group's AUROCs across the sites, ``moved`` when below ALPHA."""
    probs = prob_columns(labels)
    b = subgroup_table(external.frame, labels, probs, external.table, e.bootstrap, e.seed, e.subgroup_min_cases)
    notes = b.attrs.get("notes", [])
    if b.empty:
        b.attrs["notes"] = notes
        return b
    a = subgroup_table(internal.frame, labels, probs, internal.table, e.bootstrap, e.seed, e.subgroup_min_cases)
    if a.empty:
        a = pd.DataFrame(columns=SUBGROUP_KEY + SUBGROUP_SHOWN)
    table = b.merge(a[SUBGROUP_KEY + SUBGROUP_SHOWN].add_suffix("_internal").rename(columns={f"{k}_internal": k for k in SUBGROUP_KEY}),
                    on=SUBGROUP_KEY, how="left")  # fmt: skip
    groups_a, groups_b = dimensions(internal.frame)[0], dimensions(external.frame)[0]
    p_values = []
    for row in table.itertuples():
        if row.dimension not in groups_a or pd.isna(row.auroc_internal):
            p_values.append(float("nan"))
            continue
        in_a = (groups_a[row.dimension].astype(str) == row.group).to_numpy()
        in_b = (groups_b[row.dimension].astype(str) == row.group).to_numpy()
        fa, fb = internal.frame[in_a], external.frame[in_b]
        prob = f"prob_{row.label}"
        p_values.append(intervals.delong_unpaired(fb[row.label], fb[prob], fa[row.label], fa[prob])["p_value"])
    table["delong_p"] = p_values
    table["moved"] = table["delong_p"] < ALPHA
    table.attrs["notes"] = notes
    return table


def validate_external(config: JobConfig) -> ExternalValidation:
    """Apply the run's frozen model (``validate.checkpoint``, default its best) to ``validate.manifest`` and
    write ``<run>/external/<validate.name>/``: external.json, external.csv, subgroups.csv, figures, report."""
    from medray.evaluation.external_report import write  # matplotlib: only when writing

    v, e = config.validate, config.evaluate
    if not v.manifest:
        raise ConfigError("validate.manifest is not set: name the other site's manifest, e.g. --set validate.manifest=site_b.parquet")
    checkpoint_uri = checkpoint.resolve(v.checkpoint, config.run_dir)
    site = read_manifest(v.manifest)
    labels, task = site.labels, site.task
    checkpoint.check_fits(checkpoint_uri, labels, task, v.manifest)  # before the slow part
    labels = list(checkpoint.read_meta(checkpoint_uri)["labels"])  # the model's order
    frame, which = external_rows(site.frame)
    name = v.name or default_name(v.manifest)
    log.info("external validation %r: %d images of %d patients (%s)", name, len(frame), frame["patient_id"].nunique(), which)

    internal = internal_site(config, checkpoint_uri, labels, task)
    thresholds = {label: float(internal.table.loc[label, "threshold"]) for label in labels}
    log.info("internal figures: %d test images, %s", len(internal.frame), internal.source)

    scored, failed = _scored(frame, labels, checkpoint_uri, e.batch_size)
    calibrated, methods = _calibrated(checkpoint_uri, task, labels, scored)
    external = Site(name, scored, calibrated, frozen_table(scored, labels, thresholds, e.bootstrap, e.seed), f"scored from {v.manifest}")
    log.info("scored the site's images: %d scored, %d could not be decoded", len(scored), failed)

    table = compare_sites(internal, external, labels, e.bootstrap, e.seed, e.calibration_bins)
    subgroups = subgroup_shift(internal, external, labels, e)
    moved = [
        label
        for label in labels
        if table.loc[label, ["auroc_moved", "sensitivity_moved", "specificity_moved", "miscalibrated_in_the_large"]].any()
    ]
    log.info("compared the sites: %d of %d labels moved%s", len(moved), len(labels), f" ({', '.join(moved)})" if moved else "")

    summary = {
        "name": name, "checkpoint": checkpoint_uri, "model_sha256": checkpoint.identity(checkpoint_uri),
        "manifest": v.manifest, "rows": which, "images": len(scored), "patients": int(scored["patient_id"].nunique()),
        "failed_images": failed, "internal": internal.source, "internal_images": len(internal.frame),
        "thresholds": thresholds, "threshold_rule": e.threshold, "calibration": methods, "labels_moved": moved,
        "bootstrap_resamples": e.bootstrap, "alpha": ALPHA, "citl_tolerance": CITL_TOLERANCE,
    }  # fmt: skip
    result = ExternalValidation(table, subgroups, summary)
    result.paths = write(storage.join(config.run_dir, "external", name), result, internal, external, labels, e.calibration_bins)
    log.info("external validation report → %s", result.paths["report.html"])
    return result
