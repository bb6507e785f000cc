"""Patch extraction on Ray Data (local and S3), corrupt slides, resume, split by slide, patch training
and slide-level evaluation."""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from medray.config import build_config
from medray.data.manifest import Manifest
from medray.io import storage
from medray.wsi import demo_slides
from medray.wsi.extract import ExtractSpec, done_marker, extract_patches, plan_slide, read_patch, slide_key
from medray.wsi.grid import GridSpec
from medray.wsi.job import extract_job
from medray.wsi.manifest import read_slide_manifest
from medray.wsi.slides import open_slide

SPEC = ExtractSpec(GridSpec(target_mpp=1.0, patch_size=32, min_tissue=0.5, max_patches=24), labels_from="annotation",
                   thumbnail_side=128, min_region_um2=2000, chunk_patches=10)  # fmt: skip


def _corrupt_level0_tiles(path: str) -> None:
    """Overwrite every level-0 tile with junk: the slide opens and its thumbnail reads, its patches do not."""
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        spans = list(zip(page.dataoffsets, page.databytecounts))
    with open(path, "r+b") as f:
        for offset, count in spans:
            f.seek(offset)
            f.write(b"\x00junk" * (count // 5))


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory):
    """Six readable slides of three patients (four annotated), a blank one, and three corrupt ones."""
    folder = tmp_path_factory.mktemp("wsi")
    demo_slides.generate(str(folder), slides=6, width=768, height=512, seed=1, masks=1.0)
    rows = pd.read_csv(folder / "slides.csv", dtype={"mask": str}).fillna({"mask": ""})
    blank, _ = demo_slides.make_slide(np.random.default_rng(9), 768, 512, tumour=False, blank=True)
    demo_slides.write_pyramid(str(folder / "blank.tif"), blank)
    (folder / "not_a_tiff.tif").write_text("this is a text file")
    data = (folder / "slide_001.tif").read_bytes()
    (folder / "truncated.tif").write_bytes(data[: len(data) // 3])
    shutil.copy(folder / "slide_002.tif", folder / "bad_tile.tif")
    _corrupt_level0_tiles(str(folder / "bad_tile.tif"))
    extra = [{"image": name, "patient_id": f"X{i}", "slide_id": name[:-4], "tumour": 0.0, "mask": ""}
             for i, name in enumerate(("blank.tif", "not_a_tiff.tif", "truncated.tif", "bad_tile.tif"))]  # fmt: skip
    pd.concat([rows, pd.DataFrame(extra)]).to_csv(folder / "all.csv", index=False)
    rows.to_csv(folder / "good.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def extracted(slide_dir, tmp_path_factory, ray_session):
    manifest = read_slide_manifest(str(slide_dir / "all.csv"))
    frame = manifest.frame.assign(split=np.where(manifest.frame["patient_id"] == "DEMO002", "test", "train"))
    out = str(tmp_path_factory.mktemp("patches"))
    result = extract_patches(Manifest(frame, manifest.labels), out, SPEC, progress=False)
    return out, result, frame


def _patches(out: str) -> pd.DataFrame:
    return pd.read_parquet(os.path.join(out, "patches"))


def test_corrupt_slides_are_reported_with_their_uri_and_the_job_goes_on(extracted, slide_dir):
    out, result, frame = extracted
    assert (result.slides, result.done, result.empty, result.errors) == (10, 6, 1, 3)
    errors = pd.read_parquet(os.path.join(out, "errors.parquet"))
    bad = {str(slide_dir / n) for n in ("not_a_tiff.tif", "truncated.tif", "bad_tile.tif")}
    assert set(errors["image"]) == bad
    assert all(uri in reason for uri, reason in zip(errors["image"], errors["reason"]))
    slides = pd.read_parquet(os.path.join(out, "slides.parquet")).set_index("slide_id")
    assert slides.loc["blank", "status"] == "no tissue found" and slides.loc["blank", "patches"] == 0
    assert (slides.loc[[f"slide_{i:03d}" for i in range(6)], "status"] == "done").all()
    patches = _patches(out)
    assert set(patches["image"]) == set(frame["image"][:6])  # nothing from the bad slides, not even part of one
    assert not any(os.path.exists(os.path.join(out, "patches", slide_key(uri))) for uri in bad)
    assert len(patches) == result.patches and result.background_skipped > 0.3


def test_patches_are_pngs_of_the_requested_size_with_coordinates_and_labels(extracted):
    out, _, _ = extracted
    patches = _patches(out)
    assert {"image", "slide_id", "patient_id", "split", "x", "y", "level", "size", "tissue", "tumour_fraction", "tumour", "patch"} <= set(
        patches
    )
    assert Image.open(io.BytesIO(patches["patch"].iloc[0])).size == (32, 32)
    assert (patches["size"] == 64).all() and (patches["tissue"] >= 0.5).all()
    assert patches.groupby("image").size().max() <= 24  # the cap per slide
    negative = patches[patches["slide_id"] == "slide_000"]
    positive = patches[patches["slide_id"] == "slide_001"]  # annotated: labels follow its mask
    assert (negative["tumour"] == 0).all()
    assert positive["tumour"].tolist() == (positive["tumour_fraction"] >= 0.5).astype(float).tolist()
    assert 0 < positive["tumour"].sum() < len(positive)


def _reference(frame: pd.DataFrame, spec: ExtractSpec) -> pd.DataFrame:
    """What extraction must produce for these slides: the planning functions and ``read_patch`` applied
    directly, one slide after the other, in this process."""
    rows = []
    for row in frame.to_dict("records"):
        grid, _ = plan_slide(row, ["tumour"], spec)
        with open_slide(row["image"]) as slide:
            pixels = [read_patch(slide, r, spec.grid.patch_size) for r in grid.to_dict("records")]
        rows.append(grid.assign(image=row["image"], pixels=pixels))
    return pd.concat(rows).sort_values(["image", "y", "x"]).reset_index(drop=True)


def _same_patches(patches: pd.DataFrame, reference: pd.DataFrame) -> None:
    patches = patches.sort_values(["image", "y", "x"]).reset_index(drop=True)
    for column in ("image", "x", "y", "level", "size", "tissue"):
        assert patches[column].tolist() == reference[column].tolist(), column
    assert np.array_equal(patches["tumour_fraction"], reference["tumour_fraction"].astype(np.float32), equal_nan=True)
    assert np.array_equal(patches["tumour"], reference["tumour"])
    for png, pixels in zip(patches["patch"], reference["pixels"]):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), pixels)


def test_the_one_pass_job_writes_exactly_the_patches_of_planning_and_reading_each_slide_directly(extracted):
    out, _, frame = extracted
    _same_patches(_patches(out), _reference(frame.iloc[:6], SPEC))


def test_a_slide_of_many_chunks_is_cut_into_bounded_shards_each_with_its_own_patches(slide_dir, tmp_path, ray_session):
    """Four patches a chunk: each readable slide has more chunks than the two CPUs keep in flight, so its
    chunks wait their turn in the driver; a slide whose tiles are corrupt fails in its chunk tasks."""
    spec = replace(SPEC, chunk_patches=4)
    manifest = read_slide_manifest(str(slide_dir / "all.csv"))
    frame = manifest.frame[manifest.frame["slide_id"].isin(["slide_000", "slide_001", "bad_tile"])].assign(split="train")
    result = extract_patches(Manifest(frame, manifest.labels), str(tmp_path), spec, progress=False)
    assert (result.done, result.errors) == (2, 1)
    good = frame[frame["slide_id"] != "bad_tile"]
    reference = _reference(good, spec)
    for uri, expected in reference.groupby("image").size().items():
        shards = sorted(os.listdir(tmp_path / "patches" / slide_key(uri)))
        assert shards == [f"chunk-{i:05d}.parquet" for i in range(-(-expected // 4))]
        assert all(len(pd.read_parquet(tmp_path / "patches" / slide_key(uri) / name)) <= 4 for name in shards)
    _same_patches(_patches(str(tmp_path)), reference)
    errors = pd.read_parquet(tmp_path / "errors.parquet")
    assert errors["image"].tolist() == [str(slide_dir / "bad_tile.tif")] and "cannot" in errors["reason"].iloc[0]
    assert not os.path.exists(tmp_path / "patches" / slide_key(str(slide_dir / "bad_tile.tif")))


def test_no_slide_and_no_patient_has_patches_on_both_sides_of_the_split(slide_dir, tmp_path, ray_session):
    config = build_config({"name": "split", "storage": str(tmp_path), "split": {"val": 0.3, "test": 0.3, "min_positive": 0.3, "label": "tumour", "train_keeps_positive": 0.0},
                           "wsi": {"slides": str(slide_dir / "good.csv"), "patch_size": 32, "max_patches": 4, "min_region_um2": 2000, "thumbnail_side": 128}})  # fmt: skip
    result, manifest = extract_job(config, progress=False)
    patches = _patches(result.out)
    assert set(patches["split"]) == {"train", "val", "test"}
    assert (patches.groupby("slide_id")["split"].nunique() == 1).all()
    assert (patches.groupby("patient_id")["split"].nunique() == 1).all()
    assert patches.groupby("slide_id")["split"].first().to_dict() == manifest.frame.set_index("slide_id")["split"].to_dict()


def test_a_rerun_after_an_interruption_redoes_only_unfinished_slides_without_duplicates(extracted, tmp_path):
    out, _, frame = extracted
    before = _patches(out)
    victim = frame["image"].iloc[1]
    # An interrupted run: the slide's done marker was never written and one of its shards is half there.
    os.remove(done_marker(out, victim))
    shard_dir = os.path.join(out, "patches", slide_key(victim))
    shutil.copy(os.path.join(shard_dir, "chunk-00000.parquet"), os.path.join(shard_dir, "chunk-00099.parquet"))
    finished = [os.path.join(out, "patches", slide_key(u), "chunk-00000.parquet") for u in frame["image"][[0, 2]]]
    written = [os.stat(path).st_mtime_ns for path in finished]

    again = extract_patches(Manifest(frame, ["tumour"]), out, SPEC, progress=False)
    assert (again.skipped, again.done) == (6, 1)  # five good slides and the blank one were done; the victim is redone
    assert again.errors == 3  # the corrupt slides are tried again and reported again
    after = _patches(out)
    assert not after.duplicated(["image", "x", "y"]).any()
    assert len(after) == len(before)
    assert sorted(os.listdir(shard_dir)) == sorted(
        f"chunk-{i:05d}.parquet" for i in range(-(-int((before["image"] == victim).sum()) // 10))
    )
    assert [os.stat(path).st_mtime_ns for path in finished] == written  # finished slides were not touched


def test_extraction_reads_slides_from_s3_and_writes_shards_there(slide_dir, extracted, s3, ray_session):
    from s3 import upload_tree

    client, bucket = s3
    local = slide_dir / "s3copy"
    local.mkdir(exist_ok=True)
    for name in ("slide_000.tif", "slide_001.tif", "slide_001_tumour.png", "good.csv"):
        shutil.copy(slide_dir / name, local / name)
    upload_tree(client, bucket, local, "wsi")
    manifest = read_slide_manifest(f"s3://{bucket}/wsi/good.csv")
    manifest.frame = manifest.frame[manifest.frame["slide_id"].isin(["slide_000", "slide_001"])].assign(split="train")
    assert manifest.frame["image"].str.startswith(f"s3://{bucket}/wsi/").all()
    out = f"s3://{bucket}/wsi-out"
    result = extract_patches(manifest, out, SPEC, progress=False)
    assert (result.done, result.errors) == (2, 0)
    shards = storage.list_files(storage.join(out, "patches"), (".parquet",))
    on_s3 = pd.concat([pd.read_parquet(io.BytesIO(storage.read_bytes(u))) for u in shards])
    local_out = _patches(extracted[0])
    local_two = local_out[local_out["slide_id"].isin(["slide_000", "slide_001"])]
    assert sorted(zip(on_s3["slide_id"], on_s3["x"], on_s3["y"])) == sorted(zip(local_two["slide_id"], local_two["x"], local_two["y"]))
    assert storage.exists(done_marker(out, manifest.frame["image"].iloc[0]))


def test_train_on_patches_then_evaluate_per_slide_with_heatmaps(slide_dir, tmp_path, ray_session):
    from medray.jobs import evaluate
    from medray.training.trainer import train

    raw = {"name": "wsi", "storage": str(tmp_path), "split": {"val": 0.3, "test": 0.3, "min_positive": 0.3, "label": "tumour", "train_keeps_positive": 0.0},
           "wsi": {"slides": str(slide_dir / "good.csv"), "patches": str(tmp_path / "patches"), "patch_size": 32, "max_patches": 16,
                   "min_region_um2": 2000, "thumbnail_side": 128, "aggregate": "max"},
           "data": {"image_size": 32, "augment": "histo"}, "model": {"in_channels": 3},
           "train": {"epochs": 1, "batch_size": 16, "workers": 1, "cpus_per_worker": 1}}  # fmt: skip
    config = build_config(raw)
    extract_job(config, progress=False)
    result = train(config)
    assert result.metrics["train_samples"] > 0 and result.metrics["val_images"] > 0
    evaluation = evaluate(config)
    assert list(evaluation.table.index) == ["tumour"]
    slides = pd.read_parquet(evaluation.paths["predictions"])
    assert set(slides["split"]) == {"val", "test"} and slides["prob_tumour"].between(0, 1).all()
    assert len(slides) == slides["slide_id"].nunique()  # one row per slide, not per patch
    patches = pd.read_parquet(os.path.join(os.path.dirname(evaluation.paths["predictions"]), "patch_predictions.parquet"))
    top = patches.groupby("image")["prob_tumour"].max()
    assert np.allclose(slides.set_index("image")["prob_tumour"], top[slides["image"]].to_numpy())  # aggregate: max
    html = storage.read_text(evaluation.paths["report.html"])
    assert "Patch-score heatmaps" in html and html.count("data:image/png;base64") == 2
