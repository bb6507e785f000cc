"""Evaluation of attention-MIL: slide-level metrics, the classic recipe beside it, and where the model looks.

Each held-out bag is scored whole (every patch, no cap). The bag scores go through the evaluation
core images go through (``label_table``: thresholds chosen on the validation bags by
``evaluate.threshold`` / ``threshold_target``, PPV and NPV at ``evaluate.deployment_prevalence``;
``with_intervals``: patient-bootstrap intervals on the test bags). Beside ABMIL, the same
embeddings are scored the 2017 way (``mil.baseline``): a logistic regression on patches that carry
their slide's label, its patch probabilities averaged per bag — the two compared by DeLong's test
and a paired patient bootstrap.

Where the model looks: on annotated slides (``tumour_fraction`` known), a patch is tumour when its
tumour share reaches ``wsi.tumour_threshold``, and the attention AUROC of a slide is the AUROC of its
attention weights for those patches — 1 when every tumour patch gets more attention than every other
patch, 0.5 when attention ignores the tumour. It is measured per slide (weights are relative within a
bag) and averaged over the annotated test slides that have both kinds of patch.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medray.config import JobConfig
from medray.data import splits
from medray.evaluation import intervals
from medray.evaluation.evaluate import Evaluation, with_intervals
from medray.evaluation.metrics import auroc, check_prevalence, label_table
from medray.evaluation.predict import prob_columns
from medray.evaluation.report import Figure, Section, plots, write_report
from medray.io import storage
from medray.training import checkpoint
from medray.wsi import mil
from medray.wsi.mil_figures import heatmap_pages, patch_folder

log = logging.getLogger(__name__)


def mean_pooling(bags: mil.Bags, labels: list[str], cap: int, seed: int) -> np.ndarray:
    """The classic recipe on the same embeddings: per label, a logistic regression on training patches that
    each carry their bag's label (at most ``cap`` per bag, drawn as training's first epoch draws them);
    a bag's score is the mean of its patches' probabilities. NaN for the training bags."""
    train, out = bags.where("train"), np.full((len(bags.table), len(labels)), np.nan)
    if not len(train):
        return out
    rows = np.concatenate([bags.starts[b] + mil.sample(int(bags.lengths[b]), cap, seed, 0, int(b)) for b in train])
    owner = np.repeat(train, [min(int(bags.lengths[b]), cap) for b in train])
    x, targets = bags.vectors[rows].astype(np.float32), bags.table[labels].to_numpy(float)
    held = np.flatnonzero(bags.table["split"].isin(["val", "test"]).to_numpy())
    held_rows = np.concatenate([np.arange(bags.starts[b], bags.starts[b] + bags.lengths[b]) for b in held])
    held_owner = np.repeat(held, bags.lengths[held])
    for i in range(len(labels)):
        y = targets[owner, i]
        known = ~np.isnan(y)
        if len(np.unique(y[known])) < 2:
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, class_weight="balanced"))
        model.fit(x[known], y[known].astype(int))
        patch_p = model.predict_proba(bags.vectors[held_rows].astype(np.float32))[:, 1]
        out[held, i] = pd.Series(patch_p).groupby(held_owner).mean().reindex(held).to_numpy()
    return out


def attention_auroc(patches: pd.DataFrame, column: str, threshold: float) -> pd.DataFrame:
    """Per annotated slide: its patches, tumour patches and the AUROC of ``column`` for them (NaN without both kinds)."""
    annotated = patches[patches["tumour_fraction"].notna()]
    rows = []
    for (image, slide_id), slide in annotated.groupby(["image", "slide_id"], sort=True):
        tumour = (slide["tumour_fraction"] >= threshold).to_numpy(float)
        rows.append({"slide_id": slide_id, "image": image, "patches": len(slide), "tumour_patches": int(tumour.sum()),
                     "attention_auroc": auroc(tumour, slide[column].to_numpy(float))})  # fmt: skip
    return pd.DataFrame(rows, columns=["slide_id", "image", "patches", "tumour_patches", "attention_auroc"])


def _write_parquet(frame: pd.DataFrame, uri: str) -> None:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    storage.write_bytes(uri, buffer.getvalue())


def scored_bags(config: JobConfig, checkpoint_uri: str) -> tuple[mil.Bags, pd.DataFrame, pd.DataFrame, dict]:
    """The store's bags; the held-out ones with ``prob_<label>``; their patches with ``attention_<label>``
    (weights summing to 1 per bag) and ``attention_scaled_<label>`` (divided by the bag's largest); the meta."""
    model, meta = mil.load(checkpoint_uri)
    store = mil.read_patch_store(config.embeddings)
    mil.check_store(meta, store.info, config.embeddings, checkpoint_uri)
    checkpoint.check_fits(checkpoint_uri, store.labels, store.task, config.embeddings)
    labels = meta["labels"]  # the model's output order (a store may list the same labels in another)
    bags = mil.make_bags(store, meta["level"], config.embeddings)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    held = np.flatnonzero(bags.table["split"].isin(["val", "test"]).to_numpy())
    probs, attention = mil.predict(model.to(device), bags.vectors, bags.starts, bags.lengths, held, device)
    scored = bags.table.iloc[held].reset_index(drop=True)
    scored[prob_columns(labels)] = probs
    parts = []
    for b, weights in zip(held, attention):
        part = bags.frame.iloc[bags.starts[b] : bags.starts[b] + bags.lengths[b]]
        part = part[[c for c in ("image", "slide_id", "patient_id", "split", "x", "y", "size", "tumour_fraction") if c in part]].copy()
        for k, label in enumerate(labels):
            part[f"attention_{label}"] = weights[:, k]
            part[f"attention_scaled_{label}"] = weights[:, k] / max(float(weights[:, k].max()), 1e-12)
        parts.append(part)
    return bags, scored, pd.concat(parts, ignore_index=True), meta


def _baseline(config: JobConfig, bags: mil.Bags, scored: pd.DataFrame, labels: list[str]) -> tuple[Section, dict]:
    """Mean pooling scored on the same held-out bags (``baseline_<label>`` added to ``scored``), its test
    AUROC with intervals, and per label the difference to ABMIL: DeLong's p, a paired patient bootstrap
    (the report's section, and the same figures per label)."""
    e, held = config.evaluate, bags.table["split"].isin(["val", "test"]).to_numpy()
    columns = [f"baseline_{label}" for label in labels]
    scored[columns] = mean_pooling(bags, labels, config.mil.bag_size, config.train.seed)[held]
    val, test = scored[scored["split"] == "val"], scored[scored["split"] == "test"].reset_index(drop=True)
    as_probs = test.assign(**{f"prob_{label}": test[f"baseline_{label}"] for label in labels})
    table = label_table(labels, val[labels].to_numpy(float), val[columns].to_numpy(float), test[labels].to_numpy(float),
                        test[columns].to_numpy(float), e.threshold, e.threshold_target, e.deployment_prevalence)  # fmt: skip
    table = with_intervals(table, as_probs, labels, e.bootstrap, e.seed)
    rows = []
    for label in labels:
        y, a, b = test[label], test[f"prob_{label}"], test[f"baseline_{label}"]
        d = intervals.delong(y, a, b)
        paired = intervals.paired_bootstrap(y, a, b, test["patient_id"], e.bootstrap, e.seed)
        rows.append({"label": label, "abmil_auroc": d["auroc_a"], "mean_pooling_auroc": table.loc[label, "auroc"],
                     "mean_pooling_auroc_lo": table.loc[label, "auroc_lo"], "mean_pooling_auroc_hi": table.loc[label, "auroc_hi"],
                     "difference": d["difference"], "difference_lo": paired["difference_lo"], "difference_hi": paired["difference_hi"],
                     "delong_p": d["p_value"]})  # fmt: skip
    versus = pd.DataFrame(rows).set_index("label")
    text = ("The 2017 recipe on the same embeddings: a logistic regression on training patches, each given its bag's label, "
            "each bag scored by the mean of its patch probabilities. Difference: ABMIL − mean pooling, with a paired "
            "patient-bootstrap interval; DeLong's test on the same test bags.")  # fmt: skip
    return Section("Against patch-label mean pooling", "baseline", [text, versus.round(3)]), versus.to_dict(orient="index")


def _attention_section(config: JobConfig, test: pd.DataFrame, patches: pd.DataFrame, labels: list[str], level: str) -> tuple[Section, dict]:
    """Attention AUROC on the annotated test slides, and a heatmap per test slide."""
    w = config.wsi
    label = w.tumour_label if w.tumour_label in labels else labels[0]
    looks = attention_auroc(patches, f"attention_{label}", w.tumour_threshold)
    measured = looks["attention_auroc"].dropna()
    summary = {
        "attention_auroc": float(measured.mean()) if len(measured) else float("nan"),
        "attention_slides": len(measured),
        "tumour_label": label,
    }
    folder = patch_folder(config)
    figures = heatmap_pages(test, patches, looks, folder, label, w.tumour_threshold, level) if folder else []
    blocks = [
        f"Attention AUROC: how well the attention for {label} ranks the tumour patches (tumour share ≥ {w.tumour_threshold}) above "
        f"the slide's other patches; mean {summary['attention_auroc']:.3f} over the {len(measured)} annotated test slides that have "
        "both (1: it looks at the tumour first; 0.5: its attention is blind to the tumour)."
        if len(measured) else "No annotated test slide has both tumour and non-tumour patches: attention AUROC not measured.",
        looks.drop(columns="image").set_index("slide_id").round(3),
        f"Attention for {label} over each test slide's thumbnail, divided by the bag's largest weight (red: where the model looks); "
        "annotated tumour patches outlined in black."
        if figures else "No slide thumbnails (set wsi.patches to the extract-patches folder the store was embedded from): heatmaps not drawn.",
        *figures,
    ]  # fmt: skip
    return Section("Where the model looks", "attention", blocks), summary


def evaluate_mil(config: JobConfig) -> Evaluation:
    """Score the held-out bags with the run's best ABMIL checkpoint; write ``<run>/mil_evaluation/``."""
    e = config.evaluate
    checkpoint_uri = checkpoint.resolve(e.checkpoint, config.run_dir)
    bags, scored, patches, meta = scored_bags(config, checkpoint_uri)
    labels, probs, level = meta["labels"], prob_columns(meta["labels"]), meta["level"]
    check_prevalence(labels, e.deployment_prevalence)
    val, test = scored[scored["split"] == "val"], scored[scored["split"] == "test"].reset_index(drop=True)
    val_y, val_p, test_y, test_p = (f[c].to_numpy(dtype=float) for f in (val, test) for c in (labels, probs))
    table = label_table(labels, val_y, val_p, test_y, test_p, e.threshold, e.threshold_target, e.deployment_prevalence)
    table = with_intervals(table, test, labels, e.bootstrap, e.seed)
    log.info("attention-MIL: %d test %ss of %d patients", len(test), level, test["patient_id"].nunique())

    notes = [
        f"Checkpoint: {checkpoint_uri} (gated-attention MIL over {meta['embedding']['backbone']} embeddings, dim {meta['dim']}).",
        f"Rows are {level}s: each held-out bag is scored whole ({len(patches)} held-out patches, no cap).",
        f"Thresholds chosen on the validation {level}s by {e.threshold}" + (f" (target {e.threshold_target})" if e.threshold != "youden" else "")
        + f"; 95 % intervals from {e.bootstrap} patient resamples. Calibration and subgroups are not computed per bag.",
    ]  # fmt: skip
    sections = [
        Section("Data and splits", "data", [splits.summary(bags.table, labels).rename(columns={"images": f"{level}s"})]),
        Section(f"{level.capitalize()}-level metrics", "metrics",
                [notes, table.round(3), Figure("roc.png", plots.roc_curves(test_y, test_p, table), f"ROC curves on the test {level}s")]),
    ]  # fmt: skip
    summary = {"level": level}
    if config.mil.baseline:
        section, versus = _baseline(config, bags, scored, labels)
        # The whole comparison (mean pooling's interval, the difference and its interval, DeLong's p) in
        # metrics.json too, not only in the report.
        summary["baseline"] = versus
        summary["baseline_auroc"] = {label: row["mean_pooling_auroc"] for label, row in versus.items()}
        sections.append(section)
    section, attention = _attention_section(config, test, patches[patches["split"] == "test"], labels, level)
    sections.append(section)
    summary.update(attention)

    out_dir = storage.join(config.run_dir, "mil_evaluation")
    _write_parquet(scored, storage.join(out_dir, "bag_predictions.parquet"))
    _write_parquet(patches, storage.join(out_dir, "patch_attention.parquet"))
    metrics = {"labels": table.to_dict(orient="index"), "checkpoint": checkpoint_uri, **summary}
    paths = write_report(out_dir, f"medray attention-MIL evaluation — {config.name}", sections, metrics)
    paths["predictions"] = storage.join(out_dir, "bag_predictions.parquet")
    paths["attention"] = storage.join(out_dir, "patch_attention.parquet")
    empty = pd.DataFrame()
    return Evaluation(table, empty, empty, empty, empty, summary=summary, paths=paths)
