"""DICOM → display-ready uint8 pixels, the way a radiologist's viewer would show them.

The order follows the standard's pixel pipeline (PS3.3 C.11), each step pydicom's own: stored values
→ ``apply_modality_lut`` (modality LUT or rescale slope/intercept) → ``apply_voi_lut`` (a LUT in the
file wins over window center/width; windows follow VOILUTFunction: LINEAR, LINEAR_EXACT, SIGMOID) →
MONOCHROME1 inverted so that bone is always bright. Only the first frame is decoded, but the pixel
limit counts every frame, sample and byte the header declares. Compressed transfer syntaxes (JPEG
baseline/lossless, JPEG-LS, JPEG 2000, RLE) are decoded by pydicom's pixel plugins (pylibjpeg); a
deflated file is inflated here, header first and never beyond what the limit allows.

Privacy: no message built here contains a header value, only the URI and what is wrong; pydicom's
own exception text is reduced to its class name for the same reason, and every header value is
read inside ``private()``, where pydicom's validation (whose warnings quote values) is off. The facts
kept for drift monitoring (``acquisition``) are coarse codes (Modality, ViewPosition, bits stored) and a
digest of InstitutionName, never a patient field.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import threading
import warnings
import zlib

import numpy as np

from medray.errors import MedrayError

PREAMBLE = 128
HEADER_WINDOW = 1 << 20  # inflated bytes that hold the header of any sane deflated file, read before the rest
_PIXEL_TAGS = {0x7FE00008, 0x7FE00009, 0x7FE00010}  # (double) float pixel data, pixel data
_CODE = re.compile(r"[A-Z0-9 _]{1,16}")  # the CS value representation


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: a 128-byte preamble, then ``DICM`` (sniffed, not guessed from the name)."""
    return len(data) >= PREAMBLE + 4 and data[PREAMBLE : PREAMBLE + 4] == b"DICM"


class DicomError(MedrayError, ValueError):
    pass


_private = threading.Lock()
_inside = 0  # threads now in a private() block
_undo: contextlib.ExitStack | None = None


@contextlib.contextmanager
def private():
    """Every access to a header happens in here: pydicom converts values lazily, on first access, and its
    validation warnings quote the value (a malformed UID carrying a patient's name would reach stderr and
    the worker logs). Validation is off and its warnings are silenced while any thread is in such a block.

    Both switches are process-wide, and each saves the state it found to restore it on leaving: two threads
    nesting plain context managers (SRs read headers in a thread pool) would leave them switched for good
    when the first to enter leaves first. So the first thread in switches, the last one out restores."""
    global _inside, _undo
    from pydicom import config

    with _private:
        if _inside == 0:
            _undo = contextlib.ExitStack()
            _undo.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            _undo.enter_context(config.disable_value_validation())
        _inside += 1
    try:
        yield
    finally:
        with _private:
            _inside -= 1
            if _inside == 0:
                _undo.close()
                _undo = None


class _Source:
    """A file's dataset, with the bytes and options that decode its first frame; a deflated file is
    inflated (within its budget) once, here, instead of by pydicom in full."""

    def __init__(self, data: bytes, uri: str, max_bytes: int):
        import pydicom
        from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

        self.data, self.options = data, {}
        meta, body = _read_meta(data, uri)
        if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            self.data = _inflate(memoryview(data)[body:], uri, max_bytes)
            self.options = {"transfer_syntax_uid": ExplicitVRLittleEndian}
            self.dataset = _read_body(self.data)
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            self.dataset.file_meta = meta
        else:
            self.dataset = pydicom.dcmread(io.BytesIO(data), force=False, defer_size=4096)  # pixel data read only when asked

    def first_frame(self) -> np.ndarray:
        from pydicom.pixels import pixel_array

        return pixel_array(io.BytesIO(self.data), index=0, **self.options)  # reads and decodes that one frame's bytes


def _read_meta(data: bytes, uri: str):
    """The file meta information (group 0002, always explicit VR little endian), and where it ends."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filereader import read_dataset

    if not is_dicom(data):
        raise DicomError(f"{uri}: not a DICOM file (no DICM prefix)")
    stream = io.BytesIO(data)
    stream.seek(PREAMBLE + 4)
    meta = read_dataset(stream, False, True, stop_when=lambda tag, vr, length: tag.group != 2)
    return FileMetaDataset(meta), stream.tell()


def _read_body(body: bytes, stop_before_pixels: bool = False):
    from pydicom.filereader import read_dataset

    stop = (lambda tag, vr, length: tag in _PIXEL_TAGS) if stop_before_pixels else None
    return read_dataset(io.BytesIO(body), False, True, stop_when=stop, defer_size=4096)


def _inflate(body: memoryview, uri: str, max_bytes: int) -> bytes:
    """The deflated dataset ``body`` inflated, never beyond a budget: pydicom would inflate all of it
    before reading a single tag (a 2 MB file of 64 frames of 4096x4096 inflates to 2 GB). The header
    is inflated first and its declared size checked against ``max_bytes``; the rest then inflates to
    at most that size (plus the header window), so a body longer than its header claims is refused too."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    head = inflater.decompress(body, HEADER_WINDOW)
    try:
        dimensions = _dimensions(_read_body(head, stop_before_pixels=True), uri)
    except Exception:  # noqa: BLE001 — a header longer than the window: the limit itself bounds the rest
        dimensions = None
    declared = _size(dimensions) if dimensions else max_bytes
    _check_size(declared, max_bytes, uri, dimensions)
    budget = declared + HEADER_WINDOW - len(head)
    rest = inflater.decompress(inflater.unconsumed_tail, budget + 1)  # one byte more than allowed tells "too long"
    if len(rest) > budget:
        raise DicomError(f"{uri}: deflated DICOM data inflates beyond {declared + HEADER_WINDOW} bytes, more than its header declares")
    return head + rest


def _size(dimensions: tuple[int, int, int, int, int]) -> int:
    frames, rows, columns, samples, depth = dimensions
    return frames * rows * columns * samples * depth


def _check_size(size: int, max_bytes: int, uri: str, dimensions: tuple | None = None) -> None:
    if size > max_bytes:
        shape = "{0} frame(s) of {2}x{1} pixels x {3} sample(s) x {4} byte(s) = ".format(*dimensions) if dimensions else ""
        raise DicomError(f"{uri}: {shape}{size} bytes of pixel data exceeds the limit of {max_bytes}")


def _unreadable(uri: str, err: Exception) -> DicomError:
    what = "corrupt deflate stream" if isinstance(err, zlib.error) else err.__class__.__name__
    return DicomError(f"{uri}: unreadable DICOM ({what})")


def _open(data: bytes, uri: str, max_bytes: int) -> _Source:
    """The file as a ``_Source`` (``force=False``: a file that is not DICOM is refused); pydicom's own
    exception text is reduced to its class name, since it may quote a header value."""
    try:
        return _Source(data, uri, max_bytes)
    except DicomError:
        raise
    except MemoryError:
        raise DicomError(f"{uri}: DICOM file too large to read (MemoryError)") from None
    except Exception as err:  # noqa: BLE001 — whatever a malformed file makes pydicom raise, it is that file's error
        raise _unreadable(uri, err) from None


def header_ids(data: bytes, uri: str, max_bytes: int) -> tuple[str, str]:
    """(PatientID, StudyInstanceUID) from the header, "" where absent; the caller pseudonymises them."""
    with private():
        ds = _open(data, uri, max_bytes).dataset
        try:
            return str(ds.get("PatientID", "") or "").strip(), str(ds.get("StudyInstanceUID", "") or "").strip()
        except Exception as err:  # noqa: BLE001 — a malformed value: its text must not travel
            raise _unreadable(uri, err) from None


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
    except Exception:  # noqa: BLE001 — absent or malformed, the header cannot size the image
        raise DicomError(f"{uri}: DICOM file lacks valid Rows/Columns/NumberOfFrames") from None
    if min(frames, rows, columns, samples, depth) < 1:
        raise DicomError(f"{uri}: DICOM file declares an empty image")
    return frames, rows, columns, samples, depth


def decode_dicom(data: bytes, uri: str, max_bytes: int) -> np.ndarray:
    """``(H, W)`` uint8 for grayscale, ``(H, W, 3)`` for colour; the first frame of a multi-frame file,
    and only that frame is decoded. Every frame, sample and byte the header declares is counted
    against ``max_bytes`` before any pixel is decoded (or a deflated file inflated past its header)."""
    return decode_dicom_described(data, uri, max_bytes)[0]


def acquisition(ds) -> dict:
    """Coarse, non-patient facts of the acquisition for drift monitoring (medray.scoring.statistics):
    bits stored, and Modality / ViewPosition when they are well-formed code strings (CS: upper case,
    digits, space, underscore, at most 16 characters; anything else is ``other``). InstitutionName is
    free text, so only a short digest of it is kept: a new site shows up as a new category without its
    name being copied into an output (the digest is no secret: institution names are public)."""
    facts = {"bit_depth": 0, "modality": "", "view": "", "site": ""}
    try:
        facts["bit_depth"] = int(ds.get("BitsStored", 0) or ds.get("BitsAllocated", 0) or 0)
    except Exception:  # noqa: BLE001 — a malformed value is no fact
        pass
    for key, tag in (("modality", "Modality"), ("view", "ViewPosition")):
        try:
            value = str(ds.get(tag, "") or "").strip().upper()
        except Exception:  # noqa: BLE001
            value = "other"
        facts[key] = value if not value or _CODE.fullmatch(value) else "other"
    try:
        name = " ".join(str(ds.get("InstitutionName", "") or "").split()).upper()
    except Exception:  # noqa: BLE001
        name = ""
    facts["site"] = "site-" + hashlib.sha256(name.encode()).hexdigest()[:8] if name else ""
    return facts


def decode_dicom_described(data: bytes, uri: str, max_bytes: int) -> tuple[np.ndarray, dict]:
    """``decode_dicom``'s pixels and the ``acquisition`` facts of the same header, read once."""
    with private():
        source = _open(data, uri, max_bytes)
        ds = source.dataset
        if "PixelData" not in ds:
            raise DicomError(f"{uri}: DICOM file holds no pixel data")
        dimensions = _dimensions(ds, uri)
        _check_size(_size(dimensions), max_bytes, uri, dimensions)
        try:
            pixels = source.first_frame()
        except Exception as err:  # noqa: BLE001 — any failure of a plugin on this file is this file's error
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            what = f"transfer syntax {syntax.name}" if syntax is not None else "no transfer syntax"
            raise DicomError(f"{uri}: cannot decode DICOM pixel data ({what}; {err.__class__.__name__})") from None
        facts = acquisition(ds)
        if dimensions[3] == 3:
            return _colour(pixels), facts
        try:
            return _grayscale(pixels, ds), facts
        except Exception as err:  # noqa: BLE001 — a malformed LUT or window; its text may quote header values
            raise DicomError(f"{uri}: invalid DICOM display transform ({err.__class__.__name__})") from None
