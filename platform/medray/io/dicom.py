"""DICOM → display-ready uint8 pixels, the way a radiologist's viewer would show them.

The order follows the standard's pixel pipeline (PS3.3 C.11), each step pydicom's own: stored values
→ ``apply_modality_lut`` (modality LUT or rescale slope/intercept) → ``apply_voi_lut`` (a LUT in the
file wins over window center/width; windows follow VOILUTFunction: LINEAR, LINEAR_EXACT, SIGMOID) →
MONOCHROME1 inverted so that bone is always bright. Only the first frame is decoded, but the pixel
limit counts every frame, sample and byte the header declares. Compressed transfer syntaxes (JPEG
baseline/lossless, JPEG-LS, JPEG 2000, RLE) are decoded by pydicom's pixel plugins (pylibjpeg).

Privacy: no message built here contains a header value, only the URI and what is wrong; pydicom's
own exception text is reduced to its class name for the same reason.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from medray.errors import MedrayError

PREAMBLE = 128


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: a 128-byte preamble, then ``DICM`` (sniffed, not guessed from the name)."""
    return len(data) >= PREAMBLE + 4 and data[PREAMBLE : PREAMBLE + 4] == b"DICM"


class DicomError(MedrayError, ValueError):
    pass


def read_header(data: bytes, uri: str):
    """The dataset without decoding pixels (``force=False``: a file that is not DICOM is refused); large
    values such as the pixel data are read only when asked for."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():  # pydicom's validation warnings may quote header values
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data), force=False, defer_size=4096)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as err:
        raise DicomError(f"{uri}: unreadable DICOM ({err.__class__.__name__})") from None


def _display_range(ds, modality: np.ndarray) -> tuple[float, float]:
    """Black and white of the VOI output: a LUT's lowest and highest entries; a window's output range
    (what pydicom's window function, LINEAR or SIGMOID, makes of inputs far below and above it); with
    no VOI in the file, the image's own range."""
    if ds.get("VOILUTSequence"):
        lut = ds.VOILUTSequence[0].LUTData  # US values, or raw OW bytes in some files
        lut = np.frombuffer(lut, "<u2") if isinstance(lut, bytes) else np.asarray(lut, dtype=np.float64)
        return float(lut.min()), float(lut.max())
    if "WindowCenter" in ds and "WindowWidth" in ds:
        from pydicom.pixels import apply_voi_lut

        with np.errstate(over="ignore"):  # SIGMOID's exp() overflows towards its limits, as it should
            lo, hi = apply_voi_lut(np.array([-1e300, 1e300]), ds)
        return float(lo), float(hi)
    return float(modality.min()), float(modality.max())


def _grayscale(pixels: np.ndarray, ds) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    modality = apply_modality_lut(pixels, ds)
    if "VOILUTSequence" in ds and not np.issubdtype(modality.dtype, np.integer):  # a LUT is indexed by integers
        modality = np.round(modality).astype(np.int64)
    # A LUT in the file wins over window center/width; windows honour VOILUTFunction (LINEAR, LINEAR_EXACT, SIGMOID).
    values = apply_voi_lut(modality, ds).astype(np.float64)
    lo, hi = _display_range(ds, modality)
    unit = (values - lo) / (hi - lo) if hi != lo else np.zeros_like(values)
    if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":  # low values are white in MONOCHROME1
        unit = 1.0 - unit
    return np.round(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def _colour(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    lo, hi = float(pixels.min()), float(pixels.max())
    unit = (pixels.astype(np.float64) - lo) / (hi - lo) if hi > lo else np.zeros(pixels.shape)
    return np.round(unit * 255.0).astype(np.uint8)


def _dimensions(ds, uri: str) -> tuple[int, int, int, int, int]:
    """Frames, rows, columns, samples per pixel and bytes per sample, from the header alone."""
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        depth = -(-int(ds.get("BitsAllocated", 8) or 8) // 8)
    except (AttributeError, TypeError, ValueError):
        raise DicomError(f"{uri}: DICOM file lacks valid Rows/Columns/NumberOfFrames") from None
    if min(frames, rows, columns, samples, depth) < 1:
        raise DicomError(f"{uri}: DICOM file declares an empty image")
    return frames, rows, columns, samples, depth


def decode_dicom(data: bytes, uri: str, max_pixels: int) -> np.ndarray:
    """``(H, W)`` uint8 for grayscale, ``(H, W, 3)`` for colour; the first frame of a multi-frame file,
    and only that frame is decoded."""
    ds = read_header(data, uri)
    if "PixelData" not in ds:
        raise DicomError(f"{uri}: DICOM file holds no pixel data")
    frames, rows, columns, samples, depth = _dimensions(ds, uri)
    if frames * rows * columns * samples * depth > max_pixels:  # the whole file inflated, checked before decoding
        raise DicomError(
            f"{uri}: {frames} frame(s) of {columns}x{rows} pixels x {samples} sample(s) x {depth} byte(s) exceeds the limit of {max_pixels}"
        )
    try:
        from pydicom.pixels import pixel_array

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = pixel_array(io.BytesIO(data), index=0)  # reads and decodes that one frame's bytes
    except (AttributeError, RuntimeError, ValueError, NotImplementedError, TypeError, KeyError, EOFError) as err:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        what = f"transfer syntax {syntax.name}" if syntax is not None else "no transfer syntax"
        raise DicomError(f"{uri}: cannot decode DICOM pixel data ({what}; {err.__class__.__name__})") from None
    if samples == 3:
        return _colour(pixels)
    try:
        return _grayscale(pixels, ds)
    except (AttributeError, ValueError, TypeError, IndexError, KeyError) as err:
        raise DicomError(f"{uri}: invalid DICOM display transform ({err.__class__.__name__})") from None
