"""Real DICOM Part 10 files written with pydicom, for the reader, hostile-input and privacy tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

PATIENT_NAME = "Zebulon^Quixotic-Marmalade"
PATIENT_ID = "PID-7Q4X-HORSEFEATHERS-0042"


def dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int | None = None, **tags) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = tags.pop("PatientName", PATIENT_NAME)
    ds.PatientID = tags.pop("PatientID", PATIENT_ID)
    ds.StudyInstanceUID = tags.pop("StudyInstanceUID", generate_uid())
    ds.Modality = "OT"
    ds.set_pixel_data(pixels, photometric, bits or pixels.dtype.itemsize * 8, generate_instance_uid=False)
    for key, value in tags.items():
        setattr(ds, key, value)
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def jpeg_baseline(pixels: np.ndarray, **tags) -> bytes:
    """JPEG baseline (process 1): pydicom has no encoder for it, so Pillow's JPEG is encapsulated."""
    ds = dataset(pixels, **tags)
    encoded = io.BytesIO()
    Image.fromarray(pixels).save(encoded, format="JPEG", quality=95)
    ds.PixelData = encapsulate([encoded.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return to_bytes(ds)


def gradient(size: int = 32, dtype=np.uint8, top: int = 255) -> np.ndarray:
    row = np.linspace(0, top, size)
    return np.tile(row, (size, 1)).astype(dtype)
