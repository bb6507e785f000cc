"""Decompression bombs, small on disk and honest: their zero pixels really inflate to what the header says.

Deflate streams of zeros are built without compressing gigabytes: one chunk of zeros compressed
after a full flush is a self-contained run of non-final blocks, so the same bytes repeated inflate
to that chunk repeated, and an empty final block closes the stream. Used by the hostile-input tests
and ``benchmarks/hostile_memory.py``.
"""

from __future__ import annotations

import struct
import zlib

from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicom_files import dataset, gradient

CHUNK = 1 << 20
FINAL_BLOCK = b"\x03\x00"  # an empty final block with fixed codes: what zlib writes to end a raw stream


def _flushed(data: bytes) -> bytes:
    """``data`` as raw deflate blocks that end on a byte boundary and refer to nothing before them."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)


def deflated_zeros(length: int) -> bytes:
    """Non-final raw deflate blocks that inflate to ``length`` zero bytes."""
    whole, rest = divmod(length, CHUNK)
    return _flushed(bytes(CHUNK)) * whole + (_flushed(bytes(rest)) if rest else b"")


def deflated_dicom(rows: int, columns: int, frames: int = 1, samples: int = 1, bits: int = 8, body_frames: int | None = None) -> bytes:
    """A Deflated Explicit VR Little Endian file whose header declares ``frames`` frames of ``rows`` ×
    ``columns`` × ``samples`` at ``bits``, and whose pixel data inflates to ``body_frames`` (default:
    as many) such frames of zeros."""
    ds = dataset(gradient(8))  # a real header, its pixel description then replaced
    del ds.PixelData
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, samples
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples == 3:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    length = rows * columns * (body_frames or frames) * samples * bits // 8
    body.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW" if bits > 8 else b"OB", 0, length))
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.write(bytes(128) + b"DICM")
    write_file_meta_info(meta, ds.file_meta)
    return meta.getvalue() + _flushed(body.getvalue()) + deflated_zeros(length) + FINAL_BLOCK


def png_16bit(width: int, height: int) -> bytes:
    """A 16-bit grayscale PNG of zeros: ``width`` × ``height`` × 2 bytes once decoded."""
    row = bytes(1 + 2 * width)  # filter type 0, then the samples
    rows_per_chunk = max(1, CHUNK // len(row))
    whole, rest = divmod(height, rows_per_chunk)
    raw = _flushed(row * rows_per_chunk) * whole + (_flushed(row * rest) if rest else b"") + FINAL_BLOCK
    adler = ((len(row) * height) % 65521) << 16 | 1  # Adler-32 of zeros: its sum stays 1, its sum of sums is the length
    idat = b"\x78\xda" + raw + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
