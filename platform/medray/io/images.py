"""Decoding one image into the grayscale uint8 array the models take.

A pixel limit is checked from the header, before any pixel is decoded, so a decompression bomb
costs nothing. 16-bit images are scaled to 8 bits by their own range. The format is sniffed from
the bytes, not the file name: DICOM by its ``DICM`` preamble (decoded by medray.io.dicom, with its
LUTs and windowing), everything else by Pillow (PNG, JPEG, TIFF, 8 or 16 bit, grayscale or RGB).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from medray.errors import MedrayError
from medray.io import storage
from medray.io.dicom import DicomError, decode_dicom, is_dicom

MAX_PIXELS = 20_000 * 20_000


class ImageError(MedrayError, ValueError):
    """An image that cannot be used; the message names its URI and what is wrong."""


def _open(data: bytes, uri: str, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageError(f"{uri}: pixel count exceeds the limit (decompression bomb guard)") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ImageError(f"{uri}: not a readable image ({err.__class__.__name__})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"{uri}: {width}x{height} pixels exceeds the limit of {max_pixels}")
    return image


def _to_8bit(image: Image.Image) -> Image.Image:
    """8-bit ``L`` or ``RGB``; 16-bit and float images are scaled by their own range."""
    if image.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
        return image.convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        lo, hi = float(pixels.min()), float(pixels.max())
        scaled = (pixels - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(pixels)
        return Image.fromarray(scaled.astype(np.uint8))
    return image.convert("L")


def decode(data: bytes, uri: str, size: int | None = None, channels: int = 1, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded bytes → ``(H, W)`` (1 channel) or ``(H, W, 3)`` uint8, resized to ``size × size`` when given."""
    if not data:
        raise ImageError(f"{uri}: empty file (0 bytes)")
    if is_dicom(data):
        try:
            image = Image.fromarray(decode_dicom(data, uri, max_pixels))
        except DicomError as err:
            raise ImageError(str(err)) from None
    else:
        image = _open(data, uri, max_pixels)
    try:
        if size is not None and image.format == "JPEG":
            image.draft("L" if channels == 1 else "RGB", (size, size))  # let libjpeg decode at reduced scale
        image = _to_8bit(image).convert("L" if channels == 1 else "RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        return np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"{uri}: cannot decode image data ({err.__class__.__name__}: {err})") from None


def read(uri: str) -> bytes:
    """The file's bytes, or an ImageError that says why they cannot be had."""
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        raise ImageError(f"{uri}: image file not found") from None
    except storage.NotRegularFileError as err:
        raise ImageError(str(err)) from None
    except OSError as err:
        raise ImageError(f"{uri}: cannot be read ({err.__class__.__name__})") from None


def load(uri: str, size: int | None = None, channels: int = 1) -> np.ndarray:
    return decode(read(uri), uri, size, channels)


def probe(uri: str) -> str | None:
    """Why ``uri`` cannot be used, or None: a full decode, so truncated files are caught too."""
    try:
        load(uri, size=None)
    except ImageError as err:
        return str(err)
    return None
