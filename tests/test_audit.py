"""The leakage audit: an image-level split of the demo data is flagged, the patient-level one passes."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medray.cli import main
from medray.data.audit import audit, study_keys
from medray.data.manifest import Manifest, write_manifest
from medray.data.splits import split_by_patient


@pytest.fixture(scope="module")
def patient_split(demo_manifest, tmp_path_factory):
    frame = split_by_patient(demo_manifest, val=0.2, test=0.2, min_positive=0.3, label="Mass", seed=0)
    return write_manifest(Manifest(frame, demo_manifest.labels), str(tmp_path_factory.mktemp("audit") / "patient.parquet"))


def image_level_split(manifest, seed=0) -> pd.DataFrame:
    """What a careless user does: every image drawn into a split on its own."""
    rng = np.random.default_rng(seed)
    return manifest.frame.assign(split=rng.choice(["train", "val", "test"], len(manifest.frame), p=[0.6, 0.2, 0.2]))


def test_the_patient_level_split_of_the_demo_data_passes_every_check(patient_split, tmp_path):
    result = audit(patient_split, str(tmp_path))
    assert result.passed, result.checks
    report = json.loads((tmp_path / "audit.json").read_text())
    assert report["passed"] is True and report["near_duplicates"] == [] and report["thumbnails"] is None
    assert [c["name"] for c in report["checks"]] == ["patient_overlap", "study_overlap", "image_overlap", "near_duplicates"]
    assert "file names" not in report["checks"][1]["detail"]  # the NIH adapter writes study_id; it is used
    assert pd.read_parquet(tmp_path / "near_duplicates.parquet").empty


def test_an_image_level_split_of_the_demo_data_is_flagged_and_the_cli_fails(demo_manifest, tmp_path, capsys):
    path = write_manifest(Manifest(image_level_split(demo_manifest), demo_manifest.labels), str(tmp_path / "random.parquet"))
    with pytest.raises(SystemExit) as exit_:
        main(["audit", path, "--out", str(tmp_path / "audit")])
    assert exit_.value.code == 1
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    overlap = next(c for c in report["checks"] if c["name"] == "patient_overlap")
    assert report["passed"] is False and not overlap["passed"] and overlap["count"] > 10
    printed = capsys.readouterr().out.splitlines()
    assert f"FAIL  patient_overlap  {overlap['count']:>6}  patients with images in more than one split" in printed  # a count, no IDs
    assert "FAILED" in (tmp_path / "audit" / "audit.md").read_text()


def test_a_re_encoded_copy_under_another_patient_id_is_a_near_duplicate(demo_manifest, demo_dir, tmp_path):
    frame = split_by_patient(demo_manifest, val=0.2, test=0.2, min_positive=0.3, label="Mass", seed=0)
    source = frame[frame["split"] == "train"].iloc[0]
    copy = tmp_path / "copy.jpg"  # resized and JPEG-compressed: different bytes, the same picture
    Image.open(source["image"]).resize((96, 96)).save(copy, quality=70)
    row = {**source.to_dict(), "image": str(copy), "patient_id": "another", "study_id": "another_0", "split": "test"}
    planted = pd.concat([frame, pd.DataFrame([row])], ignore_index=True)
    path = write_manifest(Manifest(planted, demo_manifest.labels), str(tmp_path / "planted.parquet"))

    result = audit(path, str(tmp_path / "audit"), max_distance=12)
    near = next(c for c in result.checks if c["name"] == "near_duplicates")
    assert not result.passed and near["count"] == 1
    assert result.checks[0]["passed"]  # patient IDs differ: only the pixels give it away
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    pair = report["near_duplicates"][0]
    assert (pair["a"], pair["b"], pair["split_a"], pair["split_b"]) == (source["image"], str(copy), "train", "test")
    assert pair["distance"] <= 12
    assert report["thumbnails"] == "near_duplicates.png"
    assert Image.open(tmp_path / "audit" / "near_duplicates.png").size[0] > 100


def test_one_study_in_two_splits_is_an_error_even_under_two_patient_ids(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, (4, 32, 32), dtype=np.uint8)
    paths = []
    for i, p in enumerate(pixels):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(p).save(paths[-1])
    frame = pd.DataFrame({"image": paths, "patient_id": ["a", "b", "c", "d"], "study_id": ["s1", "s1", "s2", "s3"],
                          "split": ["train", "test", "train", "val"], "Mass": [0.0, 0.0, 1.0, 0.0]})  # fmt: skip
    path = write_manifest(Manifest(frame, ["Mass"]), str(tmp_path / "m.parquet"))
    result = audit(path, str(tmp_path / "audit"))
    study = next(c for c in result.checks if c["name"] == "study_overlap")
    assert not result.passed and study["count"] == 1 and result.checks[0]["count"] == 0


def test_without_a_study_column_study_overlap_is_not_checked_rather_than_passed(tmp_path, capsys):
    paths = []
    for i, p in enumerate(np.random.default_rng(1).integers(0, 255, (3, 32, 32), dtype=np.uint8)):
        paths.append(str(tmp_path / f"scan{i}.png"))
        Image.fromarray(p).save(paths[-1])
    frame = pd.DataFrame({"image": paths, "patient_id": ["a", "b", "c"], "split": ["train", "val", "test"], "Mass": [0.0, 1.0, 0.0]})
    path = write_manifest(Manifest(frame, ["Mass"]), str(tmp_path / "m.parquet"))
    main(["audit", path, "--out", str(tmp_path / "audit")])
    study = next(c for c in json.loads((tmp_path / "audit" / "audit.json").read_text())["checks"] if c["name"] == "study_overlap")
    assert study["status"] == "not checked" and study["count"] is None
    assert any(line.startswith("not checked  study_overlap") for line in capsys.readouterr().out.splitlines())
    assert "| study_overlap | not checked | – |" in (tmp_path / "audit" / "audit.md").read_text()


def test_studies_come_from_nih_file_names_when_there_is_no_study_column():
    frame = pd.DataFrame({"image": ["/a/images_001/00000007_002.png", "s3://b/images_004/00000007_002.png"]})
    keys, source = study_keys(frame)
    assert list(keys) == ["7_2", "7_2"] and "file names" in source
    assert study_keys(pd.DataFrame({"image": ["/a/scan.png"]}))[0] is None
