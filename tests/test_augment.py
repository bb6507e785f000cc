import numpy as np

from medray.augment import augment_batch


def marker_image(size=64) -> np.ndarray:
    """Dark film with a bright 'heart' block well to the image's right, as on a PA chest X-ray."""
    image = np.full((size, size), 20, dtype=np.uint8)
    image[24:44, 40:56] = 230
    return image


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
