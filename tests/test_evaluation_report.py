"""The evaluation report on a real trained run: consensus votes attached, a leakage audit result, every
section present when Chromium renders the HTML; `medray explain` and `medray compare` on the same run."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medray.cli import main
from medray.config import ConfigError, build_config
from medray.data.labels import attach
from medray.data.manifest import read_manifest, write_manifest
from medray.evaluation.compare import compare
from medray.evaluation.evaluate import evaluate
from medray.evaluation.explain import overlay_name
from medray.evaluation.metrics import predictive_values
from medray.training.trainer import train

SECTIONS = ("summary", "data", "audit", "ground-truth", "metrics", "curves", "calibration", "subgroups", "errors", "model-card")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, split_manifest_path, demo_dir, ray_session):
    root = tmp_path_factory.mktemp("report")
    votes = pd.read_csv(demo_dir / "rater_votes.csv")
    voted = attach(read_manifest(split_manifest_path), votes, replace_labels=False)
    # As a manifest written before ingest normalised metadata: ages as free text, a third of them '50+'.
    voted.frame["age"] = voted.frame["age"].map("{:.0f}".format).where(voted.frame.index % 3 != 0, "50+")
    manifest_path = write_manifest(voted, str(root / "voted.parquet"))
    config = build_config({
        "name": "report", "storage": str(root),
        "data": {"manifest": manifest_path, "image_size": 32},
        "train": {"epochs": 1, "workers": 1, "batch_size": 16},
        "evaluate": {"bootstrap": 200, "gallery": 1, "deployment_prevalence": {"Mass": 0.02}, "rater_votes": str(demo_dir / "rater_votes.csv")},
    })  # fmt: skip
    train(config)
    audit_dir = root / "report" / "audit"
    audit_dir.mkdir(parents=True)
    audit = {"passed": False, "checks": [{"name": "patient overlap", "passed": False, "count": 2, "detail": "2 patients in two splits"}],
             "near_duplicates": [{"a": "x.png", "b": "y.png", "split_a": "train", "split_b": "test", "distance": 2}], "thumbnails": None}  # fmt: skip
    (audit_dir / "audit.json").write_text(json.dumps(audit))
    return config, evaluate(config)


def test_metrics_json_holds_each_label_with_patient_intervals_prevalence_and_calibration(evaluated):
    config, evaluation = evaluated
    metrics = json.loads(Path(evaluation.paths["metrics.json"]).read_text())
    labels = read_manifest(config.manifest).labels
    assert set(metrics["labels"]) == set(labels) and metrics["bootstrap_resamples"] == 200
    for row in metrics["labels"].values():
        assert 0 <= row["prevalence"] <= 1
        if row["auroc"] is not None:
            assert row["auroc_lo"] <= row["auroc"] <= row["auroc_hi"]
    mass = metrics["labels"]["Mass"]
    assert mass["deployment_prevalence"] == 0.02
    assert mass["deployment_ppv"] == pytest.approx(predictive_values(mass["sensitivity"], mass["specificity"], 0.02)[0])
    outputs = json.loads(Path(metrics["calibration"]["file"]).read_text())["outputs"]
    assert len(outputs) == len(labels) and {o["method"] for o in outputs} <= {"none", "prior", "platt", "isotonic"}
    for label in labels:  # calibration never worsens val ECE, and the report says which map each label kept
        per_label = metrics["calibration"]["per_label"][label]
        assert per_label["val_ece_after"] <= per_label["val_ece_before"] and per_label["method"] in {o["method"] for o in outputs}
    assert all(isinstance(row["positive_patients"], (int, float)) and isinstance(row["val_separated"], bool) for row in metrics["labels"].values())
    assert metrics["audit"]["passed"] is False
    # The three simulated raters, each a point on every label's ROC curve, and how many lie under it.
    # (A label whose test images are all negative has no sensitivity, and no points.)
    measurable = [label for label in labels if 0 < metrics["labels"][label]["positives"] < metrics["labels"][label]["n"]]
    assert measurable and {(r["label"], r["rater"]) for r in metrics["raters"]} == {(label, f"R{k}") for label in measurable for k in (1, 2, 3)}
    assert set(metrics["raters_under_roc"]) == set(measurable) and all(0 <= n <= 3 for n in metrics["raters_under_roc"].values())
    # Both consensus rules against the reference labels, and each rater's EM estimates beside the measured values.
    assert {(r["label"], r["consensus"]) for r in metrics["consensus_vs_reference"]} == {(label, rule) for label in labels for rule in ("majority vote", "Dawid-Skene")}
    assert all(0 <= r["em_sensitivity"] <= 1 and 0 <= r["em_specificity"] <= 1 for r in metrics["raters"])
    assert set(metrics["agreement"]) == set(labels)
    assert {"sex", "age band", "view"} <= {row["dimension"] for row in metrics["subgroups"]}
    assert {row["cases"] for row in metrics["unanimous"]} == {"all", "unanimous"}


def test_the_report_says_what_it_left_out_how_accuracy_is_measured_and_that_intended_use_is_not_stated(evaluated):
    _, evaluation = evaluated
    report = Path(evaluation.paths["report.md"]).read_text()
    notes = json.loads(Path(evaluation.paths["metrics.json"]).read_text())["subgroup_notes"]
    assert any(n.startswith("age band: ") and "have no readable value and are in no group" in n for n in notes)
    assert all(note in report for note in notes)
    assert "accuracy (val threshold)" in report and "accuracy (0.5)" in report and "mean accuracy at 0.5" in report
    assert "Not stated (set evaluate.intended_use)" in report and "chest radiographs" not in report
    assert "augment_preview.png" in report  # the data section shows the policy the model was trained with


def test_subgroup_rows_show_sizes_and_mark_small_groups(evaluated):
    _, evaluation = evaluated
    table = evaluation.subgroups
    assert (table["images"] > 0).all() and (table["patients"] <= table["images"]).all()
    small = (table["positives"] < 10) | (table["negatives"] < 10)
    assert (table["small"] == small).all()
    flagged = table[table["below_overall"]]
    overall_lo = evaluation.table.loc[flagged["label"], "auroc_lo"].to_numpy()
    assert (flagged["auroc_hi"].to_numpy() < overall_lo).all()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (CI installs Debian's package)")
def test_the_html_report_renders_in_chromium_with_every_section(evaluated, tmp_path):
    _, evaluation = evaluated
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", f"file://{evaluation.paths['report.html']}"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in dom, f"section {anchor} missing from the rendered report"
    for text in ("Leakage audit FAILED", "patient overlap", "Fleiss", "Intended use", "Training data", "Evaluation data",
                 "Subgroup caveats", "Limitations", "PPV (deployment)", "after the calibration chosen on val", "NumRadsUnderROC"):  # fmt: skip
        assert text in dom, text
    for figure in ("ROC curves", "Precision-recall curves", "Reliability diagrams", "Subgroup AUROC", "Error gallery", "Augmentation 'cxr'"):
        assert f'<img alt="{figure}' in dom, f"figure {figure} missing"
    assert dom.count('src="data:image/png;base64,') == dom.count("<img"), "every figure is embedded in the page"


def test_medray_explain_writes_a_gradcam_overlay_per_image_and_label(evaluated, demo_dir, tmp_path):
    config, _ = evaluated
    images = sorted((demo_dir / "images").glob("*.png"))[:2]
    main(["explain", config.run_dir, *map(str, images), "--out", str(tmp_path), "--labels", "Mass,Effusion"])
    written = sorted(p.name for p in tmp_path.glob("*.png"))
    assert written == sorted(overlay_name(str(i), label) for i in images for label in ("Mass", "Effusion"))
    from PIL import Image

    overlay = np.asarray(Image.open(tmp_path / written[0]))
    assert overlay.shape == (32, 32, 3)


def test_comparing_a_checkpoint_with_itself_finds_no_difference(evaluated, tmp_path):
    config, _ = evaluated
    table, paths = compare(config, config.run_dir, config.run_dir, str(tmp_path))
    known = table.dropna(subset=["auroc_a"])
    assert len(known) and (known["difference"].abs() < 1e-12).all() and (known["p_value"] == 1.0).all()
    assert "DeLong" in Path(paths["compare.md"]).read_text()


def test_single_task_baselines_train_one_model_per_label_and_compare_each_with_the_run_by_delong(evaluated):
    from medray.evaluation.compare import read_baselines
    from medray.sweeps.baselines import run_baselines
    from medray.training import checkpoint

    config, evaluation = evaluated
    # The run trained with one whole CPU per worker: on this 2-CPU Ray, a trial and its data need less.
    with pytest.raises(ConfigError, match="cannot hold one baseline training"):
        run_baselines(config, ["Mass"])
    config = config.model_copy(update={"train": config.train.model_copy(update={"cpus_per_worker": 0.5})})
    result = run_baselines(config, ["Mass", "Cardiomegaly"])
    table = result.table
    assert list(table.index) == ["Mass", "Cardiomegaly"]
    for label, row in table.iterrows():
        assert checkpoint.read_meta(row["checkpoint"])["labels"] == [label]  # a model of that label alone
        # The multi-label side is the run's own model on the same test images: the evaluation's AUROC.
        assert row["multi_label_auroc"] == pytest.approx(evaluation.table.loc[label, "auroc"])
        assert row["difference"] == pytest.approx(row["single_task_auroc"] - row["multi_label_auroc"])
        assert 0 <= row["p_value"] <= 1
    written = read_baselines(config.run_dir)
    assert list(written.index) == list(table.index)
    assert written[["single_task_auroc", "p_value"]].to_numpy(float) == pytest.approx(table[["single_task_auroc", "p_value"]].to_numpy(float))
