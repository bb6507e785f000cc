"""Whole-slide images without Ray: reading slides, tissue masks, patch grids, labels, slide aggregation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medray.wsi import demo_slides
from medray.wsi.extract import read_patch
from medray.wsi.grid import GridSpec, patch_grid, patch_labels
from medray.wsi.slide_eval import slide_scores
from medray.wsi.slides import Pyramid, SlideError, open_slide
from medray.wsi.tissue import detect, saturation


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """One tumour-positive slide, 1024 x 768 at 0.5 µm/px, written as a tiled and as a stripped TIFF."""
    folder = tmp_path_factory.mktemp("slides")
    pixels, lesion = demo_slides.make_slide(np.random.default_rng(3), 1024, 768, tumour=True)
    demo_slides.write_pyramid(str(folder / "tiled.tif"), pixels)
    demo_slides.write_pyramid(str(folder / "stripped.tif"), pixels, tiled=False)
    blank, _ = demo_slides.make_slide(np.random.default_rng(4), 1024, 768, tumour=False, blank=True)
    demo_slides.write_pyramid(str(folder / "blank.tif"), blank)
    return {"folder": folder, "pixels": pixels, "lesion": lesion}


def test_openslide_reads_the_demo_pyramid_and_its_microns_per_pixel(slide):
    with open_slide(str(slide["folder"] / "tiled.tif")) as s:
        assert s.backend == "openslide"
        assert s.pyramid.dimensions == [(1024, 768), (256, 192), (64, 48)]
        assert s.pyramid.downsamples == [1.0, 4.0, 16.0]
        assert s.pyramid.mpp == pytest.approx(demo_slides.MPP)
        assert np.array_equal(s.read_region(100, 200, 0, 64, 32), slide["pixels"][200:232, 100:164])


def test_a_plain_stripped_tiff_is_read_with_tifffile_pixel_for_pixel(slide):
    with open_slide(str(slide["folder"] / "stripped.tif")) as s, open_slide(str(slide["folder"] / "tiled.tif")) as reference:
        assert s.backend == "tifffile"
        assert s.pyramid.dimensions == reference.pyramid.dimensions
        assert s.pyramid.mpp == pytest.approx(demo_slides.MPP)
        for x, y, level in ((0, 0, 0), (300, 500, 0), (512, 256, 1), (960, 700, 0)):
            assert np.array_equal(s.read_region(x, y, level, 64, 64), reference.read_region(x, y, level, 64, 64)), (x, y, level)


def test_a_file_that_is_not_a_slide_is_refused_with_its_name(tmp_path):
    bad = tmp_path / "notes.tif"
    bad.write_text("not a TIFF at all")
    with pytest.raises(SlideError, match="notes.tif"):
        open_slide(str(bad))


def test_the_tissue_mask_covers_the_tissue_at_a_low_resolution_level(slide):
    with open_slide(str(slide["folder"] / "tiled.tif")) as s:
        tissue = detect(s, min_side=200, min_region_um2=2000)
        level1 = s.read_level(1)
    assert tissue.downsample == 4.0 and tissue.mask.shape == (192, 256)
    # Stained pixels on the level the mask was made from: coloured, or far from the glass's grey-white.
    truth = (saturation(level1) > 40) | (np.abs(level1.astype(int) - demo_slides.GLASS.astype(int)).max(-1) > 30)
    iou = (tissue.mask & truth).sum() / (tissue.mask | truth).sum()
    assert not tissue.empty and iou > 0.8


def test_a_slide_without_tissue_is_reported_empty(slide):
    with open_slide(str(slide["folder"] / "blank.tif")) as s:
        tissue = detect(s, min_side=200, min_region_um2=2000)
    assert tissue.empty and tissue.fraction == 0


@pytest.mark.parametrize(("target_mpp", "level", "read_size"), [(0.5, 0, 32), (1.0, 0, 64), (2.0, 1, 32), (3.0, 1, 48), (8.0, 2, 32)])
def test_grid_positions_and_reads_are_at_the_requested_microns_per_pixel(slide, target_mpp, level, read_size):
    pyramid = Pyramid([(1024, 768), (256, 192), (64, 48)], [1.0, 4.0, 16.0], 0.5)
    spec = GridSpec(target_mpp=target_mpp, patch_size=32, min_tissue=0.0)
    grid = patch_grid(pyramid, np.ones((48, 64), bool), 16.0, spec)
    side = 32 * target_mpp / 0.5  # level-0 pixels under one patch
    assert (grid["level"] == level).all() and (grid["read_size"] == read_size).all()
    assert (grid["size"] == round(side)).all()
    assert sorted(grid["x"].unique())[:2] == [0, round(side)]  # stride defaults to the patch size
    assert grid["x"].max() + side <= 1024 and grid["y"].max() + side <= 768
    with open_slide(str(slide["folder"] / "tiled.tif")) as s:
        patch = read_patch(s, grid.iloc[-1], 32)
    assert patch.shape == (32, 32, 3)


def test_grid_keeps_patches_with_enough_tissue_and_caps_by_tissue():
    pyramid = Pyramid([(256, 256)], [1.0], 1.0)
    tissue = np.zeros((64, 64), bool)
    tissue[:, :24] = True  # the left 96 level-0 pixels: patch column 0 all tissue, column 1 half
    spec = GridSpec(target_mpp=1.0, patch_size=64, min_tissue=0.5)
    grid = patch_grid(pyramid, tissue, 4.0, spec)
    assert sorted(grid["x"].unique()) == [0, 64] and len(grid) == 8
    assert sorted(patch_grid(pyramid, tissue, 4.0, GridSpec(1.0, 64, min_tissue=0.6))["x"].unique()) == [0]
    capped = patch_grid(pyramid, tissue, 4.0, GridSpec(1.0, 64, min_tissue=0.5, max_patches=4, cap_by="tissue"))
    assert len(capped) == 4 and (capped["x"] == 0).all() and (capped["tissue"] == 1.0).all()
    sampled = patch_grid(pyramid, tissue, 4.0, GridSpec(1.0, 64, min_tissue=0.5, max_patches=4, cap_by="random", seed=1))
    assert len(sampled) == 4 and set(map(tuple, sampled[["x", "y"]].to_numpy())) <= set(map(tuple, grid[["x", "y"]].to_numpy()))


def test_patch_labels_come_from_the_annotation_mask_where_there_is_one():
    pyramid = Pyramid([(256, 128)], [1.0], 1.0)
    annotation = np.zeros((8, 16), np.uint8)
    annotation[:, 12:] = 255  # the right quarter of the slide is tumour
    grid = patch_grid(pyramid, np.ones((32, 64), bool), 4.0, GridSpec(1.0, 64, min_tissue=0.5), annotation)
    labels = patch_labels(grid, {"tumour": 1.0, "other": 0.0}, "tumour", threshold=0.5)
    assert grid.loc[grid["x"] == 192, "tumour_fraction"].eq(1.0).all()
    assert grid.loc[grid["x"] < 192, "tumour_fraction"].eq(0.0).all()
    assert labels["tumour"].tolist() == (grid["x"] == 192).astype(float).tolist()
    assert (labels["other"] == 0).all()
    unannotated = patch_grid(pyramid, np.ones((32, 64), bool), 4.0, GridSpec(1.0, 64, min_tissue=0.5))
    assert (patch_labels(unannotated, {"tumour": 1.0}, "tumour", 0.5)["tumour"] == 1).all()  # the slide's label


def test_slide_scores_pool_patch_probabilities_as_asked():
    patches = pd.DataFrame({"image": ["a", "a", "a", "a", "b", "b"], "prob_t": [0.1, 0.2, 0.9, 0.4, 0.5, np.nan]})
    assert slide_scores(patches, ["prob_t"], "mean")["prob_t"].to_dict() == pytest.approx({"a": 0.4, "b": 0.5})
    assert slide_scores(patches, ["prob_t"], "max")["prob_t"].to_dict() == pytest.approx({"a": 0.9, "b": 0.5})
    assert slide_scores(patches, ["prob_t"], "topk", k=2)["prob_t"].to_dict() == pytest.approx({"a": 0.65, "b": 0.5})
    with pytest.raises(ValueError, match="median"):
        slide_scores(patches, ["prob_t"], "median")


def test_the_wsi_demo_config_is_valid_and_a_bad_wsi_field_is_named():
    from pathlib import Path

    from medray.config import ConfigError, load_config

    path = str(Path(__file__).parents[1] / "jobs" / "configs" / "wsi_demo.yaml")
    config = load_config(path)
    assert (config.wsi.patch_size, config.wsi.aggregate, config.model.in_channels, config.data.augment) == (64, "topk", 3, "histo")
    with pytest.raises(ConfigError, match="wsi.aggregate"):
        load_config(path, ["wsi.aggregate=median"])
