"""Scoring an archive at scale: streamed listing, exactly one row per input, resumable after a crash."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from killed_scoring import kill_after_two_parts
from medray.config import build_config
from medray.io import storage
from medray.scoring.score import COMMITTED, SUMMARY, score
from medray.training import checkpoint
from medray.training.models import build_model
from s3 import upload_tree

LABELS = ["Mass", "Nodule", "Cardiomegaly", "Effusion"]


def make_checkpoint(directory: Path, image_size: int = 32) -> str:
    """An untrained resnet18 checkpoint: scoring's contract does not depend on what the model learned."""
    directory.mkdir(parents=True)
    torch.manual_seed(0)
    model = build_model("resnet18", len(LABELS), 1)
    meta = {"backbone": "resnet18", "labels": LABELS, "task": "multi-label", "in_channels": 1, "image_size": image_size}
    checkpoint.save(str(directory), {"model": model.state_dict()}, meta)
    return str(directory)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model")


def archive(folder: Path, demo_dir: Path, n: int) -> Path:
    """``n`` demo PNGs in nested folders, plus a corrupt PNG, a truncated PNG, a non-DICOM ``.dcm`` and a
    ``.txt`` that the extension filter must leave out."""
    sources = sorted((demo_dir / "images").glob("*.png"))[:n]
    for i, image in enumerate(sources):
        (folder / f"study{i % 3}").mkdir(parents=True, exist_ok=True)
        shutil.copy(image, folder / f"study{i % 3}" / image.name)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "study0" / "truncated.png").write_bytes(sources[0].read_bytes()[:200])
    (folder / "study1" / "not_dicom.dcm").write_bytes(b"no DICM preamble here")
    (folder / "notes.txt").write_text("not an image")
    return folder


def job(tmp_path, model: str, source: str, output: str, **score):
    return build_config({"name": "score", "storage": str(tmp_path / "runs"),
                         "score": {"input": source, "output": output, "checkpoint": model, **score}})  # fmt: skip


def read_rows(output: str) -> pd.DataFrame:
    fs, path = storage.filesystem(output)
    return pq.ParquetDataset(path, filesystem=fs).read().to_pandas()


def test_s3_archive_with_corrupt_files_gives_one_row_per_input(s3, ray_session, demo_dir, model_dir, tmp_path):
    client, bucket = s3
    upload_tree(client, bucket, archive(tmp_path / "archive", demo_dir, 12), "hospital/2019")
    output = f"s3://{bucket}/scores/2019"

    summary = score(job(tmp_path, model_dir, f"s3://{bucket}/hospital/2019", output, part_size=4, batch_size=4))

    rows = read_rows(output)
    assert (summary.inputs, summary.scored, summary.errors, summary.parts) == (15, 12, 3, 4)
    assert len(rows) == 15 and rows["image"].is_unique
    assert not rows["image"].str.endswith(".txt").any()
    bad = rows[rows["error"] != ""].set_index("image")
    assert sorted(u.rsplit("/", 1)[1] for u in bad.index) == ["corrupt.png", "not_dicom.dcm", "truncated.png"]
    assert np.isnan(bad[[f"prob_{label}" for label in LABELS]].to_numpy(float)).all()
    good = rows[rows["error"] == ""]
    assert good["prob_Mass"].between(0, 1).all()
    assert (rows["model_sha256"] == checkpoint.identity(model_dir)).all()
    written = json.loads(storage.read_text(f"{output}/{SUMMARY}"))
    assert (written["inputs"], written["scored"], written["errors"]) == (15, 12, 3)


def test_a_manifest_is_scored_in_its_order_and_unreadable_uris_are_rows(ray_session, demo_dir, model_dir, tmp_path):
    images = sorted(str(p) for p in (demo_dir / "images").glob("*.png"))[:5] + [str(tmp_path / "gone.png")]
    manifest = tmp_path / "to_score.csv"
    pd.DataFrame({"image": images, "site": "A"}).to_csv(manifest, index=False)

    summary = score(job(tmp_path, model_dir, str(manifest), str(tmp_path / "out"), part_size=100))

    rows = read_rows(summary.output)
    assert rows["image"].tolist() == images
    assert (summary.inputs, summary.errors) == (6, 1) and "gone.png" in rows["error"].iloc[-1]


def test_temperatures_in_calibration_json_divide_the_logits(ray_session, demo_dir, model_dir, tmp_path):
    calibrated = tmp_path / "calibrated"
    shutil.copytree(model_dir, calibrated)
    (calibrated / "calibration.json").write_text(json.dumps({"temperature": [2.0, 1.0, 4.0, 0.5]}))
    folder = archive(tmp_path / "archive", demo_dir, 4)

    raw = read_rows(score(job(tmp_path, model_dir, str(folder), str(tmp_path / "raw"))).output)
    cal = read_rows(score(job(tmp_path, str(calibrated), str(folder), str(tmp_path / "cal"))).output)

    raw = raw[raw["error"] == ""].set_index("image")
    cal = cal.set_index("image").loc[raw.index]
    assert cal["calibrated"].all() and not raw["calibrated"].any()
    for label, t in zip(LABELS, [2.0, 1.0, 4.0, 0.5]):
        logit = np.log(raw[f"prob_{label}"] / (1 - raw[f"prob_{label}"]))
        expected = 1 / (1 + np.exp(-logit / t))
        np.testing.assert_allclose(cal[f"prob_{label}"], expected, atol=2e-3)


def test_grad_cam_overlays_for_the_highest_scored_inputs_beside_the_scores(ray_session, demo_dir, model_dir, tmp_path):
    folder = archive(tmp_path / "archive", demo_dir, 4)

    summary = score(job(tmp_path, model_dir, str(folder), str(tmp_path / "out"), gradcam_threshold=0.01, gradcam_max=2))

    overlays = sorted((tmp_path / "out" / "_gradcam").glob("*.png"))
    assert summary.gradcam == len(overlays) == 2 * len(LABELS)  # every untrained score passes 0.01; 2 per label
    assert {p.name.rsplit(".", 2)[1] for p in overlays} == set(LABELS)
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in overlays)
    assert len(read_rows(summary.output)) == summary.inputs == 7  # the overlays are not read as scores


def test_a_killed_scoring_job_rerun_scores_every_input_exactly_once(ray_session, demo_dir, model_dir, tmp_path):
    folder = archive(tmp_path / "archive", demo_dir, 60)
    output = tmp_path / "scores"
    overrides = [f"storage={tmp_path / 'runs'}", f"score.input={folder}", f"score.output={output}",
                 f"score.checkpoint={model_dir}", "score.part_size=3", "score.batch_size=3"]  # fmt: skip
    before = kill_after_two_parts(ray_session, output, overrides, tmp_path / "killed.log")
    committed = output / COMMITTED
    total_parts = -(-63 // 3)
    assert 2 <= len(before) < total_parts, "the job must be killed part-way for this test to mean anything"

    summary = score(job(tmp_path, model_dir, str(folder), str(output), part_size=3, batch_size=3))

    rows = read_rows(str(output))
    expected = {str(p) for p in folder.rglob("*") if p.suffix in (".png", ".dcm")}
    assert len(rows) == len(expected) == 63 and set(rows["image"]) == expected  # nothing missing, nothing twice
    assert summary.parts_skipped == len(before) and summary.inputs == 63 and summary.errors == 3
    after = {p.name: p.stat().st_mtime_ns for p in committed.glob("*.json")}
    assert all(after[name] == mtime for name, mtime in before.items()), "a committed part was scored again"


def test_rows_delivered_twice_by_a_retried_task_are_written_once(tmp_path):
    from medray.io.parts import Output, PartWriter

    def rows(positions):
        return pd.DataFrame({"image": [f"/archive/{p}.png" for p in positions], "prob_Mass": 0.5, "error": "",
                             "_part": 0, "_part_inputs": 4, "_position": positions})  # fmt: skip

    writer = PartWriter(Output(str(tmp_path), "0" * 64))
    writer.add(rows([0, 1]))
    writer.add(rows([0, 1]))  # the same block again, from a retried read or actor task
    assert not (tmp_path / "part-00000.parquet").exists(), "a part was committed before all its inputs came"
    writer.add(rows([3, 2]))
    writer.add(rows([2]))  # after the commit: ignored, not a new part

    written = pd.read_parquet(tmp_path / "part-00000.parquet")
    assert written["image"].tolist() == [f"/archive/{p}.png" for p in range(4)]
    assert json.loads((tmp_path / COMMITTED / "part-00000.json").read_text())["inputs"] == 4
    assert not writer.pending
