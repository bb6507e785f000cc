"""Data that would be wrong without an error: overwritten overlays, failed rows that look scored,
relative paths read from the wrong folder, misaligned CSV rows, temporary files left behind, and
DICOM files the default extensions skip."""

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dicom_files import dataset, gradient, to_bytes
from medray.config import ColumnsConfig, ScoreConfig
from medray.data.datasets import ingest_table
from medray.data.datasets.encoding import TableError, read_csv
from medray.evaluation.explain import overlay_name
from medray.io import storage
from medray.io.listing import IMAGE_EXTENSIONS
from medray.scoring.score import ScoreError, score
from test_score_at_scale import LABELS, job, make_checkpoint, read_rows

PROBS = [f"prob_{label}" for label in LABELS]


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("wrong") / "model")


@pytest.fixture(scope="module")
def scored(model, tmp_path_factory, ray_session):
    """One scoring run over a folder with same-named images in two folders, a ``.dicom`` file and two
    files that cannot be decoded, with Grad-CAM for every input (an untrained model scores all above 0.01)."""
    tmp = tmp_path_factory.mktemp("scored")
    folder = tmp / "archive"
    for i, name in enumerate(["ward_a/1.png", "ward_b/1.png", "ward_c/1.png", "ward_c/2.png"]):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(png(i))
    (folder / "ward_d").mkdir()
    (folder / "ward_d" / "scan.dicom").write_bytes(to_bytes(dataset(gradient())))
    (folder / "ward_d" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "ward_d" / "empty.dcm").write_bytes(b"")
    summary = score(job(tmp, model, str(folder), str(tmp / "scores"), part_size=3, batch_size=4, gradcam_threshold=0.01))
    return summary, folder


def test_dicom_files_named_dicom_are_scored_by_default_with_the_extensions_ingest_uses(scored):
    summary, folder = scored
    assert ScoreConfig().extensions == list(IMAGE_EXTENSIONS) and ".dicom" in IMAGE_EXTENSIONS
    rows = read_rows(summary.output).set_index("image")
    assert rows.loc[str(folder / "ward_d" / "scan.dicom"), "error"] == ""
    assert 0 <= rows.loc[str(folder / "ward_d" / "scan.dicom"), PROBS[0]] <= 1


def test_failed_rows_have_null_probabilities_so_dropna_keeps_exactly_the_scored_rows(scored):
    summary, folder = scored
    frame = pd.read_parquet(summary.output)
    failed = frame["error"] != ""
    assert sorted(os.path.basename(u) for u in frame.loc[failed, "image"]) == ["corrupt.png", "empty.dcm"]
    assert frame.loc[failed, PROBS].isna().all().all()
    assert frame.dropna()["image"].tolist() == frame.loc[~failed, "image"].tolist()
    assert pq.read_table(summary.output).column(PROBS[0]).null_count == 2  # null in the file, not a NaN value


def test_grad_cam_overlays_of_same_named_images_in_different_folders_do_not_overwrite_each_other(scored):
    summary, folder = scored
    overlays = sorted(p.name for p in (Path(summary.output) / "_gradcam").glob("*.png"))
    scored_images = [str(folder / n) for n in ["ward_a/1.png", "ward_b/1.png", "ward_c/1.png", "ward_c/2.png", "ward_d/scan.dicom"]]
    assert summary.gradcam == len(overlays) == len(scored_images) * len(LABELS)
    assert overlays == sorted(overlay_name(uri, label) for uri in scored_images for label in LABELS)


@pytest.mark.timeout(300)
def test_relative_paths_in_a_manifest_start_at_its_folder_and_a_rerun_removes_a_killed_runs_temporary_files(
    model, tmp_path, ray_session, monkeypatch
):
    (tmp_path / "data" / "images").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "data" / "images" / f"{i}.png").write_bytes(png(i))
    manifest = tmp_path / "data" / "manifest.csv"
    pd.DataFrame({"image": ["images/0.png", "./images/1.png", str(tmp_path / "data" / "images" / "2.png")]}).to_csv(manifest, index=False)
    output = tmp_path / "scores"
    # What a driver killed while writing leaves behind: write_atomic's temporary files, never renamed.
    (output / "_committed").mkdir(parents=True)
    stale = [output / ".part-00000.parquet.0123456789abcdef0123456789abcdef.tmp",
             output / "_committed" / ".part-00000.json.fedcba9876543210fedcba9876543210.tmp"]  # fmt: skip
    for path in stale:
        path.write_bytes(b"half a part")
    monkeypatch.chdir(tmp_path / "data" / "images")  # a working directory where images/0.png does not exist

    summary = score(job(tmp_path, model, str(manifest), str(output)))

    rows = read_rows(summary.output)
    expected = [str(tmp_path / "data" / "images" / f"{i}.png") for i in range(3)]
    assert rows["image"].tolist() == expected and (rows["error"] == "").all()
    assert not [p for p in output.rglob("*") if p.name.endswith(".tmp")]


def test_a_relative_path_in_an_s3_manifest_starts_at_the_manifests_prefix():
    from medray.scoring.score import manifest_uri

    assert manifest_uri("s3://bucket/data", "images/../scans/1.png") == "s3://bucket/data/scans/1.png"
    assert manifest_uri("s3://bucket/data", "s3://other/1.png") == "s3://other/1.png"
    assert manifest_uri("/data", "/elsewhere/1.png") == "/elsewhere/1.png"


@pytest.mark.timeout(300)
def test_a_ragged_row_in_a_scoring_manifest_is_one_error_naming_the_file_and_row(model, tmp_path, ray_session):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image,site\n/a/1.png,A\n/a/2.png,B,extra\n")

    with pytest.raises(ScoreError, match=r"manifest\.csv: row 3 has 3 fields where the header has 2") as caught:
        score(job(tmp_path, model, str(manifest), str(tmp_path / "scores")))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "text, row, fields",
    [
        ("file,patient,Mass\na.png,p1,1\nb.png,p2\n", 3, 2),  # a short row: pandas pads it with blanks
        ("file,patient,Mass\na.png,p1,1\nb.png,p2,0,1\n", 3, 4),  # a long row
        ("file,patient,Mass\na.png,p1,1,\nb.png,p2,0,\n", 2, 4),  # every row one longer: pandas shifts every column
    ],
)
def test_a_ragged_row_in_a_label_table_is_an_error_naming_the_file_and_row(tmp_path, text, row, fields):
    table = tmp_path / "labels.csv"
    table.write_text(text)

    with pytest.raises(TableError, match=rf"labels\.csv: row {row} has {fields} fields where the header has 3"):
        read_csv(str(table), dtype=str)
    with pytest.raises(TableError, match=rf"row {row} has {fields} fields"):
        ingest_table(str(table), str(tmp_path / "m.parquet"), ColumnsConfig(image="file", patient="patient", labels=["Mass"]))


def test_rows_without_the_headers_trailing_unnamed_column_are_not_ragged(tmp_path):
    table = tmp_path / "Data_Entry_2017.csv"
    table.write_text("Image Index,Patient ID,\na.png,1\nb.png,2\n")  # NIH's published header ends with a comma, its rows do not
    assert read_csv(str(table), dtype=str)["Patient ID"].tolist() == ["1", "2"]


def test_a_quoted_line_break_is_not_a_ragged_row(tmp_path):
    table = tmp_path / "labels.csv"
    table.write_text('file,note\na.png,"two\nlines"\nb.png,one\n')
    assert read_csv(str(table), dtype=str)["file"].tolist() == ["a.png", "b.png"]


def test_a_write_that_fails_leaves_no_temporary_file(tmp_path):
    with pytest.raises(TypeError):
        storage.write_atomic(str(tmp_path / "part.parquet"), "not bytes")
    assert os.listdir(tmp_path) == []
