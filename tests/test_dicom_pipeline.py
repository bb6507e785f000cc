"""DICOM display through pydicom's own pixel pipeline, one frame decoded, every frame counted."""

from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from dicom_files import dataset, gradient, to_bytes
from medray.io.images import ImageError, decode


@pytest.mark.parametrize("function", ["SIGMOID", "LINEAR_EXACT", "LINEAR"])
def test_a_window_is_shown_as_pydicoms_voi_function_computes_it(function):
    stored = gradient(64, np.uint16, top=4095)
    ds = dataset(stored, "MONOCHROME2", 16, RescaleSlope=1, RescaleIntercept=-1024,
                 WindowCenter=600, WindowWidth=1500, VOILUTFunction=function)  # fmt: skip
    # pydicom's window maps onto the modality output's range: 16 unsigned bits, rescaled.
    lo, hi = 0 * 1 - 1024, 65535 * 1 - 1024
    expected = np.round((apply_voi_lut(apply_modality_lut(stored, ds), ds) - lo) / (hi - lo) * 255)
    shown = decode(to_bytes(ds), f"{function}.dcm").astype(int)
    assert np.abs(shown - expected).max() <= 1
    assert shown.max() > 0  # the window is not all black: the values lie in it


def test_sigmoid_is_not_drawn_as_a_linear_window():
    stored = gradient(64, np.uint16, top=4095)
    sigmoid, linear = (
        decode(to_bytes(dataset(stored, "MONOCHROME2", 16, WindowCenter=2048, WindowWidth=4096, VOILUTFunction=f)), "w.dcm")
        for f in ("SIGMOID", "LINEAR")
    )
    assert np.abs(sigmoid.astype(int) - linear.astype(int)).max() > 10


def test_a_multi_frame_file_decodes_its_first_frame_only():
    frames = np.stack([gradient(256, np.uint16, top=4000) + i for i in range(64)])  # 64 x 128 KiB = 8 MiB decoded
    data = to_bytes(dataset(frames, "MONOCHROME2", 16))
    tracemalloc.start()
    try:
        shown = decode(data, "cine.dcm")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert shown.shape == (256, 256) and shown[0, 0] == 0 and shown[0, -1] == 255
    # One frame and its float display arrays take ~2 MiB; decoding all 64 frames alone would take 8 MiB.
    assert peak < frames.nbytes / 2, f"{peak / 2**20:.1f} MiB allocated to show one 128 KiB frame"


@pytest.mark.parametrize(
    "pixels, why",
    [
        (np.stack([gradient(32)] * 4), "4 frame(s) of 32x32 pixels x 1 sample(s) x 1 byte(s) = 4096 bytes of pixel data"),
        (gradient(32, np.uint16), "1 frame(s) of 32x32 pixels x 1 sample(s) x 2 byte(s) = 2048 bytes of pixel data"),
    ],
)
def test_a_file_over_the_limit_by_its_frames_or_bytes_is_refused_before_decoding(pixels, why):
    limit = 1500  # one 8-bit 32x32 frame (1024) fits
    assert decode(to_bytes(dataset(gradient(32))), "one.dcm", max_bytes=limit).shape == (32, 32)
    with pytest.raises(ImageError, match=re.escape(f"big.dcm: {why} exceeds the limit of {limit}")):
        decode(to_bytes(dataset(pixels, "MONOCHROME2", pixels.dtype.itemsize * 8)), "big.dcm", max_bytes=limit)
