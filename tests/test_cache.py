"""The training cache: the same training input as decoding, read when fresh, never when stale."""

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medray.cli import main
from medray.config import build_config
from medray.data.cache import default_uri, freshness, prepare, read_cache, training_data
from medray.data.manifest import Manifest, read_manifest, write_manifest
from medray.data.sampling import COLUMN
from medray.io import images

SIZE = 32


@pytest.fixture(scope="module")
def prepared(split_manifest_path, tmp_path_factory):
    """A copy of the demo split manifest with one truncated image, prepared by ``medray prepare``."""
    folder = tmp_path_factory.mktemp("cache")
    manifest = read_manifest(split_manifest_path)
    broken = folder / "broken.png"
    broken.write_bytes(Path(manifest.frame["image"].iloc[0]).read_bytes()[:200])  # a truncated PNG
    row = {**manifest.frame.iloc[0].to_dict(), "image": str(broken), "split": "train", "Mass": 1.0}
    frame = pd.concat([manifest.frame, pd.DataFrame([row])], ignore_index=True)
    path = write_manifest(Manifest(frame, manifest.labels), str(folder / "split.parquet"))
    main(["prepare", "--set", f"data.manifest={path}", "--set", f"data.image_size={SIZE}", "--set", f"storage={folder}"])
    return path


def collect(ds) -> pd.DataFrame:
    """Every row of a training input, keyed by its pixels so that two inputs compare as multisets."""
    out = []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        weights = batch[COLUMN] if COLUMN in batch else np.ones(len(batch["image"]))
        for pixels, labels, bad, weight in zip(batch["image"], batch["labels"], batch["unreadable"], weights):
            out.append({"pixels": pixels.tobytes(), "labels": tuple(np.nan_to_num(labels, nan=-1)), "unreadable": bool(bad), COLUMN: float(weight)})
    return pd.DataFrame(out).sort_values(["pixels", "labels", COLUMN]).reset_index(drop=True)


def test_the_cache_holds_every_manifest_row_decoded_as_training_decodes_it(prepared):
    manifest = read_manifest(prepared)
    cached = read_cache(default_uri(prepared, SIZE, 1)).sort_values("manifest_row").reset_index(drop=True)
    assert len(cached) == len(manifest.frame)
    assert list(cached["image"]) == list(manifest.frame["image"])
    assert (cached["error"] != "").sum() == 1 and "broken.png" in cached.loc[cached["error"] != "", "error"].iloc[0]


def test_training_from_the_cache_sees_exactly_what_decoding_gives(prepared, caplog):
    manifest = read_manifest(prepared)
    n = int((manifest.frame["split"] == "train").sum())
    draws = np.linspace(0.5, 2.0, n)  # distinct sampling weights: each must follow its own row
    caplog.set_level(logging.INFO, logger="medray.data.cache")
    cached = collect(training_data(manifest, "train", prepared, SIZE, multiplicity=draws))
    decoded = collect(training_data(manifest, "train", prepared, SIZE, use_cache=False, multiplicity=draws))
    assert "train split: reading the prepared cache" in caplog.text
    assert "train split: decoding from the source images (data.use_cache is off)" in caplog.text
    assert len(cached) == n
    pd.testing.assert_frame_equal(cached, decoded)
    bad = cached[cached["unreadable"]]
    assert len(bad) == 1 and bad["labels"].iloc[0] == (-1.0,) * len(manifest.labels)  # NaN labels, counted


def test_a_cache_is_used_only_when_fresh_and_of_the_right_size(prepared, tmp_path):
    manifest_copy = tmp_path / "split.parquet"
    shutil.copy(prepared, manifest_copy)
    cache = str(tmp_path / "cache")
    shutil.copytree(default_uri(prepared, SIZE, 1), cache)
    assert "prepared from" in freshness(cache, str(manifest_copy), SIZE, 1)
    assert freshness(cache, prepared, SIZE, 1) is None
    assert "holds 32 px × 1 channels, not 64 px × 1" in freshness(cache, prepared, 64, 1)
    assert "no prepared cache" in freshness(str(tmp_path / "none"), prepared, SIZE, 1)
    later = os.path.getmtime(prepared) + 60
    os.utime(prepared, (later, later))  # the manifest rewritten after the cache was prepared
    try:
        assert "modified after the cache" in freshness(cache, prepared, SIZE, 1)
    finally:
        prepare(prepared, None, SIZE, 1)  # leave a fresh cache for the other tests


def test_training_takes_the_cache_and_the_chosen_fold(demo_manifest, tmp_path, caplog):
    from medray.data.splits import split_by_patient
    from medray.training.trainer import build_trainer

    frame = split_by_patient(demo_manifest, test=0.2, min_positive=0.3, label="Mass", folds=3, seed=0)
    path = write_manifest(Manifest(frame, demo_manifest.labels), str(tmp_path / "folds.parquet"))
    prepare(path, None, SIZE, 1)
    config = build_config({"storage": str(tmp_path), "data": {"manifest": path, "image_size": SIZE, "fold": 2, "augment": "none"}})
    caplog.set_level(logging.INFO)
    trainer = build_trainer(config)
    assert "train split: reading the prepared cache" in caplog.text and "val split: reading the prepared cache" in caplog.text
    val = trainer.datasets["val"].count()
    assert val == int((frame["fold"] == 2).sum())


def test_a_cache_on_s3_is_prepared_and_read(s3, prepared, caplog):
    client, bucket = s3
    manifest = read_manifest(prepared)
    small = manifest.frame.groupby("split").head(6).reset_index(drop=True)
    manifest_uri = write_manifest(Manifest(small, manifest.labels), f"s3://{bucket}/cache-test/split.parquet")
    cache = f"s3://{bucket}/cache-test/cache"
    result = prepare(manifest_uri, cache, SIZE, 1)
    assert result.images == len(small)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="cache-test/cache/")["Contents"]]
    assert "cache-test/cache/medray_cache.json" in keys and any(k.endswith(".parquet") for k in keys)
    assert freshness(cache, manifest_uri, SIZE, 1) is None
    caplog.set_level(logging.INFO, logger="medray.data.cache")
    got = collect(training_data(Manifest(small, manifest.labels), "val", manifest_uri, SIZE, cache_uri=cache))
    want = sorted(images.load(u, SIZE).tobytes() for u in small.loc[small["split"] == "val", "image"])
    assert sorted(got["pixels"]) == want
    assert "val split: reading the prepared cache" in caplog.text  # not a silent fallback to the source
