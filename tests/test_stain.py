"""Stain variation: Macenko and Reinhard normalisation at patch extraction (medray.wsi.stain), and HED
stain jitter in the ``histo`` augmentation policy (medray.training.augment)."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import ndimage
from torchstain.numpy.normalizers import NumpyMacenkoNormalizer, NumpyReinhardNormalizer

from medray.config import build_config
from medray.training.augment import Augment, augment_batch
from medray.wsi import demo_slides
from medray.wsi.extract import read_patch
from medray.wsi.job import extract_job, spec_from_config
from medray.wsi.slides import open_slide
from medray.wsi.stain import (
    MACENKO_STAINS,
    MIN_STAINED,
    REINHARD_MEANS,
    REINHARD_STDS,
    StainError,
    StainNormaliser,
    fit_stain,
    stained_share,
)

# Ruifrok & Johnston's haematoxylin and eosin: another lab's stain than the standard reference's.
RUIFROK_H, RUIFROK_E = (0.65, 0.70, 0.29), (0.07, 0.99, 0.11)
STANDARD_H, STANDARD_E = np.array(MACENKO_STAINS).T


def he_patch(h, e, h_max: float, e_max: float, size: int = 64, seed: int = 0) -> np.ndarray:
    """An H&E patch by Beer–Lambert: blobs of haematoxylin (nuclei) over a field of eosin, seen through
    light of 240 with a little camera noise."""
    rng = np.random.default_rng(seed)

    def field(sigma: float) -> np.ndarray:
        f = ndimage.gaussian_filter(rng.random((size, size)), sigma)
        return (f - f.min()) / (f.max() - f.min())

    haematoxylin = h_max * np.clip(2 * field(2) - 1, 0, 1)
    eosin = e_max * (0.3 + 0.7 * field(4))
    density = haematoxylin[..., None] * _unit(h) + eosin[..., None] * _unit(e)
    return np.clip(240 * np.exp(-density) + rng.normal(0, 1, density.shape), 0, 255).astype(np.uint8)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return v / np.linalg.norm(v)


def stain_vectors(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Macenko's estimate of a patch's haematoxylin and eosin vectors (torchstain's own fit)."""
    fit = NumpyMacenkoNormalizer()
    fit.fit(pixels)
    return _unit(fit.HERef[:, 0]), _unit(fit.HERef[:, 1])


def lab_stats(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    fit = NumpyReinhardNormalizer()
    fit.fit(pixels)
    return fit.target_means, fit.target_stds


def write_png(path, pixels: np.ndarray) -> str:
    Image.fromarray(pixels).save(path)
    return str(path)


OTHER_LAB = he_patch(RUIFROK_H, RUIFROK_E, 1.2, 0.6, seed=1)
GLASS = (np.full((64, 64, 3), 236) + np.random.default_rng(0).integers(0, 6, (64, 64, 3))).astype(np.uint8)


def test_macenko_maps_a_patch_onto_the_reference_stain_vectors():
    h, e = stain_vectors(OTHER_LAB)
    assert e @ _unit(STANDARD_E) < 0.95, "the other lab's eosin starts far from the reference's"
    out, normalised = StainNormaliser(fit_stain("macenko"))(OTHER_LAB)
    assert normalised and out.shape == OTHER_LAB.shape and out.dtype == np.uint8
    h, e = stain_vectors(out)
    assert h @ _unit(STANDARD_H) > 0.999 and e @ _unit(STANDARD_E) > 0.999


def test_macenko_gives_torchstains_own_result_and_follows_a_reference_patch(tmp_path):
    standard = NumpyMacenkoNormalizer().normalize(OTHER_LAB, stains=False)[0]
    assert np.array_equal(StainNormaliser(fit_stain("macenko"))(OTHER_LAB)[0], standard)

    reference = OTHER_LAB  # now the other lab is the reference, and a patch in the standard stain moves to it
    spec = fit_stain("macenko", write_png(tmp_path / "reference.png", reference))
    fit = NumpyMacenkoNormalizer()
    fit.fit(reference)
    assert np.allclose(spec.stains, fit.HERef) and np.allclose(spec.max_concentrations, fit.maxCRef)
    out, normalised = StainNormaliser(spec)(he_patch(STANDARD_H, STANDARD_E, 1.5, 0.8, seed=2))
    assert normalised
    assert all(a @ b > 0.999 for a, b in zip(stain_vectors(out), stain_vectors(reference)))


@pytest.mark.parametrize("reference", ["standard", "png"])
def test_reinhard_matches_the_references_lab_means_and_stds(reference, tmp_path):
    if reference == "png":
        target = he_patch(STANDARD_H, STANDARD_E, 1.5, 0.8, seed=3)
        spec = fit_stain("reinhard", write_png(tmp_path / "reference.png", target))
        means, stds = lab_stats(target)
    else:
        spec, means, stds = fit_stain("reinhard"), np.array(REINHARD_MEANS), np.array(REINHARD_STDS)
    before = lab_stats(OTHER_LAB)
    assert np.abs(before[0] - means).max() > 5, "the other lab's colours start far from the reference's"
    out, normalised = StainNormaliser(spec)(OTHER_LAB)
    after = lab_stats(out)
    assert normalised
    assert np.abs(after[0] - means).max() < 0.6 and np.abs(after[1] - stds).max() < 0.6


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
@pytest.mark.parametrize(
    "patch",
    [GLASS, np.full((32, 32, 3), (120, 60, 150), np.uint8)],
    ids=["glass: almost no stain", "one flat colour: nothing to fit"],
)
def test_a_patch_the_method_cannot_fit_keeps_its_pixels_and_is_flagged(method, patch):
    out, normalised = StainNormaliser(fit_stain(method))(patch)
    assert not normalised and np.array_equal(out, patch)


def test_none_leaves_every_patch_alone():
    out, normalised = StainNormaliser(fit_stain("none"))(OTHER_LAB)
    assert out is OTHER_LAB and not normalised


def test_a_reference_that_cannot_be_used_is_one_error_naming_the_setting(tmp_path):
    with pytest.raises(StainError, match=r"wsi.stain_reference .*missing.png.*not found"):
        fit_stain("macenko", str(tmp_path / "missing.png"))
    with pytest.raises(StainError, match=r"wsi.stain_reference .*glass.png.*stained.*not of glass"):
        fit_stain("reinhard", write_png(tmp_path / "glass.png", GLASS))
    config = build_config({"wsi": {"stain_normalise": "macenko", "stain_reference": str(tmp_path / "missing.png")}})
    with pytest.raises(StainError, match="wsi.stain_reference"):
        spec_from_config(config)  # what extract-patches calls first, before anything is written


@pytest.fixture(scope="module")
def normalised_extraction(tmp_path_factory, ray_session):
    """Two small demo slides extracted with Macenko, on a grid that also covers bare glass."""
    folder = tmp_path_factory.mktemp("stain_slides")
    csv = demo_slides.generate(str(folder), slides=2, width=512, height=384, seed=4, masks=0.0)
    pd.read_csv(csv).assign(split="train").to_csv(csv, index=False)
    config = build_config({"name": "stain", "storage": str(folder / "runs"),
                           "wsi": {"slides": csv, "patch_size": 32, "min_tissue": 0.0, "thumbnail_side": 128, "min_region_um2": 2000,
                                   "stain_normalise": "macenko", "patches": str(folder / "patches")},
                           "data": {"image_size": 32, "augment": "histo"}, "model": {"in_channels": 3}})  # fmt: skip
    result, _ = extract_job(config, progress=False)
    return config, result


def test_extraction_with_macenko_writes_normalised_patches_and_flags_those_it_kept(normalised_extraction):
    config, result = normalised_extraction
    out = config.wsi.patches
    patches = pd.read_parquet(os.path.join(out, "patches"))
    assert patches["stain_normalised"].dtype == bool
    assert patches["stain_normalised"].any() and not patches["stain_normalised"].all()  # tissue, and glass
    assert result.stain_kept == int((~patches["stain_normalised"]).sum())
    assert json.loads(open(os.path.join(out, "extract.json")).read())["stain"]["method"] == "macenko"
    normalise = StainNormaliser(fit_stain("macenko"))
    for uri, rows in patches.groupby("image"):
        with open_slide(uri) as slide:
            for row in rows.to_dict("records"):
                assert row["level"] == 0
                raw = read_patch(slide, {**row, "read_size": row["size"]}, 32)
                written = np.asarray(Image.open(io.BytesIO(row["patch"])).convert("RGB"))
                if row["stain_normalised"]:
                    assert np.array_equal(written, normalise(raw)[0]) and not np.array_equal(written, raw)
                else:
                    assert np.array_equal(written, raw) and stained_share(raw) < MIN_STAINED


def test_augment_preview_shows_the_histo_policy_on_extracted_patches(normalised_extraction, tmp_path, capsys):
    from medray.cli import main

    config, _ = normalised_extraction
    out = tmp_path / "preview.png"
    main(["augment-preview", "--set", f"wsi.patches={config.wsi.patches}", "--set", f"storage={tmp_path}", "--set", "data.augment=histo",
          "--set", "data.image_size=32", "--set", "model.in_channels=3", "--out", str(out), "--images", "2", "--draws", "3"])  # fmt: skip
    assert Image.open(out).format == "PNG"
    assert f"'histo' on 2 training images, 3 draws each → {out}" in capsys.readouterr().out


HED_ONLY = {"rot90": 0, "hflip": 0, "vflip": 0, "crop": 0, "brightness": 0, "contrast": 0, "saturation": 0, "hue": 0}


def edge_patch() -> np.ndarray:
    """Haematoxylin-purple on the left, eosin-pink on the right, the edge between columns 19 and 20."""
    patch = np.empty((32, 32, 3), np.uint8)
    patch[:, :20] = (110, 70, 160)
    patch[:, 20:] = (230, 150, 200)
    return patch


def test_hed_jitter_at_sigma_zero_is_the_identity_and_its_unmixing_loses_nothing():
    batch = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    assert np.array_equal(augment_batch(batch, "histo", {**HED_ONLY, "hed_sigma": 0}), batch)
    # RGB → H, E, DAB → RGB with factors of 1 ± 1e-7: every pixel comes back, black and white included.
    batch[0, 0, :2] = [(0, 0, 0), (255, 255, 255)]
    assert np.array_equal(augment_batch(batch, "histo", {**HED_ONLY, "hed_sigma": 1e-7}, seed=0), batch)


def test_hed_jitter_changes_colours_but_moves_no_pixel():
    batch = np.stack([edge_patch()] * 32)
    out = augment_batch(batch, "histo", {**HED_ONLY, "hed_sigma": 0.05}, seed=1).astype(int)
    assert (np.abs(out - batch).max(axis=(1, 2, 3)) > 0).all(), "every image's colours move"
    assert np.abs(out - batch).max() < 60, "by a stain's worth, not a different picture"
    for image in out:
        assert (image[:, :20] == image[0, 0]).all() and (image[:, 20:] == image[0, 31]).all(), "one colour per side"
        assert (image[0, 19] != image[0, 20]).any(), "the edge stays between columns 19 and 20"


def test_hed_jitter_draws_per_image_and_repeats_with_a_seed():
    batch = np.stack([edge_patch()] * 16)
    params = {**HED_ONLY, "hed_sigma": 0.05}
    first, again = augment_batch(batch, "histo", params, seed=7), augment_batch(batch, "histo", params, seed=7)
    assert np.array_equal(first, again)
    assert len({image.tobytes() for image in first}) == 16


def test_hed_jitter_leaves_grayscale_alone_and_stays_on_the_batch_device():
    gray = np.random.default_rng(0).integers(0, 256, (4, 16, 16), dtype=np.uint8)
    assert np.array_equal(augment_batch(gray, "histo", {**HED_ONLY, "hed_sigma": 0.2}), gray)
    meta = torch.empty((4, 3, 32, 32), device="meta")
    out = Augment("histo", {**HED_ONLY, "hed_sigma": 0.05})(meta)
    assert out.device.type == "meta" and out.shape == meta.shape


def test_hed_sigma_is_checked_and_on_in_histo_by_default():
    from medray.training.augment import POLICIES, resolve

    assert POLICIES["histo"]["hed_sigma"] == 0.05
    with pytest.raises(ValueError, match="'hed_sigma' must be in"):
        resolve("histo", {"hed_sigma": 1.5})
