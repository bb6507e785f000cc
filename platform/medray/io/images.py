"""Decoding one image into the grayscale uint8 array the models take.

A size limit is checked from the header, before any pixel is decoded, so a decompression bomb
costs nothing: the bytes the decoded image would take (rows × columns × frames × samples × bytes
per sample), so that 16-bit, colour and multi-frame images count for what they cost. Whatever
reading one input raises becomes that input's error (``attempt``), the one rule of ingest and
scoring. 16-bit images are scaled to 8 bits by their own range. The format is sniffed from
the bytes, not the file name: DICOM by its ``DICM`` preamble (decoded by medray.io.dicom, with its
LUTs and windowing), everything else by Pillow (PNG, JPEG, TIFF, 8 or 16 bit, grayscale or RGB).
``decode_with_facts`` also returns what the decode saw on the way (``Facts``: size, bit depth, mean
intensity, DICOM codes), which scoring keeps for drift monitoring at no second decode.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageMode, UnidentifiedImageError

from medray.errors import MedrayError
from medray.io import storage
from medray.io.dicom import DicomError, decode_dicom_described, is_dicom
from medray.io.dicomweb import DicomWebError

MAX_BYTES = 256 * 1024 * 1024  # decoded size of one input: a 16-bit 11,500² image, 8-bit RGB 9,400², 512 CT slices of 512²


class ImageError(MedrayError, ValueError):
    """An image that cannot be used; the message names its URI and what is wrong."""


def _decoded_bytes(image: Image.Image) -> int:
    """What ``image``'s first frame takes once decoded, from its header: Pillow's own bomb guard counts pixels only."""
    mode = ImageMode.getmode(image.mode)
    width, height = image.size
    return width * height * len(mode.bands) * np.dtype(mode.typestr).itemsize


def _open(data: bytes, uri: str, max_bytes: int) -> Image.Image:
    try:
        with warnings.catch_warnings():  # its warning is moot: the size is checked below, in bytes
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageError(f"{uri}: pixel count exceeds the limit (decompression bomb guard)") from None
    except (UnidentifiedImageError, OSError) as err:
        raise ImageError(f"{uri}: not a readable image ({err.__class__.__name__})") from None
    size = _decoded_bytes(image)
    if size > max_bytes:
        width, height = image.size
        raise ImageError(f"{uri}: {width}x{height} pixels of mode {image.mode} = {size} bytes exceeds the limit of {max_bytes}")
    return image


def _to_8bit(image: Image.Image) -> Image.Image:
    """8-bit ``L`` or ``RGB``; 16-bit and float images are scaled by their own range."""
    if image.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
        return image.convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L"):  # through a 65,536-entry table: no float copy of the image
        pixels = np.asarray(image)
        lo, hi = float(pixels.min()), float(pixels.max())
        levels = np.arange(65_536, dtype=np.float32)
        table = (levels - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(levels)
        return Image.fromarray(np.clip(table, 0, 255).astype(np.uint8)[pixels])
    if image.mode in ("I", "F"):
        pixels = np.asarray(image, dtype=np.float32)
        lo, hi = float(pixels.min()), float(pixels.max())
        scaled = (pixels - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(pixels)
        return Image.fromarray(scaled.astype(np.uint8))
    return image.convert("L")


@dataclass(frozen=True)
class Facts:
    """What decoding learnt about an input on the way, for drift monitoring (medray.scoring.statistics):
    the stored size and bits per sample, the mean gray level of the 8-bit image the model is given (before
    its normalisation; a resize keeps the mean), and, for DICOM, the coarse ``dicom.acquisition`` codes."""

    width: int
    height: int
    bit_depth: int
    mean_intensity: float
    modality: str = ""
    view: str = ""
    site: str = ""


_MODE_BITS = {"1": 1, "I;16": 16, "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}  # every other mode: 8 bits a sample


def decode(data: bytes, uri: str, size: int | None = None, channels: int = 1, max_bytes: int = MAX_BYTES) -> np.ndarray:
    """Encoded bytes → ``(H, W)`` (1 channel) or ``(H, W, 3)`` uint8, resized to ``size × size`` when given."""
    return decode_with_facts(data, uri, size, channels, max_bytes)[0]


def decode_with_facts(
    data: bytes, uri: str, size: int | None = None, channels: int = 1, max_bytes: int = MAX_BYTES
) -> tuple[np.ndarray, Facts]:
    """``decode``'s pixels and the input's ``Facts``, from the one decode."""
    if not data:
        raise ImageError(f"{uri}: empty file (0 bytes)")
    if is_dicom(data):
        try:
            pixels, header = decode_dicom_described(data, uri, max_bytes)
        except DicomError as err:
            raise ImageError(str(err)) from None
        image = Image.fromarray(pixels)
    else:
        image = _open(data, uri, max_bytes)
        header = {"bit_depth": _MODE_BITS.get(image.mode, 8)}
    width, height = image.size  # before a JPEG draft decodes it smaller
    try:
        if size is not None and image.format == "JPEG":
            image.draft("L" if channels == 1 else "RGB", (size, size))  # let libjpeg decode at reduced scale
        image = _to_8bit(image).convert("L" if channels == 1 else "RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        pixels = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"{uri}: cannot decode image data ({err.__class__.__name__}: {err})") from None
    return pixels, Facts(width, height, mean_intensity=float(pixels.mean()), **header)


def read(uri: str) -> bytes:
    """The file's bytes, or an ImageError that says why they cannot be had."""
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        raise ImageError(f"{uri}: image file not found") from None
    except DicomWebError:  # already one line naming the instance and what the PACS answered
        raise
    except storage.NotRegularFileError as err:
        raise ImageError(str(err)) from None
    except OSError as err:
        raise ImageError(f"{uri}: cannot be read ({err.__class__.__name__})") from None


def load(uri: str, size: int | None = None, channels: int = 1) -> np.ndarray:
    return decode(read(uri), uri, size, channels)


def load_with_facts(uri: str, size: int | None = None, channels: int = 1) -> tuple[np.ndarray, Facts]:
    return decode_with_facts(read(uri), uri, size, channels)


def failure(uri: str, err: Exception) -> str:
    """The recorded error of one input whose reading raised ``err``: our own messages as they are, any
    other exception by its class name only (its text may quote a header value)."""
    if isinstance(err, MedrayError):
        return str(err)
    if isinstance(err, MemoryError):
        return f"{uri}: too large to decode in the memory left (MemoryError)"
    return f"{uri}: cannot be decoded ({err.__class__.__name__})"


def attempt(uri: str, read, *args, **kwargs):
    """``read(*args, **kwargs)``, or the reason it failed as a string: one bad input never fails a
    batch, a task or a job. KeyboardInterrupt and SystemExit are not an input's fault and go on."""
    try:
        return read(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 — whatever reading one input raises is that input's error
        return failure(uri, err)


def probe(uri: str) -> str | None:
    """Why ``uri`` cannot be used, or None: a full decode, so truncated files are caught too."""
    result = attempt(uri, load, uri, size=None)
    return result if isinstance(result, str) else None
