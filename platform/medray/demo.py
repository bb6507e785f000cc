"""The end-to-end slice on generated data: demo data → ingest (+ rater agreement) → split → train →
evaluate → score, ending with the evaluation report's figures.

Every step writes a file a user can open with pandas and is the same library call the individual
commands make. Rerunning the demo reuses the generated data and resumes the named run.
"""

from __future__ import annotations

import time

import pandas as pd

from medray.config import JobConfig
from medray.data.audit import audit
from medray.data.datasets import ingest_nih
from medray.data.demo_data import FINDINGS, generate
from medray.data.labels import agreement_summary, attach
from medray.data.manifest import Manifest, read_manifest, write_manifest
from medray.data.splits import split_with_config, summary
from medray.evaluation.evaluate import evaluate
from medray.evaluation.experts import raters_under_curve
from medray.io import storage
from medray.scoring.score import score
from medray.training.trainer import train


def _step(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def run_demo(config: JobConfig) -> None:
    if storage.is_s3(config.run_dir):
        raise ValueError("the demo writes its generated data to local disk: set storage to a local path")
    started = time.monotonic()
    data_dir = storage.join(config.run_dir, "data")
    csv = storage.join(data_dir, "Data_Entry_2017.csv")

    _step("1/6 demo data")
    if not storage.exists(csv):
        d = config.demo_data
        generate(data_dir, patients=d.patients, image_size=d.image_size, seed=d.seed)
    print(f"NIH ChestX-ray14 layout in {data_dir}")

    _step("2/6 ingest")
    ingested = ingest_nih(csv, storage.join(data_dir, "ingested.parquet"), labels=list(FINDINGS))
    print(f"{ingested.images} images in the manifest, {ingested.quarantined} quarantined")
    # The NIH labels stay the reference standard; the three simulated raters' votes add how far
    # readers agree on each image, which the report sets beside the metrics.
    votes = pd.read_csv(storage.join(data_dir, "rater_votes.csv"))
    manifest = attach(read_manifest(ingested.manifest), votes, replace_labels=False)
    print(agreement_summary(manifest.frame, manifest.labels).round(3).to_string())

    _step("3/6 patient-level split and leakage audit")
    frame = split_with_config(manifest, config.split, force=True)  # demo data: always split by patient
    write_manifest(Manifest(frame, manifest.labels, manifest.task), config.manifest)
    print(summary(frame, manifest.labels).round(3).to_string())
    # The report shows this audit: no patient, study or near-duplicate image on both sides of a split.
    leakage = audit(config.manifest, storage.join(config.run_dir, "audit"), config.audit.max_distance, config.audit.thumbnails)
    counts = ", ".join(f"{c['name']} {c['status'] if c['count'] is None else c['count']}" for c in leakage.checks)
    print(f"leakage audit: {'passed' if leakage.passed else 'FAILED'} ({counts})")

    _step("4/6 train (Ray Train, DDP)")
    result = train(config)
    print(f"best checkpoint: {result.best_checkpoint} (val mean AUROC {result.metrics['val_auroc_mean']:.3f})")

    _step("5/6 evaluate on the test split (the calibration fitted on val goes into the checkpoint)")
    # The simulated raters read every test image too: the report puts each on the model's ROC curve.
    votes_file = config.evaluate.rater_votes or storage.join(data_dir, "rater_votes.csv")
    evaluation = evaluate(config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"rater_votes": votes_file})}))

    _step("6/6 score the image archive (Ray Data), calibrated")
    scoring = score(config.model_copy(update={"score": config.score.model_copy(update={"input": config.score.input or storage.join(data_dir, "images")})}))
    print(f"{scoring.inputs} images in, {scoring.scored} scored, {scoring.errors} errors")

    _step("the evaluation report")
    t, c = evaluation.table, evaluation.calibration
    shown = pd.DataFrame({
        "prevalence": t["prevalence"],
        "AUROC (95% CI)": [f"{a:.3f} ({lo:.3f}-{hi:.3f})" for a, lo, hi in zip(t["auroc"], t["auroc_lo"], t["auroc_hi"])],
        "sensitivity": t["sensitivity"], "specificity": t["specificity"],
        "ECE before": c["ece_before"], "ECE after": c.get("ece_after", c["ece_before"]),
        "calibration": c.get("method", "off"),
    })  # fmt: skip
    print(shown.round(3).to_string())
    flagged = evaluation.subgroups[evaluation.subgroups["below_overall"]] if len(evaluation.subgroups) else []
    print(f"mean test AUROC: {evaluation.mean_auroc:.3f}; subgroups flagged below overall: {len(flagged)}")
    if len(evaluation.experts):
        under, raters = raters_under_curve(evaluation.experts), evaluation.experts.groupby("label").size()
        print("raters under the model's ROC curve: " + ", ".join(f"{label} {n} of {raters[label]}" for label, n in under.items()))

    _step(f"done in {time.monotonic() - started:.0f} s")
    print(f"predictions: {scoring.output}")
    print(f"metrics:     {evaluation.paths['metrics.json']}")
    print(f"report:      {evaluation.paths['report.html']}")
