import shutil

import numpy as np
import pandas as pd
import pytest

from medray.data.datasets import ingest_nih
from medray.data.demo_data import FINDINGS
from medray.data.manifest import read_manifest
from s3 import upload_tree


def test_ingest_writes_the_canonical_manifest(demo_manifest, demo_dir):
    frame = demo_manifest.frame
    entries = pd.read_csv(demo_dir / "Data_Entry_2017.csv")
    assert demo_manifest.labels == list(FINDINGS)
    assert len(frame) == len(entries)
    assert {"image", "patient_id", "study_id", "sex", "age", "view", *FINDINGS} <= set(frame.columns)
    assert frame["image"].str.startswith(str(demo_dir)).all()
    assert frame[list(FINDINGS)].dtypes.eq(np.float32).all()
    first = entries.iloc[0]
    row = frame[frame["image"].str.endswith(first["Image Index"])].iloc[0]
    for label in FINDINGS:
        assert row[label] == float(label in first["Finding Labels"])


def test_missing_corrupt_and_mislabelled_images_are_quarantined_not_dropped(tmp_path, demo_dir, ray_session):
    data = tmp_path / "nih"
    shutil.copytree(demo_dir, data, ignore=shutil.ignore_patterns("*.parquet"))
    entries = pd.read_csv(data / "Data_Entry_2017.csv")
    names = entries["Image Index"].tolist()
    (data / "images" / names[0]).unlink()
    (data / "images" / names[1]).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    lines = (data / "Data_Entry_2017.csv").read_text().splitlines()
    lines[3] = lines[3].replace(lines[3].split(",")[1], "Mass|Dragon", 1)
    (data / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")

    result = ingest_nih(str(data / "Data_Entry_2017.csv"), str(tmp_path / "m.parquet"), labels=list(FINDINGS))
    quarantine = pd.read_parquet(result.quarantine)
    assert result.images + result.quarantined == len(entries)
    reasons = dict(zip(quarantine["image"].str.rsplit("/", n=1).str[-1], quarantine["reason"]))
    assert reasons[names[0]] == "image file not found"
    assert "not a readable image" in reasons[names[1]] or "cannot decode" in reasons[names[1]]
    assert "Dragon" in reasons[names[2]]


def test_unknown_labels_are_refused_with_the_known_ones(demo_dir):
    with pytest.raises(ValueError, match="not NIH ChestX-ray14 labels"):
        ingest_nih(str(demo_dir / "Data_Entry_2017.csv"), "/tmp/x.parquet", labels=["Mass", "Fracture"])


def test_ingest_reads_and_writes_s3(demo_dir, ray_session, s3):
    client, bucket = s3
    upload_tree(client, bucket, demo_dir, "nih")
    out = f"s3://{bucket}/manifests/manifest.parquet"
    result = ingest_nih(f"s3://{bucket}/nih/Data_Entry_2017.csv", out, labels=list(FINDINGS), check=True)
    manifest = read_manifest(out)
    assert result.quarantined == 0
    assert len(manifest.frame) == len(pd.read_csv(demo_dir / "Data_Entry_2017.csv"))
    assert manifest.frame["image"].str.startswith(f"s3://{bucket}/nih/images/").all()
