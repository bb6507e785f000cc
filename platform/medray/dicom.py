"""DICOM → display-ready uint8 pixels, the way a radiologist's viewer would show them.

The order follows the standard's pixel pipeline (PS3.3 C.11): stored values → modality LUT or
rescale slope/intercept → VOI LUT (a LUT in the file wins over window center/width, as pydicom
does) → MONOCHROME1 inverted so that bone is always bright. Compressed transfer syntaxes (JPEG
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
    """The dataset without decoding pixels (``force=False``: a file that is not DICOM is refused)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():  # pydicom's validation warnings may quote header values
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data), force=False)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as err:
        raise DicomError(f"{uri}: unreadable DICOM ({err.__class__.__name__})") from None


def _window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """The standard's LINEAR window function, mapped onto [0, 1]."""
    width = max(width, 1.0)
    scaled = (values - (center - 0.5)) / max(width - 1.0, 1.0) + 0.5
    return np.clip(scaled, 0.0, 1.0)


def _first(value) -> float:
    """Window center/width may be multi-valued (several presets); the first is the default."""
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _grayscale(pixels: np.ndarray, ds) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi

    modality = apply_modality_lut(pixels, ds)
    values = modality.astype(np.float64)
    if "VOILUTSequence" in ds:  # a LUT is indexed by integer values
        indices = modality if np.issubdtype(modality.dtype, np.integer) else np.round(modality).astype(np.int64)
        values = apply_voi(indices, ds).astype(np.float64)
        lut = ds.VOILUTSequence[0].LUTData  # US values, or raw OW bytes in some files
        lut = np.frombuffer(lut, "<u2") if isinstance(lut, bytes) else np.asarray(lut, dtype=np.float64)
        lo, hi = float(lut.min()), float(lut.max())
        unit = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        unit = _window(values, _first(ds.WindowCenter), _first(ds.WindowWidth))
    else:  # no display transform in the file: the image's own range
        lo, hi = float(values.min()), float(values.max())
        unit = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":  # low values are white in MONOCHROME1
        unit = 1.0 - unit
    return np.round(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


def _colour(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    lo, hi = float(pixels.min()), float(pixels.max())
    unit = (pixels.astype(np.float64) - lo) / (hi - lo) if hi > lo else np.zeros(pixels.shape)
    return np.round(unit * 255.0).astype(np.uint8)


def decode_dicom(data: bytes, uri: str, max_pixels: int) -> np.ndarray:
    """``(H, W)`` uint8 for grayscale, ``(H, W, 3)`` for colour; the first frame of a multi-frame file."""
    ds = read_header(data, uri)
    if "PixelData" not in ds:
        raise DicomError(f"{uri}: DICOM file holds no pixel data")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        raise DicomError(f"{uri}: DICOM file lacks valid Rows/Columns") from None
    if rows * columns > max_pixels:  # checked from the header, before any pixel is decoded
        raise DicomError(f"{uri}: {columns}x{rows} pixels exceeds the limit of {max_pixels}")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = ds.pixel_array
    except (AttributeError, RuntimeError, ValueError, NotImplementedError, TypeError, KeyError, EOFError) as err:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        what = f"transfer syntax {syntax.name}" if syntax is not None else "no transfer syntax"
        raise DicomError(f"{uri}: cannot decode DICOM pixel data ({what}; {err.__class__.__name__})") from None
    if frames > 1:
        pixels = pixels[0]
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples == 3:
        return _colour(pixels)
    try:
        return _grayscale(pixels, ds)
    except (AttributeError, ValueError, TypeError, IndexError, KeyError) as err:
        raise DicomError(f"{uri}: invalid DICOM display transform ({err.__class__.__name__})") from None
