"""Image readers: PNG/JPEG/TIFF at 8 and 16 bits, DICOM display pipeline and compressed syntaxes."""

import io

import numpy as np
import pytest
import tifffile
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000, JPEG2000Lossless, RLELossless

from dicom_files import dataset, gradient, jpeg_baseline, to_bytes
from medray.io.images import ImageError, decode, load


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_16_bit_png_is_scaled_to_8_bits_by_its_own_range():
    pixels = gradient(32, np.uint16, 4000)
    out = decode(png(pixels), "x.png")
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out[0].astype(int)) >= 0)


def test_8_bit_jpeg_reads_as_grayscale_or_rgb():
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 200
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
    colour = decode(buffer.getvalue(), "x.jpg", channels=3)
    assert colour.shape == (32, 32, 3) and abs(int(colour[..., 0].mean()) - 200) < 5
    assert decode(buffer.getvalue(), "x.jpg", size=16).shape == (16, 16)


def test_16_bit_tiff_reads(tmp_path):
    tifffile.imwrite(tmp_path / "x.tif", gradient(32, np.uint16, 60000))
    out = load(str(tmp_path / "x.tif"))
    assert out.shape == (32, 32) and out[0, 0] == 0 and out[0, -1] == 255


def test_monochrome1_is_inverted_so_that_bone_is_bright():
    pixels = gradient(32, np.uint16, 4095)
    mono2 = decode(to_bytes(dataset(pixels, "MONOCHROME2", 12)), "a.dcm")
    mono1 = decode(to_bytes(dataset(pixels, "MONOCHROME1", 12)), "b.dcm")
    assert mono2[0, 0] == 0 and mono2[0, -1] == 255
    np.testing.assert_array_equal(mono1, 255 - mono2)


def test_rescale_and_window_map_hounsfield_units_onto_the_display():
    # CT: stored = HU + 1024; a soft-tissue window (center 40, width 400) shows −160…240 HU.
    hu = np.array([[-1000, -160, 40, 240, 1000]], dtype=np.int32)
    stored = (hu + 1024).astype(np.uint16)
    ds = dataset(stored, "MONOCHROME2", 16, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=400)
    out = decode(to_bytes(ds), "ct.dcm")[0]
    assert out[0] == 0 and out[1] <= 1 and abs(int(out[2]) - 128) <= 1 and out[3] >= 254 and out[4] == 255


def test_voi_lut_sequence_is_applied():
    stored = np.array([[0, 1, 2, 3]], dtype=np.uint16)
    ds = dataset(stored, "MONOCHROME2", 16)
    item = Dataset()
    item.add_new(0x00283002, "US", [4, 0, 16])  # LUT Descriptor: 4 entries, first maps stored 0, 16 bits
    item.add_new(
        0x00283006, "US", [0, 3000, 1000, 4000]
    )  # a non-monotonic LUT: only a real LUT lookup gives this order
    ds.VOILUTSequence = [item]
    out = decode(to_bytes(ds), "lut.dcm")[0]
    assert list(out) == [0, 191, 64, 255]


def test_rgb_dicom_reads_in_colour():
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 2] = 180
    out = decode(to_bytes(dataset(rgb, "RGB", 8)), "rgb.dcm", channels=3)
    assert out.shape == (16, 16, 3) and out[..., 2].min() == 180 and out[..., 0].max() == 0


def test_format_is_sniffed_from_the_bytes_not_the_name(tmp_path):
    (tmp_path / "really_dicom.png").write_bytes(to_bytes(dataset(gradient())))
    (tmp_path / "really_png.dcm").write_bytes(png(gradient()))
    assert load(str(tmp_path / "really_dicom.png")).shape == (32, 32)
    assert load(str(tmp_path / "really_png.dcm")).shape == (32, 32)


@pytest.mark.parametrize(
    ("syntax", "tolerance"),
    [(RLELossless, 0), (JPEG2000Lossless, 0), (JPEG2000, 8)],
    ids=["rle", "j2k-lossless", "j2k"],
)
def test_compressed_transfer_syntaxes_decode(syntax, tolerance):
    pixels = gradient(64)
    ds = dataset(pixels)
    ds.compress(syntax, **({"j2k_cr": [5]} if syntax == JPEG2000 else {}))
    encoded = to_bytes(ds)
    assert len(encoded) > 0 and ds.file_meta.TransferSyntaxUID == syntax
    out = decode(encoded, f"{syntax.name}.dcm")
    assert np.abs(out.astype(int) - pixels.astype(int)).max() <= tolerance


def test_jpeg_baseline_dicom_decodes():
    pixels = gradient(64)
    out = decode(jpeg_baseline(pixels), "jpeg.dcm")
    assert np.abs(out.astype(int) - pixels.astype(int)).mean() < 3


def test_dicom_over_the_pixel_limit_is_refused_before_decoding():
    with pytest.raises(ImageError, match="exceeds the limit"):
        decode(to_bytes(dataset(gradient(64))), "big.dcm", max_bytes=1000)


def test_multi_frame_dicom_gives_its_first_frame():
    frames = np.stack([gradient(32), 255 - gradient(32)])
    ds = dataset(frames)
    assert int(ds.NumberOfFrames) == 2
    np.testing.assert_array_equal(decode(to_bytes(ds), "cine.dcm"), gradient(32))
