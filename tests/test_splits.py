import numpy as np
import pandas as pd
import pytest

from medray.data.manifest import Manifest
from medray.data.splits import LeakageError, assert_patient_disjoint, split_by_patient


def synthetic(patients=300, prevalence=0.3, seed=1) -> Manifest:
    """Patients with 1–4 studies each; a positive patient's finding shows on every study."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        positive = rng.random() < prevalence
        rows += [{"image": f"/x/{p}_{s}.png", "patient_id": str(p), "Mass": float(positive), "Nodule": float(rng.random() < 0.2)}
                 for s in range(int(rng.integers(1, 5)))]  # fmt: skip
    return Manifest(pd.DataFrame(rows), ["Mass", "Nodule"])


def test_no_patient_appears_in_two_splits():
    splits = split_by_patient(synthetic(), val=0.15, test=0.15, min_positive=0.5, seed=0)
    groups = splits.groupby("patient_id")["split"].nunique()
    assert (groups == 1).all()
    assert set(splits["split"]) == {"train", "val", "test"}


def test_every_image_keeps_exactly_one_split():
    manifest = synthetic()
    splits = split_by_patient(manifest, seed=0)
    assert len(splits) == len(manifest.frame)
    assert splits["split"].notna().all()


def test_val_and_test_reach_the_minimum_positive_share_when_the_data_allow():
    splits = split_by_patient(synthetic(prevalence=0.3), val=0.1, test=0.1, min_positive=0.5, label="Mass", seed=0)
    for name in ("val", "test"):
        part = splits[splits["split"] == name]
        assert part["Mass"].mean() >= 0.5, name
        assert abs(len(part) - 0.1 * len(splits)) <= 4  # size as requested, within one patient


def test_train_keeps_its_share_of_positive_patients_when_positives_are_scarce():
    splits = split_by_patient(synthetic(prevalence=0.05), val=0.15, test=0.15, min_positive=0.5, seed=0, train_keeps_positive=0.5)
    positive = splits[splits["Mass"] == 1].groupby("patient_id")["split"].first()
    assert (positive == "train").mean() >= 0.5


def test_split_is_stable_for_a_seed_and_changes_with_it():
    manifest = synthetic()
    first = split_by_patient(manifest, seed=7)["split"]
    assert first.equals(split_by_patient(manifest, seed=7)["split"])
    assert not first.equals(split_by_patient(manifest, seed=8)["split"])


def test_overlap_is_detected_not_assumed():
    frame = pd.DataFrame({"patient_id": ["a", "a", "b"], "split": ["train", "test", "val"]})
    with pytest.raises(LeakageError, match="1 patients"):
        assert_patient_disjoint(frame)


def test_unknown_split_label_is_a_clear_error():
    with pytest.raises(ValueError, match="'Hernia' is not a label"):
        split_by_patient(synthetic(), label="Hernia")
