"""The evaluation report's sections and its model card, filled from the run's own records.

Every statement in the model card comes from a file of the run — the resolved training config, the
split manifest, the checkpoint's metadata, the evaluation itself — so the card cannot drift from
the model it describes.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import yaml

from medray.evaluation.calibration import expected_calibration_error, reliability
from medray.evaluation.compare import baselines_note, read_baselines
from medray.evaluation.experts import raters_under_curve
from medray.evaluation.report import plots
from medray.evaluation.report.document import Figure, Heading, Section, format_value, write_report
from medray.io import storage
from medray.training.checkpoint import META_FILE


def ci(value: float, lo: float, hi: float) -> str:
    if np.isnan(value):
        return "–"
    return f"{value:.3f}" if np.isnan(lo) else f"{value:.3f} ({lo:.3f}–{hi:.3f})"


def threshold_text(value: float) -> str:
    """Enough decimals that a threshold near 0 or 1 is not shown as 0 or 1: 0.99994 → 0.99994, not 1.000."""
    if np.isnan(value):
        return "–"
    distance = min(value, 1 - value)
    decimals = 3 if distance <= 0 or distance >= 1e-3 else int(np.floor(-np.log10(distance))) + 1
    return f"{value:.{decimals}f}"


def metrics_shown(table: pd.DataFrame) -> pd.DataFrame:
    """The per-label table a reader sees: each metric with its 95 % interval, prevalence beside it."""
    shown = pd.DataFrame(index=table.index)
    shown["images"], shown["positives"], shown["test prevalence"] = table["n"], table["positives"], table["prevalence"]
    for metric, name in (("auroc", "AUROC"), ("auprc", "AUPRC"), ("sensitivity", "sensitivity"), ("specificity", "specificity"),
                         ("ppv", "PPV (test prev.)"), ("npv", "NPV (test prev.)"), ("f1", "F1"),
                         ("accuracy", "accuracy (val threshold)")):  # fmt: skip
        shown[name] = [ci(v, lo, hi) for v, lo, hi in zip(table[metric], table[f"{metric}_lo"], table[f"{metric}_hi"])]
    shown["accuracy (0.5)"] = table["accuracy_0.5"]
    shown["threshold (val)"] = table["threshold"].map(threshold_text)
    shown["caution"] = [caution(row) for _, row in table.iterrows()]
    if table["deployment_prevalence"].notna().any():
        shown["deployment prevalence"] = table["deployment_prevalence"]
        shown["PPV (deployment)"], shown["NPV (deployment)"] = table["deployment_ppv"], table["deployment_npv"]
    return shown


SMALL_SAMPLE_PATIENTS = 10


def caution(row: pd.Series) -> str:
    """What a reader must know before trusting a label's row: too few positive patients for the intervals to
    mean much, or a threshold placed in a gap that val left open."""
    notes = []
    if row.get("positive_patients", np.inf) < SMALL_SAMPLE_PATIENTS:
        notes.append(f"⚠ only {int(row['positive_patients'])} positive test patients: intervals are wide and unstable")
    if row.get("val_separated", False):
        notes.append("val separated this label perfectly: threshold set mid-gap (logit space); test may not separate")
    return "; ".join(notes)


def single_label_notes(task: str, weighting: str) -> list[str]:
    """How the multi-class / ordinal summary compares with the literature, and what the loss cost it."""
    notes = ["accuracy: the share of test images whose most probable class is the true one, and macro_auroc: the mean "
             "one-vs-rest AUROC over classes — MedMNIST's ACC and AUC."]  # fmt: skip
    if task == "ordinal":
        notes.append("An ordinal model's class probabilities are the differences of its cumulative \"grade > k\" "
                     "probabilities, and accuracy is their argmax. accuracy_expected_grade rounds the expected grade "
                     "instead (the quadratic weighted kappa uses it too): often higher, but not what benchmarks report.")  # fmt: skip
    if weighting != "none":
        notes.append(f"Trained with the class-balanced loss.weighting: {weighting}, which trades accuracy (it rewards "
                     "the majority classes) for recall on the rare ones: on RetinaMNIST it cost 0.06 accuracy "
                     "(0.475 against 0.535 with weighting: none). Set loss.weighting: none where accuracy is what counts.")  # fmt: skip
    return notes


def _audit_section(audit: dict | None) -> Section:
    section = Section("Leakage audit", "audit")
    if audit is None:
        section.blocks.append("The leakage audit was not run for this run (no audit/audit.json): run `medray audit` "
                              "before trusting these numbers, since a patient in two splits inflates every metric.")  # fmt: skip
        return section
    section.blocks.append(f"Leakage audit {'PASSED' if audit.get('passed') else 'FAILED'}.")
    checks = pd.DataFrame(audit.get("checks", []))
    if len(checks):
        if "status" in checks:  # audits written before "not checked" existed have only passed
            checks = checks.drop(columns="passed")[["name", "status", "count", "detail"]]
        section.blocks.append(checks.set_index("name"))
    pairs = pd.DataFrame(audit.get("near_duplicates", []))
    if len(pairs):
        section.blocks += [f"{len(pairs)} near-duplicate image pairs across splits (first 20 shown).", pairs.head(20).set_index("a")]
    if audit.get("thumbnails_png"):
        section.blocks.append(Figure("audit_near_duplicates.png", audit["thumbnails_png"], "Near-duplicate pairs across splits"))
    return section


def _ground_truth_section(result) -> Section:
    section = Section("Ground truth quality", "ground-truth", _consensus_blocks(result.experts, result.consensus))
    if result.agreement.empty:
        section.blocks.append("No rater votes are attached to this manifest (see `medray consensus`): the labels' "
                              "reliability is unknown, and so is the ceiling it puts on the metrics.")  # fmt: skip
        return section
    section.blocks += [
        ("Agreement of the raters on the test images: the share of images each label was unanimous, a majority or a "
        "tie, and Fleiss' kappa (1 = perfect agreement, 0 = no better than chance)."),
        result.agreement,
        ("The same metrics on all test images and on those the raters agreed on unanimously; a model that does much "
        "better on unanimous cases is being held back by label noise on the hard ones."),
        result.unanimous.assign(auroc=[ci(*r) for r in result.unanimous[["auroc", "auroc_lo", "auroc_hi"]].to_numpy()])
        .drop(columns=["auroc_lo", "auroc_hi"]).set_index("label"),
    ]
    return section


def _subgroup_shown(subgroups: pd.DataFrame) -> pd.DataFrame:
    shown = subgroups.assign(AUROC=[ci(*r) for r in subgroups[["auroc", "auroc_lo", "auroc_hi"]].to_numpy()])
    shown["flag"] = np.where(shown["below_overall"], "BELOW OVERALL", "") + np.where(shown["small"], " small", "")
    return shown[["dimension", "group", "label", "patients", "images", "positives", "negatives", "AUROC",
                  "sensitivity", "specificity", "flag"]].set_index("dimension")  # fmt: skip


def _subgroup_blocks(subgroups: pd.DataFrame, table: pd.DataFrame) -> list:
    notes = subgroups.attrs.get("notes", [])
    if not len(subgroups):
        return notes or ["The manifest holds no sex, age, view or site columns."]
    return [
        "AUROC with 95 % patient-bootstrap intervals per subgroup; sensitivity and specificity at the overall threshold.",
        *([notes] if notes else []),
        _subgroup_shown(subgroups),
        Figure("subgroups.png", plots.subgroup_forest(subgroups, table), "Subgroup AUROC against the overall interval"),
    ]


def _augment_blocks(config) -> list:
    """The augmentation the model was trained with, shown on a few training images (medray.training.preview)."""
    from medray.errors import MedrayError
    from medray.training.preview import preview

    try:
        grid = preview(config)
    except MedrayError as err:
        return [f"No augmentation preview: {err}"]
    return [Figure("augment_preview.png", grid, f"Augmentation '{config.data.augment}': training images and draws of the policy")]


def _expert_blocks(experts: pd.DataFrame) -> list:
    if experts.empty:
        return []
    under = raters_under_curve(experts)
    counted = experts.groupby("label", sort=False).size()
    shown = experts.assign(**{"model − rater (95% CI)": [ci(*r) for r in experts[["difference", "difference_lo", "difference_hi"]].to_numpy()]})
    return [
        "Raters under the model's ROC curve (the CheXpert scorer's NumRadsUnderROC): "
        + ", ".join(f"{label} {under[label]} of {counted[label]}" for label in counted.index) + ".",
        ("Each rater's sensitivity and specificity on the test images they read, against the reference labels, and the "
         "model's sensitivity at that rater's specificity; the difference has a paired patient-bootstrap interval."),
        shown[["label", "rater", "images", "positives", "sensitivity", "specificity", "model_sensitivity",
               "model − rater (95% CI)", "under_curve"]].set_index("label"),
    ]  # fmt: skip


def _consensus_blocks(experts: pd.DataFrame, rules: pd.DataFrame) -> list:
    """The raters' own accuracy as Dawid–Skene estimates it from their votes alone, beside what the reference
    labels show, and how often each consensus rule agrees with the reference."""
    if rules.empty or "em_sensitivity" not in experts:
        return []
    return [
        ("Weighted consensus (Dawid–Skene): each rater's sensitivity and specificity estimated by EM from the votes "
         "alone, beside the values measured against the reference labels on the test images; where no reference "
         "exists, the estimates are what weighs each vote."),
        experts[["label", "rater", "sensitivity", "em_sensitivity", "specificity", "em_specificity"]].set_index("label"),
        "Share of test images on which each consensus rule agrees with the reference labels.",
        rules.pivot(index="label", columns="consensus", values="agrees_with_reference"),
    ]  # fmt: skip


def _run_records(run_dir: str, checkpoint_uri: str, fallback: dict) -> tuple[dict, dict]:
    """The checkpoint's metadata and the resolved config the run was trained with (written by the
    CLI next to the run); ``fallback`` (this job's config) where the run has none."""
    meta, train = {}, {}
    if storage.exists(storage.join(checkpoint_uri, META_FILE)):
        meta = json.loads(storage.read_text(storage.join(checkpoint_uri, META_FILE)))
    for name in ("train.config.yaml", "demo.config.yaml"):
        if storage.exists(storage.join(run_dir, name)):
            train = yaml.safe_load(storage.read_text(storage.join(run_dir, name))) or {}
            break
    return meta, train or fallback


HEADS = ("linear", "knn", "mlp")  # heads on embeddings (medray.embeddings.heads): a model that sees vectors, not pixels


def _model_lines(meta: dict, train: dict, manifest, checkpoint_uri: str) -> list[str]:
    """What the model is: an image model's backbone and input, or a head and the encoder whose embeddings it reads."""
    t, m, labels, task = train.get("train", {}), train.get("model", {}), manifest.labels, meta.get("task", manifest.task)
    if meta.get("head") not in HEADS:
        return [f"backbone {meta.get('backbone', m.get('backbone', '?'))}, {task} over labels {', '.join(labels)}",
                f"input {meta.get('image_size', '?')} px, {meta.get('in_channels', '?')} channel(s); checkpoint of epoch {meta.get('epoch', '?')}",
                (f"trained {t.get('epochs', '?')} epochs, batch {t.get('batch_size', '?')}, lr {t.get('lr', '?')}, "
                 f"{t.get('workers', '?')} DDP workers; weights: {m.get('weights') or 'random initialisation'}"),
                f"checkpoint {checkpoint_uri}"]  # fmt: skip
    e = meta["embedding"]
    kind = {"linear": "logistic regression on standardised vectors, L2 C per output (chosen on val unless set): "
                      + ", ".join(f"{c:g}" for c in meta.get("C", [])),
            "knn": f"the {meta.get('k')} nearest train vectors by cosine, {meta.get('weights')} votes",
            "mlp": f"one hidden layer of {meta.get('hidden')} units, dropout {meta.get('dropout')}; checkpoint of epoch "
                   f"{meta.get('epoch', -1) + 1} of {t.get('epochs', '?')}, batch {t.get('batch_size', '?')}, lr {t.get('lr', '?')}, "
                   f"{t.get('workers', '?')} DDP workers"}[meta["head"]]  # fmt: skip
    return [f"{meta['head']} head on frozen {e['backbone']} embeddings, {task} over labels {', '.join(labels)}: {kind}",
            (f"encoder {e['backbone']}, weights sha256 {e['weights_sha256']}, images at {e['image_size']} px, {e['dim']}-dimensional "
             "vectors: scoring embeds new images with this same encoder"),
            f"checkpoint {checkpoint_uri}"]  # fmt: skip


def _model_card(config, manifest, result, checkpoint_uri: str, split_summary: pd.DataFrame, failed: int, source: str) -> Section:
    meta, train = _run_records(config.run_dir, checkpoint_uri, config.model_dump(mode="json"))
    head = meta.get("head") in HEADS
    read = "embedded" if head else "decoded"
    table, labels = result.table, manifest.labels
    row = split_summary.loc["train"] if "train" in split_summary.index else None
    flagged = result.subgroups[result.subgroups["below_overall"]] if len(result.subgroups) else result.subgroups
    small = result.subgroups[result.subgroups["small"]] if len(result.subgroups) else result.subgroups
    enriched = [lab for lab in labels if table.loc[lab, "prevalence"] > 2 * split_summary.loc["train", f"{lab} prevalence"]] if row is not None else []
    deployment = table["deployment_prevalence"].dropna()
    at_deployment = ", ".join(f"{k} {table.loc[k, 'deployment_ppv']:.3f} at {v:.1%}" for k, v in deployment.items())
    prevalence_note = (
        f"PPV at deployment prevalence (Bayes' rule): {at_deployment}; "
        "the test PPV holds only at the test prevalence." if len(deployment) else
        "PPV and NPV hold only at the test prevalence shown; set evaluate.deployment_prevalence for a deployment."
    )
    before = result.calibration["ece_before"].mean()
    after = result.calibration["ece_after"].mean() if "ece_after" in result.calibration else None
    calibration_note = f"Calibration: mean test ECE {before:.3f} before calibration" + (
        "." if after is None else f", {after:.3f} after"
        + ("." if after <= before else ": the calibration fitted on val did not carry over to test (a small val "
           "split, or a label val separates perfectly), so check the reliability diagrams before relying on it."))
    limitations = [
        f"Test prevalence differs from training: {', '.join(enriched)} enriched in the test split, so its PPV "
        "overstates what a clinic will see." if enriched else "No label's test prevalence is more than twice its training prevalence.",
        prevalence_note,
        calibration_note,
        "No Grad-CAM: the head reads frozen embeddings, not pixels, so nothing shows where in an image it looked."
        if head else "Grad-CAM maps show what raised a logit, not a clinical rationale.",
        "No external (other-site) test set: performance at another hospital is unknown."
        if "site" not in manifest.frame else "Sites: see the subgroup table.",
        f"{failed} held-out images could not be {read} and are missing from these metrics." if failed else
        f"Every held-out image was {read} and scored.",
    ]  # fmt: skip
    limitations.insert(0, "One held-out split of the same source as training: check that it is the population of intended use.")
    return Section("Model card", "model-card", [
        Heading("Intended use"), config.evaluate.intended_use or (
            f"Not stated (set evaluate.intended_use). The model was trained and tested on {source} only, "
            f"a {manifest.task} task over {', '.join(labels)}: nothing in this report shows it fit for another "
            "population, another kind of image, or clinical use."),
        Heading("Model"),
        _model_lines(meta, train, manifest, checkpoint_uri),
        Heading("Training data"),
        f"{int(row['patients'])} patients, {int(row['images'])} images ({'embedding store' if head else 'split manifest'} {source}); "
        + ", ".join(f"{lab} {row[f'{lab} prevalence']:.1%}" for lab in labels) if row is not None else "unknown",
        Heading("Evaluation data"),
        (f"The test split: {int(split_summary.loc['test', 'patients'])} patients, {int(split_summary.loc['test', 'images'])} "
        "images, no patient shared with training or validation; thresholds and calibration were chosen on the "
        f"validation split ({int(split_summary.loc['val', 'patients'])} patients)."),
        Heading("Metrics"),
        [f"{lab}: AUROC {ci(table.loc[lab, 'auroc'], table.loc[lab, 'auroc_lo'], table.loc[lab, 'auroc_hi'])}, "
         f"sensitivity {format_value(table.loc[lab, 'sensitivity'])}, specificity {format_value(table.loc[lab, 'specificity'])} "
         f"at test prevalence {table.loc[lab, 'prevalence']:.1%}" for lab in labels],
        Heading("Subgroup caveats"),
        [f"{r.label} in {r.dimension} = {r.group}: AUROC interval wholly below the overall one" for r in flagged.itertuples()]
        or ["No subgroup's AUROC interval lies wholly below the overall interval."],
        (f"{len(small)} of {len(result.subgroups)} subgroup rows are small (fewer than {config.evaluate.subgroup_min_cases} "
        "positives or negatives): their intervals are wide and absence of a flag there means little."),
        Heading("Limitations"), limitations,
    ])  # fmt: skip


def _error_blocks(tiles: list | None, gallery: int) -> list:
    if tiles is None:
        return ["No Grad-CAM gallery: a head on embeddings reads frozen vectors, not pixels, so there is no map of where it "
                "looked. Its false positives and negatives at the val threshold are the rows of predictions.parquet whose "
                "prob_<label> falls on the wrong side of the label's threshold (their counts: fp and fn in metrics.json)."]  # fmt: skip
    if not tiles:
        return ["No errors to show (or evaluate.gallery is 0)."]
    return [(f"The {gallery} most confident false positives and false negatives per label at the val threshold, "
             "with Grad-CAM overlays for that label (red: raised the logit most)."),
            Figure("errors.png", plots.gallery(tiles), "Error gallery with Grad-CAM")]  # fmt: skip


def build_report(out_dir, config, manifest, result, checkpoint_uri, split_summary, test_y, test_p, calibrated, tiles, audit, failed, source=None) -> dict[str, str]:  # fmt: skip
    """The report and model card. ``tiles``: the Grad-CAM gallery, None where it does not apply (a head on embeddings);
    ``source``: what the model was trained and tested on (default the run's manifest)."""
    labels, table, e = manifest.labels, result.table, config.evaluate
    source, head = source or config.manifest, tiles is None
    overview = [
        f"checkpoint: {checkpoint_uri}",
        f"test split: {len(test_y)} images; mean AUROC over labels {result.mean_auroc:.3f}",
        f"95 % intervals from {e.bootstrap} bootstrap resamples of patients (all images of a patient move together)",
        f"thresholds chosen on the validation split: {e.threshold}"
        + ("" if e.threshold == "youden" else f" ≥ {e.threshold_target}") + ", applied unchanged to test",
    ]
    if manifest.task == "multi-label":
        overview.insert(2, f"mean accuracy at 0.5 over labels {table['accuracy_0.5'].mean():.3f} (as benchmarks such as MedMNIST report it)")
    metric_blocks = [
        ("PPV and NPV depend on prevalence: val and test may be enriched with positives, and the test prevalence column "
        "gives each label's share; at a deployment's lower prevalence PPV is lower (see the deployment columns, "
        "recomputed by Bayes' rule from sensitivity and specificity, when evaluate.deployment_prevalence is set). "
        "Accuracy is shown at the val threshold and at 0.5, the fixed operating point published benchmarks use."),
        metrics_shown(table),
    ]
    baselines = read_baselines(config.run_dir)
    if baselines is not None:
        metric_blocks += [f"Single-task baselines (medray baselines). {baselines_note(int(baselines['images'].max()))}",
                          baselines.drop(columns="checkpoint")]  # fmt: skip
    for level, level_table in result.levels.items():
        metric_blocks += [
            (f"Per {level}: each {level} scored by the highest probability among its images and positive for a finding when any "
             f"of its images is (as the CheXpert evaluation scores studies); thresholds chosen on val {level}s, intervals by "
             "patient bootstrap."),
            metrics_shown(level_table).rename(columns={"images": f"{level}s"}),
        ]
    if result.summary:
        _, trained = _run_records(config.run_dir, checkpoint_uri, config.model_dump(mode="json"))
        weighting = trained.get("loss", {}).get("weighting", "?")
        metric_blocks += [pd.DataFrame([result.summary], index=pd.Index([manifest.task], name="task")),
                          *single_label_notes(manifest.task, weighting)]  # fmt: skip
    calibration_curves = {}
    for i, label in enumerate(labels):
        variants = [("raw", reliability(test_y[:, i], test_p[:, i], e.calibration_bins), result.calibration.loc[label, "ece_before"])]
        if "ece_after" in result.calibration:
            variants.append(("calibrated", reliability(test_y[:, i], calibrated[:, i], e.calibration_bins),
                             expected_calibration_error(test_y[:, i], calibrated[:, i], e.calibration_bins)))  # fmt: skip
        calibration_curves[label] = variants
    calibration_note = (
        "Per label, a map chosen on the validation split: none, the prior correction that undoes the training's class weights, "
        "that plus Platt scaling, or an isotonic map — the lowest out-of-fold log loss (folds grouped by patient) among those "
        "that do not raise the out-of-fold ECE; "
        f"written to {result.calibration.attrs['file']}; scoring applies it."
        if "file" in result.calibration.attrs else "Calibration is off (evaluate.calibrate)."
    )
    sections = [
        Section("Summary", "summary", [overview]),
        Section("Data and splits", "data", [
            f"Patients, images and prevalence per split ({'embedding store' if head else 'manifest'} {source}).", split_summary,
            *(["A head trains on frozen embeddings: no augmentation."] if head else _augment_blocks(config)),
        ]),
        _audit_section(audit),
        _ground_truth_section(result),
        Section("Test metrics per label", "metrics", metric_blocks),
        Section("ROC and precision-recall curves", "curves", [
            *_expert_blocks(result.experts),
            Figure("roc.png", plots.roc_curves(test_y, test_p, table, result.experts),
                   "ROC curves; the dot is the operating point chosen on val" + ("; triangles: the raters" if len(result.experts) else "")),
            Figure("pr.png", plots.pr_curves(test_y, test_p, table), "Precision-recall curves; dotted: test prevalence"),
        ]),
        Section("Calibration", "calibration", [
            "Expected calibration error (ECE) on the test split, before and after the calibration chosen on val.",
            result.calibration, calibration_note,
            Figure("reliability.png", plots.reliability_diagrams(calibration_curves), "Reliability diagrams"),
        ]),
        Section("Subgroups", "subgroups", _subgroup_blocks(result.subgroups, table)),
        Section("Error analysis", "errors", _error_blocks(tiles, e.gallery)),
        _model_card(config, manifest, result, checkpoint_uri, split_summary, failed, source),
    ]
    metrics = {
        "checkpoint": checkpoint_uri,
        "mean_auroc": result.mean_auroc,
        "labels": json.loads(table.to_json(orient="index")),
        "levels": {level: json.loads(t.to_json(orient="index")) for level, t in result.levels.items()},
        "raters": json.loads(result.experts.to_json(orient="records")) if not result.experts.empty else None,
        "consensus_vs_reference": json.loads(result.consensus.to_json(orient="records")) if not result.consensus.empty else None,
        "raters_under_roc": raters_under_curve(result.experts).to_dict() if not result.experts.empty else None,
        "summary": result.summary,
        "calibration": {"per_label": json.loads(result.calibration.to_json(orient="index")), "file": result.calibration.attrs.get("file")},
        "subgroups": json.loads(result.subgroups.to_json(orient="records")),
        "subgroup_notes": result.subgroups.attrs.get("notes", []),
        "agreement": json.loads(result.agreement.to_json(orient="index")) if not result.agreement.empty else None,
        "unanimous": json.loads(result.unanimous.to_json(orient="records")),
        "audit": None if audit is None else {k: v for k, v in audit.items() if k != "thumbnails_png"},
        "failed_images": failed,
        "bootstrap_resamples": e.bootstrap,
    }
    return write_report(out_dir, f"medray evaluation — {config.name}", sections, metrics)
