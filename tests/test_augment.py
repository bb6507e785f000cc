import numpy as np
import pytest

from medray.augment import POLICIES, augment_batch, policy


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


def test_overrides_change_only_the_named_parameters_and_transforms_are_cached():
    assert policy("derm", {"hue": 0.01}) is policy("derm", {"hue": 0.01})
    assert policy("derm", {"hue": 0.01}) is not policy("derm")
    assert policy("cxr", {"degrees": 7}) is policy("cxr")


def test_cxr_has_no_flip_to_switch_on():
    with pytest.raises(ValueError, match=r"'hflip'.*valid: degrees, translate, scale, brightness, contrast"):
        augment_batch(np.stack([marker_image()]), "cxr", {"hflip": 0.5})


def test_unknown_policy_names_the_known_ones():
    with pytest.raises(ValueError, match=r"'ct'.*known: cxr, derm, fundus, histo, none"):
        policy("ct")


def test_parameters_must_be_numbers():
    with pytest.raises(ValueError, match="'degrees' must be a number"):
        policy("cxr", {"degrees": "ten"})


def test_pixels_must_be_uint8_gray_or_rgb():
    with pytest.raises(ValueError, match="uint8"):
        augment_batch(np.zeros((2, 8, 8, 4), dtype=np.uint8), "cxr")
