import colorsys

import numpy as np
import pytest
import torch

from medray.training.augment import POLICIES, Augment, augment_batch, resolve


def marker_image(size=64) -> np.ndarray:
    """Dark film with a bright 'heart' block well to the image's right, as on a PA chest X-ray."""
    image = np.full((size, size), 20, dtype=np.uint8)
    image[24:44, 40:56] = 230
    return image


def marker_centres(images: np.ndarray) -> np.ndarray:
    """Column of each image's bright marker's centre of mass."""
    bright = images.astype(float) > 128
    columns = np.arange(images.shape[-1])
    return (bright.sum(axis=1) * columns).sum(axis=1) / bright.sum(axis=(1, 2))


def test_cxr_policy_never_mirrors_left_and_right():
    batch = np.stack([marker_image()] * 200)
    out = augment_batch(batch, "cxr")
    columns = np.arange(64)
    for image in out.astype(float):
        bright = image > 128
        assert bright.any()
        centre = (bright.sum(axis=0) * columns).sum() / bright.sum()
        assert centre > 40, "the marker moved to the left half: the image was mirrored"


def test_cxr_policy_changes_images_randomly_but_keeps_their_shape():
    batch = np.stack([marker_image()] * 8)
    out = augment_batch(batch, "cxr")
    assert out.shape == batch.shape and out.dtype == np.uint8
    assert len({image.tobytes() for image in out}) > 1


def test_none_policy_is_the_identity():
    batch = np.stack([marker_image()] * 2)
    assert np.array_equal(augment_batch(batch, "none"), batch)


@pytest.mark.parametrize(
    "name, rotations_off",
    [("derm", {"degrees": 0}), ("fundus", {"degrees": 0}), ("histo", {"rot90": 0})],
)
def test_orientation_free_policies_mirror_some_images_and_not_others(name, rotations_off):
    batch = np.stack([marker_image()] * 200)
    centres = marker_centres(augment_batch(batch, name, rotations_off))
    assert (centres < 24).any(), "the marker never moved to the left: no image was mirrored"
    assert (centres > 40).any(), "the marker never stayed on the right: every image was mirrored"


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("shape", [(5, 32, 32), (5, 32, 32, 3), (3, 24, 40), (3, 24, 40, 3)])
def test_every_policy_keeps_shape_and_dtype_of_gray_and_rgb_batches(name, shape):
    batch = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = augment_batch(batch, name)
    assert out.shape == batch.shape and out.dtype == np.uint8


@pytest.mark.parametrize("name", POLICIES)
def test_every_parameter_at_zero_gives_the_image_back(name):
    batch = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    assert np.array_equal(augment_batch(batch, name, dict.fromkeys(POLICIES[name], 0)), batch)


def test_cxr_with_motion_and_exposure_off_is_the_identity():
    batch = np.stack([marker_image()] * 4)
    params = {"degrees": 0, "translate": 0, "scale": 0, "brightness": 0, "contrast": 0}
    assert np.array_equal(augment_batch(batch, "cxr", params), batch)


def test_hue_and_saturation_leave_grayscale_images_alone():
    batch = np.stack([marker_image()] * 4)
    colour_only = {"rot90": 0, "hflip": 0, "vflip": 0, "crop": 0, "brightness": 0, "contrast": 0}
    assert np.array_equal(augment_batch(batch, "histo", colour_only), batch)


def test_overrides_change_only_the_named_parameters():
    assert resolve("derm", {"hue": 0.01}) == {**POLICIES["derm"], "hue": 0.01}
    assert resolve("cxr") == POLICIES["cxr"]


def test_histo_reaches_all_eight_orientations_exactly():
    patch = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    orientation_only = {"crop": 0, "brightness": 0, "contrast": 0, "saturation": 0, "hue": 0, "hed_sigma": 0}
    out = augment_batch(np.stack([patch] * 400), "histo", orientation_only, seed=0)
    square = torch.from_numpy(patch).permute(2, 0, 1)
    eight = {t.permute(1, 2, 0).numpy().tobytes() for k in range(4) for t in (square.rot90(k, (1, 2)), square.rot90(k, (1, 2)).flip(2))}
    seen = {image.tobytes() for image in out}
    assert seen == eight, "every output is one of the eight orientations, and each of them occurs"


def test_derm_keeps_hue_shifts_within_its_limit_and_saturation_and_value_intact():
    reddish = np.zeros((64, 8, 8, 3), dtype=np.uint8)
    reddish[...] = (180, 60, 40)
    hue_only = {"hflip": 0, "vflip": 0, "degrees": 0, "brightness": 0, "contrast": 0, "saturation": 0}
    out = augment_batch(reddish, "derm", hue_only, seed=0)
    before = colorsys.rgb_to_hsv(*(reddish[0, 0, 0] / 255))[0]
    turns = [abs(colorsys.rgb_to_hsv(*(image[0, 0] / 255))[0] - before) for image in out]
    shifts = [min(t, 1 - t) for t in turns]  # hue is an angle: red sits at both ends
    assert 0.01 < max(shifts) <= 0.03 + 0.005, "hue moves, but no further than derm's 0.03 of a turn"
    value = out[:, 0, 0].max(axis=1)
    assert np.abs(value.astype(int) - 180).max() <= 1, "a hue shift keeps the value (HSV)"


def test_a_seed_repeats_the_draws_and_each_image_gets_its_own():
    batch = np.stack([marker_image()] * 16)
    first, again = augment_batch(batch, "cxr", seed=3), augment_batch(batch, "cxr", seed=3)
    assert np.array_equal(first, again)
    assert len({image.tobytes() for image in first}) == 16


@pytest.mark.parametrize("name", [n for n in POLICIES if n != "none"])
def test_augmentation_stays_on_the_batch_device(name):
    # The meta device stands in for a GPU: a step that left the device or went through numpy would fail here.
    batch = torch.empty((4, 3, 32, 32), device="meta")
    out = Augment(name)(batch)
    assert out.device.type == "meta" and out.shape == batch.shape


def test_cxr_has_no_flip_to_switch_on():
    with pytest.raises(ValueError, match=r"'hflip'.*valid: degrees, translate, scale, brightness, contrast"):
        augment_batch(np.stack([marker_image()]), "cxr", {"hflip": 0.5})


def test_unknown_policy_names_the_known_ones():
    with pytest.raises(ValueError, match=r"'ct'.*known: cxr, derm, fundus, histo, none"):
        resolve("ct")


def test_parameters_must_be_numbers():
    with pytest.raises(ValueError, match="'degrees' must be a number"):
        resolve("cxr", {"degrees": "ten"})


def test_probabilities_must_lie_in_zero_to_one():
    with pytest.raises(ValueError, match="'hflip' must be a probability"):
        resolve("derm", {"hflip": 2})


def test_pixels_must_be_uint8_gray_or_rgb():
    with pytest.raises(ValueError, match="uint8"):
        augment_batch(np.zeros((2, 8, 8, 4), dtype=np.uint8), "cxr")


def test_medray_augment_preview_writes_a_grid_of_training_images_beside_draws_of_the_policy(split_manifest_path, tmp_path, capsys):
    from PIL import Image

    from medray.cli import main

    out = tmp_path / "preview.png"
    main(["augment-preview", "--set", f"data.manifest={split_manifest_path}", "--set", f"storage={tmp_path}",
          "--set", "data.image_size=32", "--out", str(out), "--images", "3", "--draws", "4"])  # fmt: skip
    grid = Image.open(out)
    assert grid.format == "PNG" and grid.width > grid.height  # 3 rows of 5 panels: the original and 4 draws
    assert f"'cxr' on 3 training images, 4 draws each → {out}" in capsys.readouterr().out
