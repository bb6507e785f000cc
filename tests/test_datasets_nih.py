"""NIH ChestX-ray14 exactly as published: header quirks, `Patient Sex`, the official split lists."""

import io

import numpy as np
import pandas as pd
from PIL import Image

from medray.data.datasets import NIH_LABELS, Options, ingest_nih
from medray.data.manifest import read_manifest

HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient {sex},View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32), 90, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_release(root, patients: int = 20, studies: int = 2, sex_column: str = "Gender") -> list[str]:
    """A miniature release: images spread over images_001/images and images_002/images, as published."""
    lines, names, image = [HEADER.format(sex=sex_column)], [], png()
    findings = ["No Finding", "Cardiomegaly", "Effusion|Mass", "Hernia", "Pleural_Thickening|Nodule"]
    for p in range(1, patients + 1):
        for s in range(studies):
            name = f"{p:08d}_{s:03d}.png"
            folder = root / f"images_00{1 + p % 2}" / "images"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(image)
            lines.append(f"{name},{findings[(p + s) % 5]},{s},{p},{40 + p:03d},{'MF'[p % 2]},PA,2500,2048,0.143,0.143,")
            names.append(name)
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    return names


def test_the_published_csv_gives_14_labels_and_no_finding_rows_are_all_negative(tmp_path):
    write_release(tmp_path, patients=10, sex_column="Sex")
    result = ingest_nih(
        str(tmp_path / "Data_Entry_2017.csv"), str(tmp_path / "m.parquet"), options=Options(check=False)
    )
    manifest = read_manifest(result.manifest)
    frame = manifest.frame
    assert manifest.labels == list(NIH_LABELS) and len(NIH_LABELS) == 14
    assert result.balance == "20 in = 20 kept + 0 quarantined"
    assert set(frame["sex"]) == {"M", "F"} and frame["age"].between(41, 50).all()
    normal = frame[frame["image"].str.endswith("00000004_001.png")].iloc[0]  # (4 + 1) % 5 == 0: No Finding
    assert (normal[list(NIH_LABELS)] == 0).all()
    both = frame[frame["image"].str.endswith("00000001_001.png")].iloc[0]  # Effusion|Mass
    assert (both["Effusion"], both["Mass"], both["Nodule"]) == (1.0, 1.0, 0.0)


def test_the_official_split_is_kept_with_val_carved_from_train_val_by_patient(tmp_path):
    names = write_release(tmp_path, patients=40)
    test = [n for n in names if int(n[:8]) <= 10]
    train_val = [n for n in names if int(n[:8]) > 10][:-1]  # one image in neither list
    (tmp_path / "test_list.txt").write_text("\n".join(test) + "\n")
    (tmp_path / "train_val_list.txt").write_text("\n".join(train_val) + "\n")

    result = ingest_nih(
        str(tmp_path / "Data_Entry_2017.csv"), str(tmp_path / "m.parquet"), options=Options(check=False), val=0.2
    )
    frame = read_manifest(result.manifest).frame
    name = frame["image"].str.rsplit("/", n=1).str[-1]
    assert sorted(name[frame["split"] == "test"]) == sorted(test)
    assert frame.groupby("patient_id")["split"].nunique().max() == 1  # no patient straddles train and val
    assert frame.loc[frame["split"] == "val", "patient_id"].nunique() == 6  # 20 % of 30 train_val patients
    assert frame.loc[frame["split"] == "train", "patient_id"].nunique() == 24
    assert frame["split"].isna().sum() == 1


def test_published_ingest_decodes_every_image_and_quarantines_unknown_findings(tmp_path, ray_session):
    write_release(tmp_path, patients=4)
    csv = tmp_path / "Data_Entry_2017.csv"
    csv.write_text(csv.read_text().replace("00000002_000.png,Effusion|Mass", "00000002_000.png,Mass|Unicorn"))
    result = ingest_nih(str(csv), str(tmp_path / "m.parquet"))
    quarantine = pd.read_parquet(result.quarantine)
    assert result.balance == "8 in = 7 kept + 1 quarantined"
    assert quarantine["reason"].tolist() == ["unknown finding label(s) ['Unicorn']"]
