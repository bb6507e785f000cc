"""CheXpert as published: train.csv / valid.csv, patient from the path, 1/0/−1/blank, policies per label."""

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medray.data.datasets import CHEXPERT_LABELS, Options, ingest_chexpert
from medray.data.manifest import read_manifest

HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]


def jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32), 120, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def chexpert(tmp_path):
    """``CheXpert-v1.0-small/{train,valid}.csv`` + ``{train,valid}/patientNNNNN/studyN/viewN_<view>.jpg``."""
    root = tmp_path / "CheXpert-v1.0-small"
    rows = {"train": [], "valid": []}
    cells = {
        "Cardiomegaly": "-1.0",
        "Edema": "-1.0",
        "Atelectasis": "-1.0",
        "Pleural Effusion": "1.0",
        "Fracture": "0.0",
    }
    for split, patients in (("train", (1, 2, 3)), ("valid", (64541,))):
        for p in patients:
            for study, view, lateral in ((1, 1, False), (1, 2, True), (2, 1, False)):
                path = f"{split}/patient{p:05d}/study{study}/view{view}_{'lateral' if lateral else 'frontal'}.jpg"
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                (root / path).write_bytes(jpeg())
                row = dict.fromkeys(CHEXPERT_LABELS, "")
                row.update(cells if split == "train" else {"Edema": "1.0", "Cardiomegaly": "0.0"})
                row.update({"Path": f"CheXpert-v1.0-small/{path}", "Sex": "Female", "Age": "68",
                            "Frontal/Lateral": "Lateral" if lateral else "Frontal", "AP/PA": "" if lateral else "AP"})  # fmt: skip
                rows[split].append(row)
    for split, table in rows.items():
        pd.DataFrame(table, columns=HEADER).to_csv(root / f"{split}.csv", index=False)
    return root


def test_uncertainty_policy_is_chosen_per_label(chexpert, tmp_path):
    result = ingest_chexpert(
        str(chexpert), str(tmp_path / "m.parquet"), options=Options(check=False),
        uncertainty="ignore", uncertainty_per_label={"Edema": "ones", "Atelectasis": "zeros"},
    )  # fmt: skip
    frame = read_manifest(result.manifest).frame
    train = frame[frame["source_split"] == "train"]
    assert train["Cardiomegaly"].isna().all()  # U-Ignore: the default
    assert (train["Edema"] == 1).all() and (train["Atelectasis"] == 0).all()  # U-Ones, U-Zeros
    assert (train["Pleural Effusion"] == 1).all() and (train["Fracture"] == 0).all()
    assert train["Pneumonia"].isna().all()  # blank: not mentioned, unknown
    assert result.balance == "12 in = 12 kept + 0 quarantined"


def test_patient_and_study_come_from_the_path_and_views_are_metadata(chexpert, tmp_path):
    result = ingest_chexpert(str(chexpert), str(tmp_path / "m.parquet"), ["Edema"], Options(check=False))
    frame = read_manifest(result.manifest).frame
    assert sorted(frame["patient_id"].unique()) == ["patient00001", "patient00002", "patient00003", "patient64541"]
    assert frame.loc[frame["patient_id"] == "patient00001", "study_id"].nunique() == 2
    assert set(frame["view"]) == {"Frontal", "Lateral"} and set(frame["projection"]) == {"AP", ""}
    assert frame["image"].str.startswith(str(chexpert) + "/").all()
    assert frame["age"].eq(68).all() and set(frame["source_split"]) == {"train", "valid"}


def test_a_views_filter_keeps_frontal_images_and_records_the_rest(chexpert, tmp_path, ray_session):
    result = ingest_chexpert(str(chexpert / "train.csv"), str(tmp_path / "m.parquet"), ["Edema"], views=["frontal"])
    frame = read_manifest(result.manifest).frame
    quarantine = pd.read_parquet(result.quarantine)
    assert (frame["view"] == "Frontal").all() and len(frame) == 6
    assert quarantine["reason"].str.startswith("excluded by the views filter").all() and len(quarantine) == 3
    assert result.balance == "9 in = 6 kept + 3 quarantined"


def test_an_unknown_label_value_is_quarantined_and_bad_policies_are_refused(chexpert, tmp_path):
    table = pd.read_csv(chexpert / "train.csv", dtype=str, keep_default_na=False)
    table.loc[0, "Edema"] = "2.0"
    table.to_csv(chexpert / "train.csv", index=False)
    result = ingest_chexpert(str(chexpert / "train.csv"), str(tmp_path / "m.parquet"), ["Edema"], Options(check=False))
    assert pd.read_parquet(result.quarantine)["reason"].tolist() == [
        "unknown label value(s) in column(s) ['Edema'] (expected 1, 0, -1 or blank)"
    ]
    with pytest.raises(ValueError, match="not ingested"):
        ingest_chexpert(
            str(chexpert), str(tmp_path / "x.parquet"), ["Edema"], uncertainty_per_label={"Fracture": "ones"}
        )
