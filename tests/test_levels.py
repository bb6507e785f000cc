"""Study- and patient-level results: each study scored by its images' highest probability."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from medray.config import EvaluateConfig
from medray.evaluation.evaluate import level_tables
from medray.evaluation.levels import aggregate

IMAGES = pd.DataFrame({
    "image": ["a", "b", "c", "d", "e"],
    "patient_id": ["p1", "p1", "p1", "p2", "p2"],
    "study_id": ["1", "1", "2", "1", "1"],  # numbered within each patient, as many archives do
    "Mass": [0.0, 1.0, 0.0, np.nan, np.nan],
    "prob_Mass": [0.2, 0.7, 0.1, 0.4, 0.9],
})  # fmt: skip


def test_a_study_takes_the_highest_probability_of_its_images_and_is_positive_when_any_image_is():
    studies = aggregate(IMAGES, ["Mass"], ["prob_Mass"], "study").set_index(["patient_id", "study_id"])
    assert len(studies) == 3  # p1's study 1 and p2's study 1 are different studies
    assert studies.loc[("p1", "1"), ["Mass", "prob_Mass", "images"]].tolist() == [1.0, 0.7, 2]
    assert studies.loc[("p1", "2"), ["Mass", "prob_Mass", "images"]].tolist() == [0.0, 0.1, 1]
    assert np.isnan(studies.loc[("p2", "1"), "Mass"]) and studies.loc[("p2", "1"), "prob_Mass"] == 0.9
    patients = aggregate(IMAGES, ["Mass"], ["prob_Mass"], "patient").set_index("patient_id")
    assert patients.loc["p1", ["Mass", "prob_Mass", "images"]].tolist() == [1.0, 0.7, 3]


def test_the_study_table_measures_auroc_on_study_maxima_with_thresholds_from_val_studies():
    rng = np.random.default_rng(0)
    rows = []
    for split in ("val", "test"):
        for s in range(60):
            positive = s % 3 == 0
            for view in range(2):  # PA and lateral; the finding shows on one view only
                p = rng.uniform(0.5, 1.0) if positive and view == 0 else rng.uniform(0.0, 0.7)
                rows.append({"split": split, "patient_id": f"{split}{s}", "study_id": "1", "Mass": float(positive and view == 0),
                             "prob_Mass": p})  # fmt: skip
    frame = pd.DataFrame(rows)
    val, test = frame[frame["split"] == "val"], frame[frame["split"] == "test"]
    tables = level_tables("multi-label", ["Mass"], ["prob_Mass"], val, test, EvaluateConfig(bootstrap=50, levels=["image", "study"]))
    by_study = test.groupby("patient_id")[["Mass", "prob_Mass"]].max()
    assert tables["study"].loc["Mass", "auroc"] == pytest.approx(roc_auc_score(by_study["Mass"], by_study["prob_Mass"]))
    assert tables["study"].loc["Mass", "n"] == 60 and tables["study"].loc["Mass", "positives"] == 20
    assert "patient" not in tables
    # One image per study: the study table would repeat the image table, so there is none.
    single = frame.drop_duplicates(["split", "patient_id"])
    assert level_tables("multi-label", ["Mass"], ["prob_Mass"], single[single["split"] == "val"], single[single["split"] == "test"],
                        EvaluateConfig(bootstrap=50)) == {}  # fmt: skip
