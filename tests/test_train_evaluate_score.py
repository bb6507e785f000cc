"""The slice on a real local Ray: 2-worker DDP training (gloo), resume, evaluation and scoring."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from medray.config import build_config
from medray.data.manifest import read_manifest
from medray.evaluation.evaluate import evaluate
from medray.scoring.score import score
from medray.training.checkpoint import BEST_FILE
from medray.training.trainer import train
from s3 import upload_tree


def job(storage, manifest, epochs=1, **sections):
    raw = {
        "name": "ddp",
        "storage": str(storage),
        "data": {"manifest": manifest, "image_size": 32},
        "train": {"epochs": epochs, "workers": 2, "cpus_per_worker": 0.5, "batch_size": 16},
        **sections,
    }
    return build_config(raw)


@pytest.fixture(scope="module")
def run(tmp_path_factory, split_manifest_path, ray_session):
    storage = tmp_path_factory.mktemp("runs")
    config = job(storage, split_manifest_path)
    return config, train(config)


def test_two_worker_ddp_run_writes_a_checkpoint_per_epoch(run):
    config, result = run
    run_dir = config.run_dir
    meta = json.loads(open(f"{run_dir}/train/epoch_001/meta.json").read())
    assert meta["labels"] == ["Mass", "Nodule", "Cardiomegaly", "Effusion"]
    assert meta["backbone"] == "resnet18" and meta["image_size"] == 32
    assert json.loads(open(f"{run_dir}/{BEST_FILE}").read())["checkpoint"] == result.best_checkpoint


def test_validation_metrics_cover_the_whole_val_split_gathered_from_all_workers(run, split_manifest_path):
    _, result = run
    val = read_manifest(split_manifest_path).split("val")
    assert result.metrics["val_images"] == len(val)
    assert 0 <= result.metrics["val_auroc_mean"] <= 1


def test_resubmitting_a_run_resumes_from_its_last_checkpoint(run, split_manifest_path, tmp_path, caplog):
    shared, _ = run
    storage = tmp_path / "runs"  # a copy to resume: the module's run stays as the other tests expect it
    shutil.copytree(shared.storage, storage)
    config = job(storage, split_manifest_path, epochs=2)
    first = f"{config.run_dir}/train/epoch_001/model.pt"
    before = open(first, "rb").read()
    with caplog.at_level("INFO", logger="medray.training"):
        result = train(config)
    # The driver shows rank 0's line for the one epoch trained, relayed from the worker as it ended.
    assert [r.getMessage()[:12] for r in caplog.records if r.name == "medray.training"] == ["epoch 2/2: l"]
    meta = json.loads(open(f"{config.run_dir}/train/epoch_002/meta.json").read())
    assert meta["epoch"] == 1
    assert open(first, "rb").read() == before, "epoch 0 was trained again instead of resumed"
    assert result.metrics["epoch"] in (0, 1)


def test_evaluation_writes_metrics_and_a_report_with_roc_curves(run):
    config, _ = run
    evaluation = evaluate(config)
    table = evaluation.table
    assert list(table.index) == ["Mass", "Nodule", "Cardiomegaly", "Effusion"]
    assert table["threshold"].between(0, 1).all()
    metrics = json.loads(open(evaluation.paths["metrics.json"]).read())
    assert set(metrics["labels"]) == set(table.index)
    html = open(evaluation.paths["report.html"]).read()
    assert "data:image/png;base64," in html and "Mass" in html
    assert open(evaluation.paths["roc.png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_scoring_gives_one_row_per_file_and_records_the_corrupt_one(run, demo_dir, tmp_path):
    config, _ = run
    archive = tmp_path / "archive"
    archive.mkdir()
    for image in sorted((demo_dir / "images").glob("*.png"))[:9]:
        shutil.copy(image, archive / image.name)
    (archive / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)

    summary = score(config.model_copy(update={"score": config.score.model_copy(update={"input": str(archive)})}))
    rows = pd.read_parquet(summary.output)
    assert (summary.inputs, summary.scored, summary.errors) == (10, 9, 1)
    assert len(rows) == 10 and rows["image"].is_unique
    bad = rows[rows["image"].str.endswith("corrupt.png")].iloc[0]
    assert "corrupt.png" in bad["error"] and np.isnan(bad["prob_Mass"])
    good = rows[rows["error"] == ""]
    assert good["prob_Mass"].between(0, 1).all()
    assert rows["model_sha256"].str.fullmatch("[0-9a-f]{64}").all()


def test_scoring_reads_and_writes_s3(run, demo_dir, s3):
    config, _ = run
    client, bucket = s3
    upload_tree(client, bucket, demo_dir / "images", "archive")
    out = f"s3://{bucket}/scores"
    summary = score(config.model_copy(update={"score": config.score.model_copy(update={"input": f"s3://{bucket}/archive", "output": out})}))
    assert summary.errors == 0 and summary.scored == len(list((demo_dir / "images").glob("*.png")))
