"""Any CSV/Parquet with a column mapping (HAM10000, EyePACS, APTOS layouts), class-per-folder trees,
and the `medray ingest` command line for them."""

import io

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from medray.cli import main
from medray.config import ColumnsConfig
from medray.data.datasets import Options, ingest_folder, ingest_table
from medray.data.datasets.table import eye_patient
from medray.data.manifest import read_manifest

HAM_CLASSES = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def image(fmt: str = "JPEG", value: int = 100) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def write_ham10000(root) -> None:
    """``HAM10000_metadata.csv`` + images split over ``HAM10000_images_part_1`` / ``_part_2``, as published."""
    rows = []
    for i in range(8):
        lesion, name = f"HAM_{i // 2:07d}", f"ISIC_{27419 + i:07d}"  # two images per lesion
        folder = root / f"HAM10000_images_part_{1 + i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.jpg").write_bytes(image())
        rows.append({"lesion_id": lesion, "image_id": name, "dx": HAM_CLASSES[i % 7], "dx_type": "histo",
                     "age": 40.0 + i, "sex": "male", "localization": "back"})  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "HAM10000_metadata.csv", index=False)


def test_ham10000_groups_images_of_one_lesion(tmp_path, ray_session):
    write_ham10000(tmp_path)
    columns = ColumnsConfig(image="image_id", image_pattern="{}.jpg", patient=None, label="dx", classes=HAM_CLASSES,
                            metadata={"age": "age", "sex": "sex", "localization": "site"})  # fmt: skip
    result = ingest_table(str(tmp_path / "HAM10000_metadata.csv"), str(tmp_path / "m.parquet"), columns,
                          task="multi-class", grouping="ham10000")  # fmt: skip
    manifest = read_manifest(result.manifest)
    frame = manifest.frame
    assert manifest.task == "multi-class" and manifest.labels == HAM_CLASSES
    assert (frame.groupby("patient_id")["image"].count() == 2).all()
    assert (frame["patient_id"] == frame["lesion_id"]).all()
    assert frame.loc[frame["image"].str.endswith("ISIC_0027420.jpg"), "bcc"].item() == 1.0
    assert set(frame["site"]) == {"back"} and result.balance == "8 in = 8 kept + 0 quarantined"


def test_both_eyes_of_a_patient_form_one_group():
    assert [eye_patient(x) for x in ("10_left", "10_right", "217-LEFT", "000c1434d8d7")] == [
        "10",
        "10",
        "217",
        "000c1434d8d7",
    ]


def test_eyepacs_grades_from_parquet_are_ordinal_with_both_eyes_together(tmp_path):
    (tmp_path / "train").mkdir()
    rows = []
    for patient in (10, 13, 15):
        for side, level in (("left", patient % 5), ("right", (patient + 1) % 5)):
            (tmp_path / "train" / f"{patient}_{side}.jpeg").write_bytes(image())
            rows.append({"image": f"{patient}_{side}", "level": level})
    pd.DataFrame(rows).to_parquet(tmp_path / "trainLabels.parquet")
    columns = ColumnsConfig(image="image", image_pattern="train/{}.jpeg", patient=None, label="level",
                            classes=["0", "1", "2", "3", "4"])  # fmt: skip
    result = ingest_table(str(tmp_path / "trainLabels.parquet"), str(tmp_path / "m.parquet"), columns,
                          task="ordinal", grouping="eyes", options=Options(check=False))  # fmt: skip
    manifest = read_manifest(result.manifest)
    frame = manifest.frame
    assert manifest.task == "ordinal" and sorted(frame["patient_id"].unique()) == ["10", "13", "15"]
    assert frame.loc[frame["image"].str.endswith("13_right.jpeg"), "4"].item() == 1.0


def test_the_command_line_ingests_a_mapped_csv_from_a_config(tmp_path, ray_session, capsys):
    for i in range(4):
        (tmp_path / f"{i}.png").write_bytes(image("PNG", 50 * i))
    pd.DataFrame({"file": [f"{i}.png" for i in range(4)], "subject": ["a", "a", "b", "c"],
                  "Fracture": [1, 0, 0, ""], "Sex": ["F", "F", "M", "F"]}).to_csv(tmp_path / "labels.csv", index=False)  # fmt: skip
    config = {
        "ingest": {
            "columns": {"image": "file", "patient": "subject", "labels": ["Fracture"], "metadata": {"Sex": "sex"}}
        }
    }
    (tmp_path / "ingest.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "m.parquet"
    main(
        ["ingest", str(tmp_path / "labels.csv"), str(out), "--format", "csv", "--config", str(tmp_path / "ingest.yaml")]
    )
    assert "4 in = 4 kept + 0 quarantined" in capsys.readouterr().out
    frame = read_manifest(str(out)).frame
    assert frame["Fracture"].tolist()[:3] == [1.0, 0.0, 0.0] and np.isnan(frame["Fracture"].iloc[3])
    assert frame["sex"].tolist() == ["F", "F", "M", "F"]


def test_class_per_folder_trees_are_multi_class_with_patient_folders(tmp_path):
    for cls, patient, n in (("benign", "p1", 2), ("malignant", "p2", 1), ("malignant", "p3", 2)):
        (tmp_path / cls / patient).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (tmp_path / cls / patient / f"{i}.png").write_bytes(image("PNG"))
    (tmp_path / "stray.png").write_bytes(image("PNG"))
    result = ingest_folder(str(tmp_path), str(tmp_path / "out" / "m.parquet"), options=Options(check=False))
    manifest = read_manifest(result.manifest)
    frame = manifest.frame
    assert manifest.task == "multi-class" and manifest.labels == ["benign", "malignant"]
    assert frame.groupby("patient_id")["malignant"].sum().to_dict() == {"p1": 0, "p2": 1, "p3": 2}
    assert pd.read_parquet(result.quarantine)["reason"].str.startswith("not inside a class folder").tolist() == [True]
    assert result.balance == "6 in = 5 kept + 1 quarantined"
